"""Sparsity patterns of one weight matrix (rows = outputs, columns = inputs), each with exact counts:
unstructured per layer, per output row, and N:M (N zeros in every group of M consecutive inputs)."""
import re
from dataclasses import dataclass

import torch

from .. import validation
from ..errors import BrainSurgeonError
from .problem import Segment


def num_to_prune(sparsity: float, size: int) -> int:
    """round(s * size) with halves rounded up, the same on every platform: every exact count in the library."""
    return int(sparsity * size + 0.5)


@dataclass(frozen=True)
class Pattern:
    kind: str  # "layer", "row" or "nm"
    sparsity: float
    n: int = 0  # N:M only
    m: int = 0

    @classmethod
    def parse(cls, pattern: str, sparsity=None) -> "Pattern":
        """'layer' or 'row' with a sparsity, or 'N:M' (its sparsity is N/M; a sparsity given must agree)."""
        if not isinstance(pattern, str):
            raise BrainSurgeonError(f"pattern must be 'layer', 'row' or 'N:M', got {pattern!r}")
        found = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
        if found:
            n, m = int(found[1]), int(found[2])
            if not 0 < n < m:
                raise BrainSurgeonError(f"pattern {pattern}: need 0 < N < M (N zeros in every M inputs), e.g. 2:4")
            if sparsity is not None and abs(validation.sparsity(sparsity) - n / m) > 1e-9:
                raise BrainSurgeonError(f"pattern {pattern} prunes {n / m:g} of the weights, not {sparsity}; "
                                        f"pass sparsity={n / m:g} or leave it out")
            return cls("nm", n / m, n, m)
        if pattern not in ("layer", "row"):
            raise BrainSurgeonError(f"unknown pattern {pattern!r}; use 'layer', 'row' or 'N:M' such as 2:4")
        if sparsity is None:
            raise BrainSurgeonError(f"pattern {pattern!r} needs a sparsity")
        return cls(pattern, validation.sparsity(sparsity))

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.kind} {self.sparsity:g}"

    def check_shape(self, rows: int, cols: int, what: str) -> None:
        if self.kind == "nm" and cols % self.m:
            raise BrainSurgeonError(f"{what}: {cols} inputs do not split into groups of {self.m} for {self.name}")
        total = rows * cols
        if self.count(total) >= total or (self.kind == "row" and self.row_counts(rows, cols).max() >= cols):
            raise BrainSurgeonError(f"{what}: sparsity {self.sparsity:g} would prune every weight; lower it")

    def count(self, total: int) -> int:
        return num_to_prune(self.sparsity, total)

    def row_counts(self, rows: int, cols: int) -> torch.Tensor:
        """Per-row counts adding up to exactly round(s * rows * cols): the first rows take the remainder."""
        total = self.count(rows * cols)
        return total // rows + (torch.arange(rows) < total % rows).long()

    def segments(self, rows: int, cols: int) -> list:
        """The pattern as the Fisher methods' budget over the row-major flat weights: one Segment for the layer,
        one per output row, or one per group of M inputs."""
        if self.kind == "layer":
            return [Segment(slice(0, rows * cols), self.count(rows * cols))]
        if self.kind == "row":
            return [Segment(slice(r * cols, (r + 1) * cols), int(count))
                    for r, count in enumerate(self.row_counts(rows, cols))]
        return [Segment(slice(start, start + self.m), self.n) for start in range(0, rows * cols, self.m)]

    def as_rows(self) -> "Pattern":
        """The same budget compared within each output row (Wanda's grouping); N:M already is."""
        return Pattern("row", self.sparsity) if self.kind == "layer" else self

    def prune_lowest(self, scores: torch.Tensor, start: int = 0, stop: int | None = None,
                     cols: int | None = None) -> torch.Tensor:
        """Boolean pruned mask of `scores` (rows x width), the lowest of each group, ties by position.

        `scores` may be the columns [start, stop) of a matrix of `cols` columns (SparseGPT's blocks): the counts
        are then that block's share, so that the blocks of a matrix add up to its exact count.
        """
        rows, width = scores.shape
        cols = width if cols is None else cols
        stop = start + width if stop is None else stop
        if self.kind == "nm":
            return _lowest_per_group(scores, self.n, self.m)
        if self.kind == "row":
            per_row = self.row_counts(rows, cols)
            counts = _share(per_row, start, stop, cols)
            return _lowest_per_row(scores, counts)
        count = int(_share(torch.tensor([self.count(rows * cols)]), start * rows, stop * rows, cols * rows))
        return _lowest_overall(scores, count)


def _share(counts: torch.Tensor, start: int, stop: int, total: int) -> torch.Tensor:
    """The part of each count that falls on [start, stop) of `total` positions, rounded so parts add up."""
    def upto(position):
        return torch.floor(counts.double() * position / total + 0.5).long()
    return upto(stop) - upto(start)


def _lowest_overall(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` lowest, ties at the threshold taken by position: what a stable sort gives, in linear time."""
    flat = scores.reshape(-1)
    if count == 0:
        return torch.zeros(scores.shape, dtype=torch.bool)
    threshold = torch.kthvalue(flat, count).values
    pruned = flat < threshold
    ties = torch.nonzero(flat == threshold).squeeze(1)[: count - int(pruned.sum())]
    pruned[ties] = True
    return pruned.view(scores.shape)


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its last dimension (0 = lowest), ties broken by position."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    return ranks


def _lowest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return _ranks(scores) < counts.unsqueeze(1)


def _lowest_per_group(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, width = scores.shape
    return (_ranks(scores.reshape(rows, width // m, m)) < n).reshape(rows, width)
