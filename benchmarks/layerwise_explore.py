"""One layer-wise prune of SmolLM2-135M on the language-model table's windows, with block reconstruction and/or
OWL's allocation (issue 24, exploration before the bench target): perplexity, seconds and the driver's timings and
per-block reconstruction figures as JSON.

    .venv/bin/python benchmarks/layerwise_explore.py sparsegpt 2:4 --reconstruct-epochs 2 --json out.json
    .venv/bin/python benchmarks/layerwise_explore.py sparsegpt 0.7 --allocation owl --json out.json
"""
import argparse
import json
import time

from bench_windows import load_bench_model

from brainsurgeon import prune_layerwise
from brainsurgeon.atomic import write_text
from brainsurgeon.bench import split_pattern
from brainsurgeon.datasets.text import perplexity


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method")
    parser.add_argument("pattern", help="a sparsity (unstructured per layer) or N:M")
    parser.add_argument("--reconstruct-epochs", type=int, default=0, help="0: no block reconstruction")
    parser.add_argument("--reconstruct-step", type=float)
    parser.add_argument("--allocation", default="uniform")
    parser.add_argument("--target", default="layer")
    parser.add_argument("--window", default="block", help="the reconstruction's window, with --reconstruct-epochs")
    parser.add_argument("--batch-size", type=int, default=8, help="calibration windows per call (an Adam step of "
                                                                  "the reconstruction is one call)")
    parser.add_argument("--option", action="append", default=[], help="a method option, name=value (a number)")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    model, calibration, evaluation = load_bench_model()
    refit = (dict(reconstruct=args.window, reconstruct_epochs=args.reconstruct_epochs,
                  reconstruct_step=args.reconstruct_step) if args.reconstruct_epochs else {})
    sparsity, kind = split_pattern(args.pattern if ":" in args.pattern else float(args.pattern))
    started = time.perf_counter()
    result = prune_layerwise(model, calibration, sparsity, args.method, pattern=kind, allocation=args.allocation,
                             batch_size=args.batch_size, target=args.target, progress=False,
                             **{k: v for k, v in refit.items() if v is not None}, **method_options(args.option))
    seconds = time.perf_counter() - started
    result.apply(model)
    report = dict(method=args.method, pattern=args.pattern, allocation=args.allocation, seconds=seconds,
                  perplexity=perplexity(model, evaluation), settings=result.settings, timings=result.timings,
                  reconstruction=result.stats.get("reconstruction"), allocation_search=result.stats.get("allocation"))
    write_text(args.json, json.dumps(report, indent=1) + "\n", overwrite=True)
    print(f"{args.method} {args.pattern} {args.allocation}: perplexity {report['perplexity']:.2f} in {seconds:.0f} s")


def method_options(pairs) -> dict:
    options = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        options[name] = float(value) if "." in value or "e" in value else int(value)
    return options


if __name__ == "__main__":
    main()
