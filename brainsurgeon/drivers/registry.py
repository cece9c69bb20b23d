"""Method names, presets and option routing on the Fisher objective.

'SELECTION[+UPDATE]' names a selection and an update (methods/), the update defaulting to the selection's
`default_update`; a preset names a method and stage settings. Each selection and update declares its options
(its `Options`), and a run's stages take the options of `StageOptions`. An option that no method of the run (nor
the stages) declares is an error naming those that are declared."""
from dataclasses import dataclass

from ..errors import BrainSurgeonError
from ..methods.catalog import FISHER_SELECTIONS as SELECTIONS
from ..methods.catalog import UPDATES, canonical
from ..methods.options import MethodOptions, option


def comma_numbers(text: str) -> tuple:
    """comma-separated numbers"""
    return tuple(float(part) for part in text.split(","))


def _schedule(text: str):
    """'adaptive' or comma-separated sparsities"""
    return "adaptive" if text.strip() == "adaptive" else list(comma_numbers(text))


def _count_or_auto(text: str):
    """a whole number or 'auto'"""
    return "auto" if text.strip() == "auto" else int(text)


@dataclass(frozen=True)
class StageOptions(MethodOptions):
    """What a staged prune takes besides its methods' options (checked by plan_run; None: the preset's or the
    library's default)."""

    stages: int = option(None, "prune in this many stages, geometric in density", int)
    schedule: object = option(None, "sparsities per stage, e.g. 0.9,0.95,0.98, or 'adaptive' (prune's docstring)",
                              _schedule)
    refine: object = option(None, "extra stages at the target sparsity, or 'auto' (prune's docstring)",
                            _count_or_auto)
    first_order: bool = option(None, "model the mean gradient too (the model need not be at a minimum)", bool)
    first_method: str = option(None, "the method of the first stage (default: the method)", str)
    later_damping: float = option(None, "damping of the stages after the first (default: --damp)", float)
    later_damping_grid: tuple = option(None, "CBS-U grid of the stages after the first, e.g. 0.01,0.1,1", comma_numbers)
    fresh_samples: bool = option(None, "each stage fits --calib-samples samples of its own, and as many more are "
                                 "held out to judge the stages (default: on for max only)", bool)
    layer_start: bool = option(None, "also run the layer-wise start (layers pruned towards the dense outputs) and "
                               "keep it where its held-out loss is lower than the Fisher path's beyond 2 standard "
                               "errors (default: on for max only)", bool)
    bn_recalibration: bool = option(None, "re-estimate BatchNorm running statistics after pruning (and between "
                                    "stages) to match the dense model's BatchNorm outputs: forward passes only", bool)


PRESETS = {
    # The most accurate configuration measured, with nothing sized to one model (docs/decisions.md). The Fisher
    # path: cbs with the caller's settings for the adaptive schedule's first step, then swaps stages with the mean
    # gradient modelled and more damping; the layer path: every layer pruned towards the dense model's outputs.
    # choose_path keeps one at the target on the held-out loss, and only that one is refined on fresh samples.
    "max": dict(method="swaps", first_method="cbs", schedule="adaptive", refine="auto", fresh_samples=True,
                first_order=True, layer_start=True,
                later_damping=1e-2, later_damping_grid=(0.01, 0.1, 1.0, 10.0, 100.0, 1000.0), start="mp",
                iht_rounds=1, max_swaps=10),
}


def parse_method(method: str):
    """'SELECTION[+UPDATE]' (or a preset's name) -> (selection, update); the update defaults per selection."""
    if not isinstance(method, str):
        raise BrainSurgeonError(f"method must be a name such as 'cbs' or 'wf+cbsu', got {method!r}")
    method = PRESETS.get(method, {}).get("method", method)
    selection, _, update = method.partition("+")
    selection = canonical(selection, "fisher")
    if selection not in SELECTIONS:
        raise BrainSurgeonError(f"unknown selection '{selection}' in method '{method}'; choose from "
                                f"{sorted(SELECTIONS) + sorted(PRESETS)}")
    update = update or SELECTIONS[selection].default_update
    if update not in UPDATES:
        raise BrainSurgeonError(f"unknown update '{update}' in method '{method}'; choose from {sorted(UPDATES)}")
    return selection, update


def resolve_preset(method: str, settings: dict) -> tuple:
    """A preset name -> (its method, its settings under the caller's explicit ones)."""
    if method not in PRESETS:
        return method, settings
    preset = dict(PRESETS[method])
    return preset.pop("method"), {**preset, **{k: v for k, v in settings.items() if v is not None}}


def pop_or(settings: dict, key: str, default):
    value = settings.pop(key, None)
    return default if value is None else value


def method_option_names(selection: str, update: str) -> set:
    return set(SELECTIONS[selection].Options.names()) | set(UPDATES[update].Options.names())


def methods_of(method: str) -> set:
    """(selection, update) pairs a method name runs: a preset's first stage may run another method."""
    first_method = PRESETS.get(method, {}).get("first_method")
    return {parse_method(method)} | ({parse_method(first_method)} if first_method else set())


def needs_fisher(method: str) -> bool:
    """Whether any stage of `method` computes per-sample gradients."""
    return any(SELECTIONS[sel].needs_fisher or UPDATES[upd].needs_fisher for sel, upd in methods_of(method))


def options_for(method: str, options: dict) -> dict:
    """The part of a sweep's `options` that `method` takes: its selections' and updates' options, and the stage
    options (a sweep checks with check_sweep_options that each option is taken by one of its methods)."""
    names = set(StageOptions.names()).union(*(method_option_names(*pair) for pair in methods_of(method)))
    return {key: value for key, value in options.items() if key in names}


def check_sweep_options(methods, options: dict) -> None:
    """Refuse an option that no method of a sweep takes (a misspelt one among them)."""
    taken = set().union(*(options_for(method, options) for method in methods))
    unknown = sorted(set(options) - taken)
    if unknown:
        valid = sorted(set(StageOptions.names()).union(
            *(method_option_names(*pair) for method in methods for pair in methods_of(method))))
        raise BrainSurgeonError(f"no method of {list(methods)} takes option {', '.join(map(repr, unknown))}; the "
                                f"options they take are: {', '.join(valid)}")


def check_options(methods, options: dict, settings=()) -> None:
    """Every option must be taken by the selection or the update of at least one of `methods` (the message also
    lists the run's `settings` names and the stage options)."""
    names = set().union(*(method_option_names(*pair) for pair in methods))
    unknown = sorted(set(options) - names)
    if unknown:
        described = ", ".join(f"'{sel}+{upd}'" for sel, upd in sorted(methods))
        raise BrainSurgeonError(f"method {described} takes no option {', '.join(map(repr, unknown))}; its options "
                                f"are: {', '.join(sorted(names | set(StageOptions.names())))}; the run's settings: "
                                f"{', '.join(sorted(settings))}")


def build_methods(selection_name: str, update_name: str, options: dict):
    """The selection and the update, each built from the options it declares."""
    selection_cls, update_cls = SELECTIONS[selection_name], UPDATES[update_name]
    return tuple(cls(cls.Options.build({k: v for k, v in options.items() if k in cls.Options.names()},
                                       f"method '{cls.name}'"))
                 for cls in (selection_cls, update_cls))
