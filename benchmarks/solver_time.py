"""Issue 24's solver cost: `alps` against `admm` (ours) on the same layers, without reconstruction. Records the H of
SmolLM2-135M's blocks 3 and 15 on the bench's calibration windows (the blocks before them dense), then prunes each of
their seven layers with both methods in turn, one thread, and writes each layer's seconds and layer error.

    .venv/bin/python benchmarks/solver_time.py 2:4 --json bench/smollm2_issue24/solver_time_24.json
"""
import argparse
import json
import time

import torch
from bench_windows import load_bench_model

from brainsurgeon.atomic import write_text
from brainsurgeon.curvature.hessian import LayerObjective
from brainsurgeon.drivers.activations import (
    HessianRecorder,
    capture_block_inputs,
    model_calls,
    run_block,
    with_first,
)
from brainsurgeon.methods.budget import Budget
from brainsurgeon.methods.catalog import LAYER_METHODS
from brainsurgeon.modes import evaluating

BLOCKS = (3, 15)
METHODS = ("alps", "admm", "sparsegpt")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pattern", help="a sparsity (unstructured per layer) or N:M")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, calibration, _ = load_bench_model()
    budget = Budget.parse(args.pattern) if ":" in args.pattern else Budget.parse("layer", float(args.pattern))
    rows, totals = [], {method: dict(seconds=0.0, error=0.0) for method in METHODS}
    for name, weight, hessian in recorded_layers(model, calibration):
        row = dict(layer=name)
        for method in METHODS:  # in turn on each layer, so that both meet the same machine load
            solver, objective = LAYER_METHODS[method](), LayerObjective(weight, hessian, 0.01)
            started = time.perf_counter()
            _, new = solver.prune(objective, budget)
            seconds = time.perf_counter() - started
            row[method] = {**getattr(solver, "last_stats", {}), "seconds": seconds, "error": objective.error(new)}
            totals[method]["seconds"] += seconds
            totals[method]["error"] += row[method]["error"]
        rows.append(row)
    report = dict(pattern=args.pattern, blocks=BLOCKS, threads=1, totals=totals, layers=rows,
                  admm_over_alps_seconds=totals["admm"]["seconds"] / totals["alps"]["seconds"],
                  admm_over_alps_error=totals["admm"]["error"] / totals["alps"]["error"])
    write_text(args.json, json.dumps(report, indent=1) + "\n", overwrite=True)
    print(f"{args.pattern}: admm {totals['admm']['seconds']:.1f} s against alps {totals['alps']['seconds']:.1f} s "
          f"({report['admm_over_alps_seconds']:.2f}x), summed layer error {report['admm_over_alps_error']:.4f}x")


def recorded_layers(model, calibration):
    """(name, weight, H) of every prunable layer of BLOCKS, the model kept dense."""
    recorded = []
    with torch.no_grad(), evaluating(model):
        inputs = capture_block_inputs(model, model.model.layers[0], model_calls(model, calibration, 8))
        for index in range(max(BLOCKS) + 1):
            block = model.model.layers[index]
            if index in BLOCKS:
                layers = {name: module for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)}
                recorder = HessianRecorder(layers)
                try:
                    run_block(block, inputs)
                finally:
                    recorder.close()
                recorded += [(f"{index}.{name}", module.weight.detach().clone(), recorder.take_hessian(name))
                             for name, module in layers.items()]
            inputs = with_first(inputs, run_block(block, inputs))
    return recorded


if __name__ == "__main__":
    main()
