"""The pruning budget, one type for both objectives: how many weights to prune, and where, with exact counts.

A `Budget` is one of
  global   one count over all the prunable weights (the Fisher objective's default; a single matrix: 'layer')
  layer    the sparsity in each layer (each matrix)
  row      the sparsity in each output row
  N:M      N zeros in every group of M consecutive inputs of each row (sparsity N/M)
It has two views: `segments_over(layers)`, the Fisher methods' segments of the flat vector of many layers, and
`prune_lowest(scores)` on one matrix (rows = outputs, columns = inputs), the layer-wise methods'. `lowest` and
`smallest_magnitude` are the one rule every method's pruned set follows: the lowest scores of each segment, ties
by position."""
import re
from dataclasses import dataclass

import torch

from .. import validation
from ..errors import BrainSurgeonError

KINDS = ("global", "layer", "row")
PAIRWISE_MAX_GROUP = 8  # N:M groups up to this size are ranked by pairwise comparisons, larger ones by a sort
SELECTION_SAMPLE = 4096  # a strided sample of about this many entries brackets the threshold of a large selection
SELECTION_MARGIN = 0.02  # the bracket: the sample's quantiles this far either side of the pruned fraction


def num_to_prune(sparsity: float, size: int) -> int:
    """round(s * size) with halves rounded up, the same on every platform: every exact count in the library."""
    return int(sparsity * size + 0.5)


@dataclass(frozen=True)
class Segment:
    """Prune exactly `count` weights inside flat[region]."""

    region: slice
    count: int


@dataclass(frozen=True)
class Budget:
    kind: str  # "global", "layer", "row" or "nm"
    sparsity: float
    n: int = 0  # N:M only
    m: int = 0

    @classmethod
    def parse(cls, pattern: str, sparsity=None) -> "Budget":
        """'global', 'layer' or 'row' with a sparsity, or 'N:M' (its sparsity is N/M; a sparsity given must
        agree)."""
        if not isinstance(pattern, str):
            raise BrainSurgeonError(f"pattern must be 'global', 'layer', 'row' or 'N:M', got {pattern!r}")
        found = re.fullmatch(r"(\d+):(\d+)", pattern.strip())
        if found:
            n, m = int(found[1]), int(found[2])
            if not 0 < n < m:
                raise BrainSurgeonError(f"pattern {pattern}: need 0 < N < M (N zeros in every M inputs), e.g. 2:4")
            if sparsity is not None and abs(validation.sparsity(sparsity) - n / m) > 1e-9:
                raise BrainSurgeonError(f"pattern {pattern} prunes {n / m:g} of the weights, not {sparsity}; "
                                        f"pass sparsity={n / m:g} or leave it out")
            return cls("nm", n / m, n, m)
        if pattern not in KINDS:
            raise BrainSurgeonError(f"unknown pattern {pattern!r}; use 'global', 'layer', 'row' or 'N:M' such as 2:4")
        if sparsity is None:
            raise BrainSurgeonError(f"sparsity must be in [0, 1), got None (pattern {pattern!r} needs a sparsity; "
                                    "only N:M sets its own)")
        return cls(pattern, validation.sparsity(sparsity))

    @property
    def name(self) -> str:
        return f"{self.n}:{self.m}" if self.kind == "nm" else f"{self.kind} {self.sparsity:g}"

    @property
    def pattern(self) -> str:
        """The pattern's name as `parse` takes it."""
        return f"{self.n}:{self.m}" if self.kind == "nm" else self.kind

    def check_shape(self, rows: int, cols: int, what: str) -> None:
        if self.kind == "nm" and cols % self.m:
            raise BrainSurgeonError(f"{what}: {cols} inputs do not split into groups of {self.m} for {self.name}")
        total = rows * cols
        widest_row = self.row_counts(rows, cols, device="cpu").max() if self.kind == "row" else 0
        if self.count(total) >= total or widest_row >= cols:
            raise BrainSurgeonError(f"{what}: sparsity {self.sparsity:g} would prune every weight; lower it")

    def count(self, total: int) -> int:
        return num_to_prune(self.sparsity, total)

    def row_counts(self, rows: int, cols: int, device=None) -> torch.Tensor:
        """Per-row counts adding up to exactly round(s * rows * cols): the first rows take the remainder."""
        total = self.count(rows * cols)
        return total // rows + (torch.arange(rows, device=device) < total % rows).long()

    def segments(self, rows: int, cols: int, offset: int = 0) -> list:
        """The budget of one matrix over its row-major flat weights (from `offset`): one Segment for the matrix,
        one per output row, or one per group of M inputs."""
        if self.kind in ("global", "layer"):
            return [Segment(slice(offset, offset + rows * cols), self.count(rows * cols))]
        if self.kind == "row":
            return [Segment(slice(offset + r * cols, offset + (r + 1) * cols), int(count))
                    for r, count in enumerate(self.row_counts(rows, cols, device="cpu"))]
        return [Segment(slice(start, start + self.m), self.n) for start in range(offset, offset + rows * cols, self.m)]

    def segments_over(self, layers) -> list:
        """The budget over the flat vector of several layers (each with `slice`, `shape`, `name`, `numel` and
        `already_pruned`: the masks torch.nn.utils.prune attached count as pruned). None may be emptied."""
        if self.kind == "global":
            return [_counted(f"all {sum(layer.numel for layer in layers)} prunable weights", layers, self.sparsity)]
        if self.kind == "layer":
            return [_counted(f"all {layer.numel} weights of {layer.name}", [layer], self.sparsity) for layer in layers]
        segments = []
        for layer in layers:
            if layer.already_pruned:
                raise BrainSurgeonError(f"{layer.name} carries a torch.nn.utils.prune mask; pattern {self.pattern} "
                                        "needs whole rows: remove the mask, or use pattern 'global' or 'layer'")
            rows = layer.shape[0]
            self.check_shape(rows, layer.numel // rows, layer.name)
            segments += self.segments(rows, layer.numel // rows, layer.slice.start)
        return segments

    def as_rows(self) -> "Budget":
        """The same budget compared within each output row (Wanda's grouping); N:M already is."""
        return Budget("row", self.sparsity) if self.kind in ("global", "layer") else self

    def prune_lowest(self, scores: torch.Tensor, start: int = 0, stop: int | None = None,
                     cols: int | None = None) -> torch.Tensor:
        """Boolean pruned mask of one matrix's `scores` (rows x width), the lowest of each group, ties by position.

        `scores` may be the columns [start, stop) of a matrix of `cols` columns (SparseGPT's blocks): the counts
        are then that block's share, so that the blocks of a matrix add up to its exact count.
        """
        rows, width = scores.shape
        cols = width if cols is None else cols
        stop = start + width if stop is None else stop
        if self.kind == "nm":
            return _lowest_per_group(scores, self.n, self.m)
        if self.kind == "row":
            per_row = self.row_counts(rows, cols, scores.device)
            counts = _share(per_row, start, stop, cols)
            return _lowest_per_row(scores, counts)
        total = torch.tensor([self.count(rows * cols)], device=scores.device)
        count = int(_share(total, start * rows, stop * rows, cols * rows))
        return _lowest_overall(scores, count)


def _counted(what: str, members, sparsity: float) -> Segment:
    region = slice(members[0].slice.start, members[-1].slice.stop)
    count = num_to_prune(sparsity, sum(layer.numel for layer in members)) - sum(l.already_pruned for l in members)
    if count >= region.stop - region.start:
        raise BrainSurgeonError(f"sparsity {sparsity} would prune {what}, leaving nothing; "
                                "lower the sparsity (the exact count is round(s * p))")
    if count < 0:
        raise BrainSurgeonError(f"{what}: masks already prune more than sparsity {sparsity}; ask for at least "
                                f"{1 - (region.stop - region.start) / sum(l.numel for l in members):.4f}")
    return Segment(region, count)


def lowest(scores: torch.Tensor, segments) -> torch.Tensor:
    """Boolean mask of the `count` lowest of the flat `scores` in each segment, ties broken by position. Equal
    segments that tile a region (rows, N:M groups) are ranked together in one sort."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    for first, last in _tiling_runs(segments):
        run = segments[first:last]
        width = run[0].region.stop - run[0].region.start
        if len(run) > 1:
            region = slice(run[0].region.start, run[-1].region.stop)
            counts = torch.tensor([segment.count for segment in run], device=scores.device)
            pruned[region] = _lowest_per_row(scores[region].view(len(run), width), counts).reshape(-1)
            continue
        segment = run[0]
        order = torch.sort(scores[segment.region], stable=True).indices[: segment.count]
        pruned[segment.region][order] = True
    return pruned


def _tiling_runs(segments) -> list:
    """[first, last) index ranges of consecutive segments of one width, each starting where the one before ends."""
    runs, first = [], 0
    for k in range(1, len(segments) + 1):
        if k == len(segments) or not (
                segments[k].region.start == segments[k - 1].region.stop
                and segments[k].region.stop - segments[k].region.start
                == segments[first].region.stop - segments[first].region.start):
            runs.append((first, k))
            first = k
    return runs


def smallest_magnitude(weights: torch.Tensor, segments) -> torch.Tensor:
    """Magnitude pruning, the one implementation: the pruned mask of the smallest |w| in each segment."""
    return lowest(weights.abs(), segments)


def _share(counts: torch.Tensor, start: int, stop: int, total: int) -> torch.Tensor:
    """The part of each count that falls on [start, stop) of `total` positions, rounded so parts add up."""
    def upto(position):
        return torch.floor(counts.double() * position / total + 0.5).long()
    return upto(stop) - upto(start)


def _lowest_overall(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` lowest, ties at the threshold taken by position: what a stable sort gives, in linear time. The
    threshold is selected among the entries between two quantiles of a strided sample around it (an exact
    selection whenever it falls there, and a whole selection otherwise): ADMM projects onto this every iteration."""
    flat = scores.reshape(-1)
    if count == 0:
        return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    threshold = _kth_lowest(flat, count)
    pruned = flat < threshold
    missing = count - int(pruned.sum())
    if missing:
        pruned[torch.nonzero(flat == threshold).squeeze(1)[:missing]] = True
    return pruned.view(scores.shape)


def _kth_lowest(flat: torch.Tensor, count: int) -> torch.Tensor:
    total = flat.numel()
    if total >= 8 * SELECTION_SAMPLE:
        sample = flat[:: total // SELECTION_SAMPLE].float()
        fraction = count / total
        bounds = torch.tensor([max(0.0, fraction - SELECTION_MARGIN), min(1.0, fraction + SELECTION_MARGIN)],
                              device=flat.device)
        low, high = torch.quantile(sample, bounds).to(flat.dtype)
        below = int((flat < low).sum())
        inside = flat[(flat >= low) & (flat <= high)]
        if below < count <= below + inside.numel():
            return torch.kthvalue(inside, count - below).values
    return torch.kthvalue(flat, count).values


def _ranks(scores: torch.Tensor) -> torch.Tensor:
    """Rank of every entry within its last dimension (0 = lowest), ties broken by position."""
    order = torch.sort(scores, dim=-1, stable=True).indices
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order).contiguous())
    return ranks


def _lowest_per_row(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return _ranks(scores) < counts.unsqueeze(1)


def _lowest_per_group(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    rows, width = scores.shape
    if m > PAIRWISE_MAX_GROUP:
        return (_ranks(scores.reshape(rows, width // m, m)) < n).reshape(rows, width)
    # m contiguous rows of one entry per group; a rank is how many of the group's entries sort before it, which
    # for small m is faster than sorting millions of tiny groups (ADMM projects onto N:M every iteration)
    by_position = scores.reshape(-1, m).t().contiguous()
    ranks = torch.zeros(by_position.shape, dtype=torch.uint8, device=scores.device)
    for j in range(m):
        before = by_position[j] < by_position
        before[j + 1:] |= by_position[j] == by_position[j + 1:]
        ranks += before
    return (ranks < n).t().reshape(rows, width)
