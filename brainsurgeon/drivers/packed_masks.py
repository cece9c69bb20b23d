"""PackedMasks: a result's {weight name: bool mask} held at one bit per weight.

A torch bool tensor spends a byte per weight: half of a bfloat16 model's storage again, for the masks of every
pruned layer, held until the run ends. Packed eight to a byte they cost 1/16 of bfloat16 storage, so the prune's
peak memory grows with the model's storage and one block, not with a mask per weight. Reading a mask unpacks a
bool tensor of the stored shape, on the device it came from.
"""
from collections.abc import MutableMapping

import torch

_BITS = 8


def _shifts(device) -> torch.Tensor:
    return torch.arange(_BITS, dtype=torch.uint8, device=device)


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor's entries, flattened, eight to a uint8 (the first in the lowest bit; the last byte padded with
    zeros)."""
    flat = mask.detach().reshape(-1).to(torch.uint8)
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % _BITS))
    return (padded.view(-1, _BITS) << _shifts(mask.device)).sum(1, dtype=torch.uint8)


def unpack(packed: torch.Tensor, shape) -> torch.Tensor:
    """The bool tensor of `shape` that `pack` made `packed` from."""
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.view(-1)[: torch.Size(shape).numel()].bool().view(shape)


class PackedMasks(MutableMapping):
    """A dict of bool masks stored packed: setting an item packs it, getting one unpacks a fresh tensor (changing
    that tensor changes nothing stored; set it back)."""

    def __init__(self, masks=None):
        self._packed = {}
        self.update(masks or {})

    def __setitem__(self, name: str, mask: torch.Tensor) -> None:
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask {name!r} must be a bool tensor, not {getattr(mask, 'dtype', type(mask).__name__)}")
        self._packed[name] = (pack(mask), tuple(mask.shape))

    def __getitem__(self, name: str) -> torch.Tensor:
        packed, shape = self._packed[name]
        return unpack(packed, shape)

    def __delitem__(self, name: str) -> None:
        del self._packed[name]

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)

    def shape(self, name: str) -> tuple:
        return self._packed[name][1]

    def __repr__(self) -> str:
        return f"PackedMasks({ {name: shape for name, (_, shape) in self._packed.items()} })"
