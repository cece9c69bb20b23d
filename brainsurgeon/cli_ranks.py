"""The command line under torchrun: every rank runs the command, rank 0 alone writes (issue 25)."""
import torch.distributed as dist

from . import distributed, validation
from .cli_structured import STRUCTURED_PATTERNS
from .errors import BrainSurgeonError

# The layer-wise driver shares its calibration and solves among the ranks, the Fisher objective its per-sample
# gradients (curvature/fisher.py).
SHARED_COMMANDS = ("prune", "bench")
OUTPUT_FLAGS = ("json", "plot", "report")  # written by rank 0 alone (prune's folder too: cli_lm)


def start_ranks(args) -> distributed.World:
    """Join the other ranks when torchrun started several; refuse a command that does not share its work, and
    leave every output to rank 0."""
    if not distributed.launched():
        if getattr(args, "rank_timeout", None) is not None:
            raise BrainSurgeonError("--rank-timeout applies under torchrun (several ranks); drop it")
        return distributed.world()
    structured = getattr(args, "pattern", None) in STRUCTURED_PATTERNS
    if args.command not in SHARED_COMMANDS or structured:
        raise BrainSurgeonError(f"under torchrun, brainsurgeon runs {' and '.join(SHARED_COMMANDS)}, pruning weights "
                                "(not a structured --pattern); run this in one process (brainsurgeon, without "
                                "torchrun)")
    timeout = distributed.DEFAULT_TIMEOUT if args.rank_timeout is None else args.rank_timeout
    world = distributed.join(validation.number("--rank-timeout", timeout, low=0, low_open=True, high=86400))
    if world.rank != 0:
        for flag in OUTPUT_FLAGS:
            if getattr(args, flag, None) is not None:
                setattr(args, flag, None)
        args.quiet = True  # one progress display: rank 0's
    return world


def end_ranks() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
