"""Where the layer-wise driver computes (device and dtype), and what of a pruned block it keeps.

Sequential onloading: with a `device`, the model stays where it is stored (its home) and each block visits the
device only while it is pruned (its calibration passes, Hessians, solves, reconstruction and propagation), so a
model larger than the device's memory can be pruned. The calibration activations live on the device, one
block's worth at a time. What the result keeps (weights, masks) goes back home with its block.

Work that needs float32 weights (the block fit's Adam steps) runs on a float32 copy of a block stored in bfloat16
or float16, and the fitted weights are rounded back into the storage dtype.
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
    return value if device is None else _each_tensor(value, lambda tensor: tensor.to(device))


def as_float32(value):
    """`value` (captured calls, targets: tensors inside tuples, lists and dicts) with its floating tensors in
    float32 (the others, such as positions, as they are)."""
    return _each_tensor(value, lambda tensor: tensor.float() if tensor.is_floating_point() else tensor)


def _each_tensor(value, convert):
    if isinstance(value, torch.Tensor):
        return convert(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_each_tensor(item, convert) for item in value)
    if isinstance(value, dict):
        return {key: _each_tensor(item, convert) for key, item in value.items()}
    return value


@contextmanager
def in_float32(module: nn.Module):
    """`module`'s parameters and buffers in float32 for the duration; afterwards each goes back to its own dtype
    (a bfloat16 Llama keeps float32 rotary frequencies, which a blanket .to(bfloat16) would round)."""
    dtypes = {name: tensor.dtype for name, tensor in [*module.named_parameters(), *module.named_buffers()]}
    if all(dtype == torch.float32 or not dtype.is_floating_point for dtype in dtypes.values()):
        yield
        return
    module.float()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, param in module.named_parameters():
                param.data = param.data.to(dtypes[name])
            for name, buffer in list(module.named_buffers()):
                owner, _, attr = name.rpartition(".")
                setattr(module.get_submodule(owner), attr, buffer.to(dtypes[name]))


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
