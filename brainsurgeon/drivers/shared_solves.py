"""A block's layer solves split among the ranks of torch.distributed (issue 25).

The layers of a block are independent problems once their H are summed over the ranks. Each goes to one rank by
longest-processing-time-first on its cost: the seconds the same layer of the previous block took (the blocks
repeat), or for the first block an estimate, rows x cols^2 + cols^3 (the solves' products with H and its
factorisation). The rank that solved a layer broadcasts its mask, weights and figures, so that every rank
holds the same pruned block before the next one. In one process every layer is this rank's and nothing moves.
"""
import torch

from ..distributed import World, broadcast_object, broadcast_tensor


def longest_first(costs: list, ranks: int) -> list:
    """The rank each job goes to: the costliest first, each to the least loaded rank (the lowest on a tie)."""
    loads, owners = [0.0] * ranks, [0] * len(costs)
    for job in sorted(range(len(costs)), key=lambda job: (-costs[job], job)):
        owners[job] = min(range(ranks), key=lambda rank: (loads[rank], rank))
        loads[owners[job]] += costs[job]
    return owners


class SharedSolves:
    """Who solves which layer of a block, and the results passed to every rank."""

    def __init__(self, world: World):
        self.world = world
        self.measured = {}  # the layer's name within its block -> seconds its last solve took

    def owners(self, layers: list, modules: dict) -> list:
        """The rank that solves each of `layers` [(module name, full name, pattern)]."""
        if not self.world.active:
            return [self.world.rank] * len(layers)
        costs = [self.measured.get(name, _estimate(modules[name].weight)) for name, _, _ in layers]
        return longest_first(costs, self.world.size)

    def share(self, layers: list, owners: list, modules: dict, masks: dict, stats: dict) -> None:
        """Every layer's mask, weights (into its module) and figures from the rank that solved it, on every rank;
        the solve's seconds become the layer's cost for the next block."""
        for (name, full_name, _), owner in zip(layers, owners):
            key, module = f"{full_name}.weight", modules[name]
            if self.world.active:
                here = owner == self.world.rank
                mask = masks[key] if here else torch.empty(module.weight.shape, dtype=torch.bool,
                                                           device=module.weight.device)
                masks[key] = broadcast_tensor(mask, owner)
                broadcast_tensor(module.weight.data, owner)
                stats[full_name] = broadcast_object(stats.get(full_name) if here else None, owner)
            self.measured[name] = stats[full_name]["seconds"]


def _estimate(weight: torch.Tensor) -> float:
    rows, cols = weight.shape[0], weight[0].numel()
    return float(rows * cols**2 + cols**3)
