"""Issue 24's solver cost: `alps` against `admm` (ours) on the same layers, without reconstruction. Records the H of
SmolLM2-135M's blocks 3 and 15 on the bench's calibration windows (the blocks before them dense), or of every layer
of the dense ResNet20 or MLPNet checkpoint on 1,000 training images (--model), then prunes each layer with every
method in turn, one thread, and writes each layer's seconds and layer error. --admm sets admm's options
(key=value,..., each read as its declared default's type), to measure a default on more than one model.

    .venv/bin/python benchmarks/solver_time.py 2:4 --json bench/smollm2_issue24/solver_time_24.json
    .venv/bin/python benchmarks/solver_time.py 0.7 --model resnet20 --json bench/solver_time/resnet20_0.7.json
"""
import argparse
import json
import time
from pathlib import Path

import torch
from bench_windows import load_bench_model

from brainsurgeon.atomic import write_text
from brainsurgeon.curvature.hessian import LayerObjective
from brainsurgeon.datasets.vision import load_dataset
from brainsurgeon.drivers.activations import (
    HessianRecorder,
    capture_block_inputs,
    model_calls,
    run_block,
    with_first,
)
from brainsurgeon.methods.budget import Budget
from brainsurgeon.methods.catalog import LAYER_METHODS
from brainsurgeon.models.vision import build_model
from brainsurgeon.modes import evaluating

BLOCKS = (3, 15)
METHODS = ("alps", "admm", "sparsegpt")
VISION = {"resnet20": ("cifar10", "resnet20_cifar10.pth.tar"), "mlpnet": ("mnist", "mnist_25_epoch_93.97.ckpt")}
VISION_SAMPLES = 1000  # the vision benches' calibration size
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pattern", help="a sparsity (unstructured per layer) or N:M")
    parser.add_argument("--json", required=True)
    parser.add_argument("--model", choices=("smollm2", *VISION), default="smollm2")
    parser.add_argument("--admm", default="", help="admm's options, key=value,... (default: its defaults)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    admm_options = admm_settings(args.admm)
    layers = vision_layers(args.model) if args.model in VISION else recorded_layers(*load_bench_model()[:2])
    budget = Budget.parse(args.pattern) if ":" in args.pattern else Budget.parse("layer", float(args.pattern))
    rows, totals = [], {method: dict(seconds=0.0, error=0.0) for method in METHODS}
    for name, weight, hessian in layers:
        row = dict(layer=name)
        for method in METHODS:  # in turn on each layer, so that both meet the same machine load
            solver = LAYER_METHODS[method](**(admm_options if method == "admm" else {}))
            objective = LayerObjective(weight, hessian, 0.01)
            started = time.perf_counter()
            _, new = solver.prune(objective, budget)
            seconds = time.perf_counter() - started
            row[method] = {**getattr(solver, "last_stats", {}), "seconds": seconds, "error": objective.error(new)}
            totals[method]["seconds"] += seconds
            totals[method]["error"] += row[method]["error"]
        rows.append(row)
    report = dict(pattern=args.pattern, model=args.model, blocks=BLOCKS if args.model == "smollm2" else "all",
                  admm_options=admm_options, threads=1, totals=totals, layers=rows,
                  admm_over_alps_seconds=totals["admm"]["seconds"] / totals["alps"]["seconds"],
                  admm_over_alps_error=totals["admm"]["error"] / totals["alps"]["error"])
    write_text(args.json, json.dumps(report, indent=1) + "\n", overwrite=True)
    print(f"{args.model} {args.pattern} {args.admm}: admm {totals['admm']['seconds']:.1f} s against alps "
          f"{totals['alps']['seconds']:.1f} s "
          f"({report['admm_over_alps_seconds']:.2f}x), summed layer error {report['admm_over_alps_error']:.4f}x")


def recorded_layers(model, calibration) -> list:
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


def admm_settings(text: str) -> dict:
    """{option: value} of 'key=value,...', each value read as the type of the option's declared default (an
    undeclared key is left for the method to refuse, with the declared ones named)."""
    kinds = {name: type(default) for name, default, *_ in LAYER_METHODS["admm"].Options.declared()}
    pairs = [item.partition("=") for item in text.split(",") if item]
    return {key: kinds.get(key, str)(value) for key, _, value in pairs}


def vision_layers(name: str) -> list:
    """(name, weight as rows x inputs, H) of every conv and linear layer of the dense checkpoint, on the first
    VISION_SAMPLES training images."""
    dataset_name, checkpoint = VISION[name]
    model = build_model(name, SHARED_DATA / "checkpoints" / checkpoint)
    dataset = load_dataset(dataset_name, SHARED_DATA / dataset_name)
    images = dataset.prepare(dataset.train_inputs[:VISION_SAMPLES])
    layers = {key: module for key, module in model.named_modules() if isinstance(module, (torch.nn.Conv2d,
                                                                                           torch.nn.Linear))}
    recorder = HessianRecorder(layers)
    try:
        with torch.no_grad(), evaluating(model):
            model(images)
    finally:
        recorder.close()
    return [(key, module.weight.detach().flatten(1).clone(), recorder.take_hessian(key))
            for key, module in layers.items()]


if __name__ == "__main__":
    main()
