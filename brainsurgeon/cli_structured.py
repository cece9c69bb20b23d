"""The command line's structured prunes: `prune --hf-model DIR --pattern units|heads|neurons` removes whole
attention heads and MLP neurons (drivers/structured.py) and writes a smaller model folder; `prune --model M
--pattern channels` removes a vision model's channels and writes one safetensors file with its shape map
(models/resized.py). And the structured sweeps of `bench --pattern`, of a language model's units or a vision
model's channels."""
import json
from pathlib import Path

from . import validation
from .atomic import outputs
from .bench_structured import macs, plan_runs, run_structured_benchmark
from .bench_structured_vision import run_vision_structured_benchmark
from .datasets.text import perplexity
from .datasets.vision import accuracy
from .drivers.layers import recalibrate_batchnorm
from .drivers.reconstruct import KEYWORDS as RECONSTRUCT_KEYWORDS
from .drivers.structured import (
    UNIT_KINDS,
    check_choices,
    check_refit_options,
    prune_structured,
)
from .errors import BrainSurgeonError
from .models.resized import save_resized
from .models.shrunk import write_shrunk_folder

# --pattern value -> the unit kinds it prunes
STRUCTURED_PATTERNS = {"units": UNIT_KINDS, "heads": ("heads",), "neurons": ("neurons",), "channels": ("channels",)}


def check_structured_flags(args, options: dict) -> None:
    """Refuse, before any work, what a structured prune does not use."""
    vision = args.pattern == "channels"
    if vision and args.hf_model:
        raise BrainSurgeonError("--pattern channels prunes a vision model's channels; pass --model and --checkpoint, "
                                "not --hf-model")
    if vision:
        options = {name: value for name, value in options.items() if name != "bn_recalibration"}
    elif not args.hf_model:
        raise BrainSurgeonError(f"--pattern {args.pattern} prunes a language model's units; pass --hf-model (vision "
                                "models prune weights: --pattern global, layer, row or N:M)")
    unused = [flag for flag, value in (("--include", args.include), ("--ignore", args.ignore)) if value is not None]
    unused += [f"--{name.replace('_', '-')}" for name in (*RECONSTRUCT_KEYWORDS, "dtype", "device")
               if getattr(args, name, None) is not None]
    unused += ["--" + name.replace("_", "-") for name in options]
    unused += [f"--{name.replace('_', '-')}" for name in ("damp", "structure", "gradients", "max_memory_gb")
               if vision and getattr(args, name, None) is not None]
    if unused:
        raise BrainSurgeonError(f"{', '.join(unused)} {'do' if len(unused) > 1 else 'does'} not apply to --pattern "
                                f"{args.pattern}; drop {'them' if len(unused) > 1 else 'it'}")
    if args.sparsity is None:
        raise BrainSurgeonError(f"--sparsity is required: the fraction of the {args.pattern} to remove")
    validation.number("--sparsity", args.sparsity, low=0, high=1, high_open=True)
    check_choices(args.method or "swaps", args.allocation or "uniform", STRUCTURED_PATTERNS[args.pattern],
                  names=("--method", "--allocation"))
    check_refit_options(args.method or "swaps", args.target, args.row_weights)


def prune_structured_vision_model(args, load) -> None:
    """`load(args)` gives (model, dataset). --sparsity is the fraction of the channels' multiply-accumulates per
    image; the calibration images are --calib-samples (default 1000) of the training set, drawn by --seed."""
    method, allocation = args.method or "swaps", args.allocation or "uniform"
    with outputs(args.overwrite) as staged:
        out_path = staged.file(args.out)
        report_path = staged.file(args.report) if args.report else None
        model, dataset = load(args)
        calibration = dataset.calibration(args.calib_samples or 1000, args.seed)[0]
        result = prune_structured(model, calibration, args.sparsity, method, units_of=("channels",),
                                  allocation=allocation, cost="macs", biases=args.biases, target=args.target,
                                  row_weights=args.row_weights, batch_size=128,
                                  progress=not args.quiet)
        if args.bn_recalibration:
            recalibrate_batchnorm(result.model, model, calibration, kept=result.kept_rows)
        dense, shrunk = (dict(accuracy=accuracy(m, dataset.test_x, dataset.test_y), macs=macs(m, dataset.test_x[:1]),
                              parameters=sum(p.numel() for p in m.parameters())) for m in (model, result.model))
        report = {"settings": dict(result.settings, bn_matching=bool(args.bn_recalibration),
                                   calib_samples=len(calibration), seed=args.seed),
                  "widths": result.widths, "stats": result.stats, "timings": result.timings,
                  "left_dense": result.left_dense, "dense": dense, "pruned": shrunk}
        save_resized(result.model, model, out_path)
        if report_path:
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{method} on channels ({allocation}{', BN matched' if args.bn_recalibration else ''}): "
          f"{dense['parameters']:,} -> {shrunk['parameters']:,} parameters, {dense['macs']:,} -> {shrunk['macs']:,} "
          f"MACs per image ({len(result.left_dense)} layers kept their shape, listed with the reason in the "
          f"report), test accuracy {dense['accuracy']:.2f}% -> {shrunk['accuracy']:.2f}% in "
          f"{result.timings['total']:.1f}s; wrote {args.out} (brainsurgeon.load_resized(dense_model, path) "
          "reloads it)")


def prune_structured_language_model(args, load, inputs) -> None:
    """`load(args)` gives (model, tokenizer, calibration, evaluation); `inputs` are the paths no output may overlap."""
    method, allocation = args.method or "swaps", args.allocation or "uniform"
    with outputs(args.overwrite) as staged:
        folder = staged.folder(args.out, inputs=inputs)
        report_path = staged.file(args.report) if args.report else None
        model, tokenizer, calibration, evaluation = load(args)
        result = prune_structured(model, calibration, args.sparsity, method, units_of=STRUCTURED_PATTERNS[args.pattern],
                                  allocation=allocation, biases=args.biases, target=args.target,
                                  relative_damping=args.relative_damp,
                                  progress=not args.quiet)
        dense_ppl = perplexity(model, evaluation, progress=not args.quiet)
        pruned_ppl = perplexity(result.model, evaluation, progress=not args.quiet)
        dense, shrunk = result.parameters_before_after(model)
        report = {"settings": result.settings, "widths": result.widths, "stats": result.stats,
                  "timings": result.timings, "left_dense": result.left_dense,
                  "dense_parameters": dense, "parameters": shrunk,
                  "dense_perplexity": dense_ppl, "perplexity": pruned_ppl,
                  "eval_windows": list(evaluation.shape), "calib_windows": list(calibration.shape)}
        write_shrunk_folder(folder, result.model, tokenizer, report)
        if report_path:
            report_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{method} on {args.pattern} ({allocation}): {dense:,} -> {shrunk:,} parameters ({len(result.left_dense)} "
          f"linear layers kept their shape, listed with the reason in the report), perplexity "
          f"{dense_ppl:.2f} -> {pruned_ppl:.2f} in {result.timings['total']:.1f}s; wrote {args.out} "
          "(brainsurgeon.load_pruned reloads it; plain transformers too when every block kept one width)")


def check_structured_bench_flags(args, options: dict) -> None:
    """Refuse, before any work, what a structured sweep does not use; the sweep itself is checked by plan_runs."""
    vision = args.pattern == "channels"
    if vision == bool(args.hf_model):
        raise BrainSurgeonError(f"--pattern {args.pattern} sweeps " + (
            "a vision model's channels; pass --model and --checkpoint, not --hf-model" if vision else
            "a language model's units; pass --hf-model"))
    unused = ["--" + name.replace("_", "-") for name in options]
    unused += ["--seeds"] if args.seeds != [0] and not vision else []
    unused += [f"--{name.replace('_', '-')}" for name in (*RECONSTRUCT_KEYWORDS, "dtype", "device")
               if getattr(args, name, None) is not None]
    unused += [f"--{name.replace('_', '-')}" for name in ("damp", "structure", "gradients", "max_memory_gb")
               if vision and getattr(args, name, None) is not None]
    if unused:
        raise BrainSurgeonError(f"{', '.join(unused)} {'do' if len(unused) > 1 else 'does'} not apply to a "
                                f"structured sweep; drop {'them' if len(unused) > 1 else 'it'}")
    plan_runs(args.methods.split(","), (args.allocations or "uniform").split(","), args.sparsities,
              STRUCTURED_PATTERNS[args.pattern])
    for method in args.methods.split(","):
        check_refit_options(method, args.target, args.row_weights)


def bench_structured_language_model(args, load) -> dict:
    model, tokenizer, calibration, evaluation = load(args)
    return run_structured_benchmark(model, tokenizer, calibration, evaluation, args.methods.split(","),
                                    (args.allocations or "uniform").split(","), args.sparsities,
                                    STRUCTURED_PATTERNS[args.pattern], model_name=Path(args.hf_model).name,
                                    relative_damping=args.relative_damp, biases=args.biases, target=args.target,
                                    json_path=args.json,
                                    overwrite=args.overwrite, progress=not args.quiet)


def bench_structured_vision_model(args, load) -> dict:
    """`load(args)` gives (model, dataset); fractions are of the model's multiply-accumulates per image."""
    model, dataset = load(args)
    return run_vision_structured_benchmark(model, dataset, args.methods.split(","),
                                           (args.allocations or "uniform").split(","), args.sparsities, args.seeds,
                                           args.calib_samples or 1000, model_name=args.model, biases=args.biases,
                                           target=args.target, row_weights=args.row_weights,
                                           json_path=args.json, overwrite=args.overwrite, progress=not args.quiet)
