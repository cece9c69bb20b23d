"""The pruning budget on the Fisher objective: how many weights each segment prunes, exact per-layer shares of a
global count, and magnitude pruning to a sparsity."""
import torch

from ..errors import BrainSurgeonError
from ..methods.patterns import num_to_prune
from ..methods.problem import Segment, prune_lowest


def make_segments(layers, sparsity: float, scope: str):
    """The pruning budget: one segment over all layers (global) or one per layer, each to prune round(s * n)
    of its n weights less those a torch.nn.utils.prune mask has pruned already; none may be emptied."""
    if scope == "global":
        groups = [(f"all {sum(l.numel for l in layers)} prunable weights", layers)]
    elif scope == "layer":
        groups = [(f"all {layer.numel} weights of {layer.name}", [layer]) for layer in layers]
    else:
        raise BrainSurgeonError(f"unknown scope '{scope}'; use 'global' or 'layer'")
    segments = []
    for what, members in groups:
        region = slice(members[0].slice.start, members[-1].slice.stop)
        count = num_to_prune(sparsity, sum(l.numel for l in members)) - sum(l.already_pruned for l in members)
        if count >= region.stop - region.start:
            raise BrainSurgeonError(f"sparsity {sparsity} would prune {what}, leaving nothing; "
                                    "lower the sparsity (the exact count is round(s * p))")
        if count < 0:
            raise BrainSurgeonError(f"{what}: masks already prune more than sparsity {sparsity}; ask for at least "
                                    f"{1 - (region.stop - region.start) / sum(l.numel for l in members):.4f}")
        segments.append(Segment(region, count))
    return segments


def magnitude_pruned(flat: torch.Tensor, layers, sparsity: float, scope: str) -> torch.Tensor:
    """`flat` with each segment's smallest weights (by magnitude) zeroed to `sparsity`."""
    pruned = flat.clone()
    pruned[prune_lowest(flat.abs(), make_segments(layers, sparsity, scope))] = 0.0
    return pruned


def exact_layer_sparsities(layers, sparsity: float) -> dict:
    """Per-layer sparsities whose exact counts add up to the global count: each layer's share, the remainders
    given to the largest fractional parts (ties by order)."""
    sizes = [layer.size for layer in layers]
    total = num_to_prune(sparsity, sum(sizes))
    shares = [sparsity * size for size in sizes]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: counts[i] - shares[i])
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return {layer.module: count / size for layer, count, size in zip(layers, counts, sizes)}
