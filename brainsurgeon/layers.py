"""Which weights are prunable, and how they map onto one flat vector of length p."""
import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .errors import BrainSurgeonError

DEFAULT_TYPES = ("Linear",)


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable weight tensor and its place [offset, offset + size) in the flat vector."""

    module: str
    shape: tuple
    offset: int

    @property
    def param(self) -> str:
        return f"{self.module}.weight" if self.module else "weight"

    @property
    def size(self) -> int:
        return int(torch.Size(self.shape).numel())

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


def _matches(name: str, module: nn.Module, patterns) -> bool:
    """A pattern matches a module type name exactly, or the module name as a regex search."""
    kind = type(module).__name__
    return any(pattern == kind or re.search(pattern, name) for pattern in patterns)


def find_prunable(model: nn.Module, include=None, ignore=()):
    """Return (prunable layers, {module name: why it stays dense}) for every module with a weight.

    `include`: module-type names or regexes on module names (default: the model's `default_prunable`
    if it has one, else every nn.Linear); `ignore`: the same kind of patterns, applied after `include`.
    """
    include = list(include or getattr(model, "default_prunable", DEFAULT_TYPES))
    layers, dense, offset = [], {}, 0
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter):
            continue
        if not _matches(name, module, include):
            dense[name] = f"{type(module).__name__} not matched by include={include}"
        elif ignore and _matches(name, module, ignore):
            dense[name] = f"matched by ignore={list(ignore)}"
        else:
            layers.append(PrunableLayer(name, tuple(weight.shape), offset))
            offset += weight.numel()
    if not layers:
        raise BrainSurgeonError(
            f"no prunable layers in {type(model).__name__}: nothing matches include={include}"
            f"{f' minus ignore={list(ignore)}' if ignore else ''}; pass include=[...] with module names or types"
        )
    return layers, dense


def flat_weights(model: nn.Module, layers) -> torch.Tensor:
    params = dict(model.named_parameters())
    return torch.cat([params[layer.param].detach().reshape(-1) for layer in layers])


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (BatchNorm on running statistics, no dropout) for the block, then every module's own mode
    back: a model handed over with some modules training and others not comes back the same."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
