"""What a selection or an update is handed: the flat weights, the pruning budget, the curvature."""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..curvature.quadratic import Quadratic


@dataclass
class PruningProblem:
    weights: torch.Tensor  # flat prunable weights (p,), float32
    segments: list  # list[budget.Segment]; their counts add up to the number of weights to prune
    generator: torch.Generator  # seeded: every random choice draws from it
    # The curvature (curvature/quadratic.py); the swap searches also read its factored form (FactoredQuadratic).
    curvature: Optional[Quadratic] = None
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


def best_candidate(problem: PruningProblem, update, candidates):
    """(mask, delta) of the candidate with the lowest real calibration loss after the update."""
    if isinstance(candidates, torch.Tensor):
        return candidates, update.delta(problem, candidates)
    scored, stats = [], dict(problem.stats)
    for mask in candidates:
        problem.stats = dict(stats)
        delta = update.delta(problem, mask)
        scored.append((problem.calibration_loss(problem.weights + delta), mask, delta, problem.stats))
    best = min(range(len(scored)), key=lambda k: scored[k][0])
    loss, mask, delta, problem.stats = scored[best]
    problem.stats.update(candidate_losses=[entry[0] for entry in scored], chosen_candidate=best)
    return mask, delta
