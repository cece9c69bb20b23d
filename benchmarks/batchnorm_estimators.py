"""Which BatchNorm statistics a pruned ResNet20 should run with: the dense model's, the calibration images' own
batch statistics, or those matched to the dense model's BatchNorm outputs (what `bn_recalibration` does). Same
masks and weights for all three; prints and writes test accuracy, test loss and held-out loss.

    .venv/bin/python benchmarks/batchnorm_estimators.py [--seed 0] [--json bench/resnet20_batchnorm_estimators.json]
"""
import argparse
import copy
import json

import torch
from torch.nn import functional as F

import brainsurgeon
from brainsurgeon.atomic import write_text
from brainsurgeon.datasets.vision import accuracy, load_dataset
from brainsurgeon.drivers.allocation import exact_layer_sparsities
from brainsurgeon.drivers.calibration import CalibrationPool, mean_loss
from brainsurgeon.drivers.layers import (
    batchnorm_statistics,
    evaluating,
    find_prunable,
    recalibrate_batchnorm,
)
from brainsurgeon.drivers.sequential import prune_layerwise
from brainsurgeon.models.vision import build_model

DATA = "../shared/data"
SAMPLES = 1000


def batch_statistics(model, inputs, batch_size=128):
    """The calibration inputs' own statistics: every BatchNorm reset and averaged over train-mode passes."""
    norms = {m: m.momentum for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    with torch.no_grad(), evaluating(model):
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None
            norm.train()
        for start in range(0, len(inputs), batch_size):
            model(inputs[start : start + batch_size])
    for norm, momentum in norms.items():
        norm.momentum = momentum


def pruned(dense, method, sparsity, calibration):
    if method == "layer path":  # max's first stage on ResNet20
        layers, _ = find_prunable(dense, None, ())
        result = prune_layerwise(dense, calibration[0], exact_layer_sparsities(layers, sparsity), "admm",
                                 target="dense", blocks=[""], batch_size=128, progress=False)
    else:
        result = brainsurgeon.prune(dense, calibration, sparsity, method, progress=False)
    return result.apply(copy.deepcopy(dense))


def measure(model, data, held_out):
    return dict(test_accuracy=accuracy(model, data.test_x, data.test_y),
                test_loss=mean_loss(model, data.test_x, data.test_y, F.cross_entropy),
                held_out_loss=mean_loss(model, *held_out, F.cross_entropy))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    dense = build_model("resnet20", f"{DATA}/checkpoints/resnet20_cifar10.pth.tar")
    data = load_dataset("cifar10", f"{DATA}/cifar10")
    pool = CalibrationPool(*data.calibration(25 * SAMPLES, args.seed), per_stage=SAMPLES)  # as max's pool
    calibration = pool.stage(0)
    rows = []
    for method, sparsity in [("dense", 0.0), ("mp", 0.8), ("mp", 0.9), ("layer path", 0.8), ("layer path", 0.9)]:
        model = copy.deepcopy(dense) if method == "dense" else pruned(dense, method, sparsity, calibration)
        stored = batchnorm_statistics(model)
        row = dict(method=method, sparsity=sparsity, dense_statistics=measure(model, data, pool.held_out))
        batch_statistics(model, calibration[0])
        row["batch_statistics"] = measure(model, data, pool.held_out)
        model.load_state_dict({**model.state_dict(), **stored})
        recalibrate_batchnorm(model, dense, calibration[0])
        row["matched"] = measure(model, data, pool.held_out)
        rows.append(row)
        print(method, sparsity, *(f"{key}: {row[key]['test_accuracy']:.2f}% (test loss {row[key]['test_loss']:.3f}, "
                                  f"held-out loss {row[key]['held_out_loss']:.3f})"
                                  for key in ("dense_statistics", "batch_statistics", "matched")), sep="; ",
              flush=True)
    if args.json:
        write_text(args.json, json.dumps(dict(seed=args.seed, calibration_samples=SAMPLES, rows=rows), indent=1))


if __name__ == "__main__":
    main()
