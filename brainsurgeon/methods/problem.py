"""What a selection or an update is handed: the flat weights, the pruning budget, the curvature."""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..curvature.fisher import EmpiricalFisher


@dataclass(frozen=True)
class Segment:
    """Prune exactly `count` weights inside flat[region]; global sparsity is one segment over everything."""

    region: slice
    count: int


@dataclass
class PruningProblem:
    weights: torch.Tensor  # flat prunable weights (p,), float32
    segments: list  # list[Segment]; their counts add up to the number of weights to prune
    generator: torch.Generator  # seeded: every random choice draws from it
    fisher: Optional[EmpiricalFisher] = None
    # Real mean calibration loss of the model with its prunable weights set to a flat vector.
    calibration_loss: Optional[Callable[[torch.Tensor], float]] = None
    show_progress: bool = True
    stats: dict = field(default_factory=dict)  # method-specific figures for the report

    @property
    def num_weights(self) -> int:
        return self.weights.numel()

    def loss_with_pruned(self, pruned: torch.Tensor) -> float:
        """Real calibration loss with the weights under the boolean mask `pruned` set to zero."""
        return self.calibration_loss(self.weights * ~pruned)


def prune_lowest(scores: torch.Tensor, segments) -> torch.Tensor:
    """Boolean mask of the `count` lowest scores in each segment (ties broken by position)."""
    pruned = torch.zeros(scores.numel(), dtype=torch.bool)
    for segment in segments:
        part = scores[segment.region]
        order = torch.sort(part, stable=True).indices[: segment.count]
        pruned[segment.region][order] = True
    return pruned
