"""Past one process: torch.distributed, launched by torchrun (gloo on CPUs, NCCL on GPUs).

Every rank runs the same prune on the same arguments. The layer-wise driver splits the calibration calls into one
contiguous shard per rank, sums each layer's X X^T (and the dense target's X_p X_d^T) over the ranks, so that
every rank holds the H one process would have, and splits a block's layer solves among the ranks by cost; each
solved layer is then broadcast by the rank that solved it. Results differ from one process's only by the order of
floating-point sums.

Every collective goes through this module: a rank that dies, or does not answer within the timeout given to
join(), ends the run on every rank with one RankFailure naming it. In one process every function here is a no-op.
"""
import datetime
import os
import re
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import BrainSurgeonError, first_line

DEFAULT_TIMEOUT = 600.0  # seconds a rank waits at a collective for the others before the run ends
_FAILED_KEY = "brainsurgeon/failed/"  # the store key each surviving rank sets when a collective fails
_ROLL_CALL_SECONDS = 3.0  # how long survivors wait for each other's keys before naming the missing ranks


class RankFailure(RuntimeError):
    """Another rank died or stopped answering: the run ends on every rank and writes nothing."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks (rank 0 of 1 without torch.distributed)."""

    rank: int = 0
    size: int = 1

    @property
    def active(self) -> bool:
        return self.size > 1

    def shard(self, items: list) -> list:
        """This rank's contiguous share of `items` (sizes differ by at most one, the earlier ranks larger)."""
        share, extra = divmod(len(items), self.size)
        start = self.rank * share + min(self.rank, extra)
        return items[start : start + share + (self.rank < extra)]


def launched() -> bool:
    """Whether torchrun (or the same environment variables) started this process as one of several ranks."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def join(timeout: float = DEFAULT_TIMEOUT) -> World:
    """Join the process group torchrun describes in the environment, once (a no-op in one process, or when the
    caller already joined one): gloo on CPUs, NCCL when every rank has a GPU. `timeout` bounds every collective."""
    if launched() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        try:
            dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout))
        except Exception as error:  # torchrun's rendezvous: a missing rank, a port in use
            raise RankFailure(f"could not join the other ranks ({first_line(error)[:200]}); start every rank with "
                              "the same torchrun command") from None
    return world()


def world() -> World:
    """The ranks this process runs among: those of the default process group, when one is joined."""
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size())
    return World()


def sum_across_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` summed over the ranks, in place (unchanged in one process)."""
    if world().active:
        _collective(dist.all_reduce, tensor, op=dist.ReduceOp.SUM)
    return tensor


def sum_all_across_ranks(tensors: list) -> list:
    """Each of `tensors` summed over the ranks, in one collective: new float64 tensors of the same shapes (the
    tensors themselves, unchanged, in one process)."""
    if not world().active:
        return list(tensors)
    total = sum_across_ranks(torch.cat([tensor.double().reshape(-1) for tensor in tensors]))
    return [part.reshape(tensor.shape) for part, tensor in
            zip(total.split([tensor.numel() for tensor in tensors]), tensors)]


def broadcast_tensor(tensor: torch.Tensor, source: int) -> torch.Tensor:
    """Rank `source`'s `tensor` on every rank, in place (a bool tensor travels as bytes)."""
    if not world().active:
        return tensor
    if tensor.dtype == torch.bool:
        carried = tensor.to(torch.uint8)
        _collective(dist.broadcast, carried, src=source)
        tensor.copy_(carried.bool())
    else:
        _collective(dist.broadcast, tensor, src=source)
    return tensor


def broadcast_object(value, source: int):
    """Rank `source`'s picklable `value` on every rank (only this library's own figures: never user data)."""
    if not world().active:
        return value
    carried = [value]
    _collective(dist.broadcast_object_list, carried, src=source)
    return carried[0]


def gather_objects(value) -> list:
    """Every rank's `value`, in rank order."""
    if not world().active:
        return [value]
    gathered = [None] * world().size
    _collective(dist.all_gather_object, gathered, value)
    return gathered


def agree(failure: Exception | None, fingerprint) -> None:
    """The ranks check their arguments before any work, and all go on or all stop: a rank raises its own
    `failure` (None where its checks passed), the others the first failing rank's; arguments that differ between
    ranks (`fingerprint`, {what: value} that must be equal on every rank) are refused."""
    if not world().active:
        if failure is not None:
            raise failure
        return
    reports = gather_objects((None if failure is None else str(failure), fingerprint))
    if failure is not None:
        raise failure
    for rank, (error, _) in enumerate(reports):
        if error is not None:
            raise BrainSurgeonError(f"rank {rank} refused the run: {error}")
    for rank, (_, other) in enumerate(reports):
        if other != reports[0][1]:
            raise BrainSurgeonError(f"rank {rank} was given other arguments or calibration data than rank 0 "
                                    f"({_difference(reports[0][1], other)}); start every rank with the same command")


def fingerprint(arguments: dict, model: torch.nn.Module, tensors) -> dict | None:
    """What must be the same on every rank, for agree(): the arguments (as reprs), the model's weights and the
    calibration `tensors` (as sums); None in one process, where nothing is compared."""
    if not world().active:
        return None
    with torch.no_grad():
        weights = sum(float(value.double().sum()) for value in model.state_dict().values() if value.is_floating_point())
        data = [float(value.double().sum()) for value in tensors if isinstance(value, torch.Tensor)]
    return {**{name: repr(value) for name, value in arguments.items()}, "the model's weights (summed)": weights,
            "the calibration (tensors, summed)": (len(data), sum(data))}


def _difference(first: dict, other: dict) -> str:
    names = sorted(name for name in set(first) | set(other) if first.get(name) != other.get(name))
    return ", ".join(f"{name}: {first.get(name)!r} against {other.get(name)!r}" for name in names[:3])


def _collective(operation, *args, **kwargs) -> None:
    try:
        operation(*args, **kwargs)
    except Exception as error:  # gloo and NCCL raise RuntimeError or DistBackendError, with many lines
        reason = re.sub(r"^\[[^\]]*\]\s*", "", first_line(error))[:160]  # without gloo's source location
        missing = _missing_ranks()
        if not missing:
            raise RankFailure(f"a collective failed on every rank ({reason}); the run ends on every rank and "
                              "writes nothing") from None
        raise RankFailure(f"{'rank' if len(missing) == 1 else 'ranks'} {', '.join(map(str, missing))} stopped "
                          f"answering ({reason}); the run ends on every rank and writes nothing") from None


def _missing_ranks() -> list:
    """Which ranks failed: every survivor sets a key in the store, so the ranks without one (or the store's host,
    rank 0, when the store itself is gone) are the ones that died or hang."""
    here = world()
    others = [rank for rank in range(here.size) if rank != here.rank]
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{_FAILED_KEY}{here.rank}", "alive")
        deadline = time.monotonic() + _ROLL_CALL_SECONDS
        missing = others
        while missing and time.monotonic() < deadline:
            missing = [rank for rank in missing if not store.check([f"{_FAILED_KEY}{rank}"])]
            time.sleep(0.1)
        return missing
    except Exception:  # the store lived with the rank that died
        return [0] if here.rank != 0 else others
