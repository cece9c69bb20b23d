"""One rank of a Fisher-objective prune of a tiny MLP under torchrun (tests/test_distributed.py): the ranks share
the per-sample gradients. Rank 0 saves the masks and weights to the path given, every other rank r to that path +
'.rank<r>'."""
import argparse
import sys

import torch
from torch import nn

from brainsurgeon import distributed, prune


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval()


def calibration_of() -> tuple:
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(200, 12, generator=generator)
    return inputs, tiny_mlp()(inputs).argmax(1).detach()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", default="cbs")
    args = parser.parse_args()
    world = distributed.join(timeout=60)
    result = prune(tiny_mlp(), calibration_of(), 0.6, args.method, num_samples=200, chunk_size=32, progress=False)
    torch.save({"masks": dict(result.masks), "weights": result.weights},
               args.out if world.rank == 0 else f"{args.out}.rank{world.rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
