"""Where the layer-wise driver computes, and what of a pruned block it keeps.

Sequential onloading: with a `device`, the model stays where it is stored (its home) and each block visits the
device only while it is pruned (its calibration passes, Hessians, solves, reconstruction and propagation), so a
model larger than the device's memory can be pruned. The calibration activations live on the device, one
block's worth at a time. What the result keeps (weights, masks) goes back home with its block.
"""
import os
from contextlib import contextmanager

import torch
from torch import nn

from ..errors import BrainSurgeonError, first_line


def check_device(device, ranks: int = 1) -> torch.device | None:
    """`device` (None, a string such as 'cuda:1', or a torch.device) as a torch.device this machine can allocate
    on, or None. Under torchrun a device type without an index means this rank's local device (LOCAL_RANK)."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise BrainSurgeonError(f"device must be a string such as 'cuda:0' or a torch.device, got "
                                f"{type(device).__name__}")
    try:
        parsed = torch.device(device)
    except RuntimeError as error:
        raise BrainSurgeonError(f"device {device!r} is not a device torch knows ({first_line(error)}); pass one "
                                "such as 'cpu', 'cuda' or 'cuda:1'") from None
    if parsed.type == "meta":
        raise BrainSurgeonError("device 'meta' holds no values, so nothing can be pruned on it; pass 'cpu' or an "
                                "accelerator such as 'cuda'")
    if parsed.index is None and parsed.type != "cpu" and ranks > 1:
        parsed = torch.device(parsed.type, int(os.environ.get("LOCAL_RANK", "0")))
    try:
        torch.empty(1, device=parsed)
    except (RuntimeError, AssertionError) as error:  # AssertionError: torch built without that backend
        raise BrainSurgeonError(f"device {device!r} cannot be used on this machine ({first_line(error)}); pass a "
                                "device it has, or leave device unset to prune where the model is") from None
    return parsed


def home_device(model: nn.Module) -> torch.device:
    """The one device holding the model's parameters and buffers (sequential onloading brings each block back
    there)."""
    devices = {tensor.device for tensor in (*model.parameters(), *model.buffers())}
    if len(devices) > 1:
        raise BrainSurgeonError(f"the model is spread over {sorted(map(str, devices))}; load it on one device (the "
                                "CPU, say) and pass device=... to prune each block there in turn")
    return devices.pop() if devices else torch.device("cpu")


@contextmanager
def onloaded(block: nn.Module, device: torch.device | None, home: torch.device):
    """`block` on `device` for the duration, back at `home` afterwards, whatever happened (a no-op without a
    device, or when the two are one)."""
    if device is None or device == home:
        yield
        return
    block.to(device)
    try:
        yield
    finally:
        block.to(home)


def to_device(value, device: torch.device | None):
    """`value` (a captured call: tensors inside tuples, lists and dicts) with its tensors on `device`."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(item, device) for item in value)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    return value


class Keeping:
    """How a pruned block's weights enter the result. As copies (at home), the block's weights being restored
    afterwards so that the caller's model comes back unchanged; or, in place, as the modules' own tensors, read
    once the run is over (a block visiting a device has come home by then), with nothing kept to restore."""

    def __init__(self, in_place: bool, home: torch.device):
        self.in_place, self.home = in_place, home
        self.copies, self.modules = {}, {}

    def remember(self, originals: dict, name: str, weight: torch.Tensor) -> None:
        if not self.in_place:
            originals[name] = weight.detach().clone()

    def keep(self, modules: dict, layers: list) -> None:
        for name, full_name, _ in layers:
            if self.in_place:
                self.modules[f"{full_name}.weight"] = modules[name]
            else:
                self.copies[f"{full_name}.weight"] = modules[name].weight.detach().to(self.home, copy=True)

    def weights(self) -> dict:
        return {**self.copies, **{key: module.weight.detach() for key, module in self.modules.items()}}


def restore(modules: dict, originals: dict) -> None:
    for name, original in originals.items():
        modules[name].weight.copy_(original)
