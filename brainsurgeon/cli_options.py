"""The command line's method and stage options, generated from the methods' declarations (their `Options`) and the
stages' (registry.StageOptions): one flag per declared name, its help naming the methods that take it and their
defaults. A flag not given is left out, so the library's defaults apply, and one given that the chosen method does
not declare is refused by the library, naming the ones it does."""
import argparse
import sys

from . import validation
from .bench import DEFAULT_CALIB_SAMPLES
from .drivers.layers import find_prunable
from .drivers.reconstruct import DEFAULT_EPOCHS, DEFAULT_STEP, WINDOWS
from .drivers.registry import SELECTIONS, StageOptions, comma_numbers, needs_fisher
from .drivers.stage import DEFAULT_MAX_MEMORY, GIB, samples_that_fit
from .drivers.tuning import Tuning
from .errors import BrainSurgeonError
from .methods.catalog import LAYER_METHODS
from .methods.update import UPDATES

OWN_FLAGS = ("seed",)  # the command line's own --seed, handed to a layer-wise method that declares one


def _owners() -> list:
    """(label, Options class) of every method with options, and of the stages."""
    owners = [(name, cls.Options) for name, cls in {**SELECTIONS, **UPDATES}.items()]
    owners += [(f"{name} (layer-wise)", cls.Options) for name, cls in LAYER_METHODS.items()]
    return ([(label, options) for label, options in owners if options.names()]
            + [("stages", StageOptions), ("staged runs", Tuning)])


def declared_options() -> dict:
    """name -> (help, parse, [(owner, default)]) over every declaration; one name, one flag."""
    merged = {}
    for label, options in _owners():
        for name, default, help_text, parse in options.declared():
            entry = merged.setdefault(name, [help_text, parse, []])
            entry[1] = entry[1] or parse
            entry[2].append((label, default))
    return merged


def _text_type(parse, defaults):
    """How argparse reads the flag: the declared parser (its docstring says what it expects), else the type of the
    defaults (tuples as lists)."""
    if parse is not None and parse not in (int, float, str, bool):
        def read(text: str):
            try:
                return parse(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"expected {parse.__doc__}, got {text!r}") from None
        return read
    if parse is not None:
        return parse
    kinds = {type(default) for _, default in defaults if default is not None}
    kind = kinds.pop() if len(kinds) == 1 else str
    if kind is tuple:
        return _text_type(comma_numbers, ())
    return kind


def add_option_flags(parser) -> None:
    """One group of flags for every declared method and stage option."""
    group = parser.add_argument_group("method and stage options (each taken by the methods named in its help)")
    for name, (help_text, parse, defaults) in sorted(declared_options().items()):
        if name in OWN_FLAGS:
            continue
        flag = "--" + name.replace("_", "-")
        owners = "; ".join(f"{label}: default {default}" if default is not None else label
                           for label, default in defaults)
        kind = _text_type(parse, defaults)
        if kind is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{help_text} [{owners}]")
        else:
            group.add_argument(flag, dest=name, type=kind, default=None, help=f"{help_text} [{owners}]")


def given_options(args) -> dict:
    """The method and stage options given on the command line."""
    return {name: getattr(args, name) for name in declared_options()
            if name not in OWN_FLAGS and getattr(args, name, None) is not None}


def add_reconstruct_flags(parser) -> None:
    """prune's and bench's block-reconstruction flags (drivers/reconstruct.py)."""
    parser.add_argument("--reconstruct", choices=WINDOWS,
                        help="with --hf-model (weights, not units): block fits each pruned block's kept weights to "
                             "the dense block's outputs, sublayer each attention or MLP to the dense one's; masks "
                             "fixed, stopped early on held-out calibration windows")
    parser.add_argument("--reconstruct-epochs", type=int, help="with --reconstruct: at most this many passes "
                                                               f"(default {DEFAULT_EPOCHS})")
    parser.add_argument("--reconstruct-step", type=float, help="with --reconstruct: Adam's step as a fraction of "
                                                               f"each layer's weight RMS (default {DEFAULT_STEP:g})")


def calib_samples(args, dataset, model, methods) -> tuple:
    """(samples, why they were chosen or None). An explicit --calib-samples must exist in the data and is never
    changed. The default, DEFAULT_CALIB_SAMPLES, shrinks to a small training split, and for a Fisher method to
    the most per-sample gradients that fit --max-memory-gb (said on stderr)."""
    if args.calib_samples is None:
        wanted = min(DEFAULT_CALIB_SAMPLES, dataset.num_train)
        if not any(needs_fisher(method) for method in methods):
            return wanted, None
        layers, _ = find_prunable(model, getattr(args, "include", None), getattr(args, "ignore", None) or ())
        budget = max_memory(args) or DEFAULT_MAX_MEMORY
        fitting = samples_that_fit(layers, wanted, budget)
        if fitting == wanted:
            return wanted, None
        weights = sum(layer.size for layer in layers)
        why = (f"{fitting} calibration samples, not {wanted}: the most per-sample gradients of {weights} weights whose "
               f"Fisher (one block per layer, streamed) fits {budget / GIB:g} GiB")
        if not args.quiet:
            print(f"brainsurgeon: chose {why}", file=sys.stderr, flush=True)
        return fitting, why
    if validation.count("calibration samples", args.calib_samples) > dataset.num_train:
        raise BrainSurgeonError(f"not enough training samples: --calib-samples {args.calib_samples} requested, "
                                f"{dataset.num_train} exist; lower --calib-samples")
    return args.calib_samples, None


def max_memory(args):
    return None if args.max_memory_gb is None else args.max_memory_gb * GIB
