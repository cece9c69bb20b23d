"""Per-layer sparsities from a global one, with the global count exact."""
from ..methods.budget import num_to_prune


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
