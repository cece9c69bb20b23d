"""Scale check: prune a synthetic conv net with >= 10 million prunable weights, Fisher blocks of 10,000
weights and 256 per-sample gradients, within an 8 GiB budget; prints time and peak resident memory.

    .venv/bin/python benchmarks/scale_check.py [--method cbs] [--structure block:10000] [--samples 256]
"""
import argparse
import json
import time

import torch
from torch import nn

import brainsurgeon
from brainsurgeon.bench import peak_memory_bytes, reset_peak_memory


def synthetic_convnet() -> nn.Module:
    """3x8x8 inputs; two wide 3x3 convolutions hold 10,027,008 prunable weights."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(),
        nn.Conv2d(256, 1024, 3, padding=1, bias=False), nn.BatchNorm2d(1024), nn.ReLU(),
        nn.Conv2d(1024, 832, 3, padding=1, bias=False), nn.BatchNorm2d(832), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(832, 10),
    ).eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="cbs")
    parser.add_argument("--structure", default="block:10000")
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--sparsity", type=float, default=0.9)
    parser.add_argument("--max-memory-gb", type=float, default=8.0)
    args = parser.parse_args()
    model = synthetic_convnet()
    inputs, targets = torch.randn(args.samples, 3, 8, 8), torch.randint(0, 10, (args.samples,))
    reset_peak_memory()
    start = time.perf_counter()
    result = brainsurgeon.prune(model, (inputs, targets), args.sparsity, args.method, structure=args.structure,
                                include=[r"^[36]$"], max_memory=args.max_memory_gb * 2**30)
    print(json.dumps({
        "method": result.settings["method"], "structure": args.structure, "samples": args.samples,
        "prunable_weights": result.num_weights, "pruned": result.num_pruned, "gradients": result.settings["gradients"],
        "seconds": round(time.perf_counter() - start, 1), "timings": result.timings,
        "peak_rss_gib": round(peak_memory_bytes() / 2**30, 2),
    }, indent=2))


if __name__ == "__main__":
    main()
