"""One rank of a layer-wise prune of a tiny Llama under torchrun (tests/test_distributed.py): rank 0 saves the
masks and weights to the path given, with the ranks' count, and every other rank r to that path + '.rank<r>'.
With --die-at-block K, rank 1 exits when block K first runs (its H is being recorded), as a crashed rank would;
with --differ, each rank has other calibration data."""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from helpers import tiny_llama  # noqa: E402

from brainsurgeon import distributed  # noqa: E402
from brainsurgeon.drivers.sequential import prune_layerwise  # noqa: E402


def calibration_of(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(seed))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--method", default="sparsegpt")
    parser.add_argument("--pattern", default="2:4")
    parser.add_argument("--target", default="layer")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--die-at-block", type=int)
    parser.add_argument("--differ", action="store_true")
    parser.add_argument("--reconstruct", default="none")
    args = parser.parse_args()
    world = distributed.join(timeout=args.timeout)
    model = tiny_llama(layers=4, hidden=64)
    calibration = calibration_of(world.rank if args.differ else 0)
    if args.die_at_block is not None and world.rank == 1:
        model.model.layers[args.die_at_block].register_forward_hook(lambda *_: os._exit(9))
    try:
        result = prune_layerwise(model, calibration, 0.5, args.method, pattern=args.pattern, target=args.target,
                                 reconstruct=args.reconstruct, batch_size=2, progress=False)
    except Exception as error:  # what the command line prints: one line
        print(f"rank {world.rank}: {type(error).__name__}: {error}", file=sys.stderr)
        return 3
    torch.save({"masks": dict(result.masks), "weights": result.weights, "ranks": result.settings["ranks"],
                "reconstruction": result.stats.get("reconstruction")},
               args.out if world.rank == 0 else f"{args.out}.rank{world.rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
