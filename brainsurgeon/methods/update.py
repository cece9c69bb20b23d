"""Updates: new values for the kept weights once the pruned set P is fixed. Each returns the change d."""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .. import validation
from .options import Configurable, MethodOptions, option
from .problem import PruningProblem


class Update(Configurable, ABC):
    name: str
    needs_fisher = False
    needs_loss = False

    def delta(self, problem: PruningProblem, pruned: torch.Tensor) -> torch.Tensor:
        """The change of every prunable weight: exactly -w on P, the compensation on the kept set."""
        d = self.compensation(problem, pruned)
        d[pruned] = -problem.weights[pruned]
        return d

    @abstractmethod
    def compensation(self, problem: PruningProblem, pruned: torch.Tensor) -> torch.Tensor: ...


class NoUpdate(Update):
    name = "none"

    def compensation(self, problem, pruned):
        return torch.zeros_like(problem.weights)


class OptimalBrainSurgeon(Update):
    """WoodFisher's single-pass update: d = -H^-1 (w_P / diag(H^-1)_P), scattered on P."""

    name = "obs"
    needs_fisher = True

    def compensation(self, problem, pruned):
        curvature = problem.curvature
        scaled = torch.zeros(problem.num_weights, dtype=torch.float64, device=problem.weights.device)
        scaled[pruned] = problem.weights[pruned].double() / curvature.inverse_diagonal[pruned]
        return -curvature.inverse_apply(scaled)


@dataclass(frozen=True)
class CBSUOptions(MethodOptions):
    damping_grid: tuple = option((0.1, 1.0, 10.0, 100.0), "multiples of the damping tried by real calibration loss")

    def checked(self):
        return dict(damping_grid=validation.positive_list("damping_grid", self.damping_grid))


class ExactOptimalBrainSurgeon(Update):
    """CBS-U: the exact multi-weight OBS update, argmin_d |G_S d - G_P w_P|^2 + lam |d|^2 on the kept set S.

    The compensation is fit to a quadratic model that stops holding as more weights go: with a small lam
    it over-compensates at high sparsity, with a large one it under-compensates at low sparsity. So lam
    walks up the Fisher damping x `damping_grid`, and the solution with the lowest real calibration loss
    is kept; the walk stops once the loss rises. The limit lam -> infinity, no compensation, is a candidate
    too, since the update can raise the real loss at every lam (a grid of one value is used without looking at
    the loss). docs/decisions.md has the measurements.
    """

    name = "cbsu"
    needs_fisher = True
    Options = CBSUOptions

    @property
    def needs_loss(self) -> bool:
        return len(self.damping_grid) > 1

    def compensation(self, problem, pruned):
        dampings = [problem.curvature.damping * m for m in self.damping_grid]
        solutions = problem.curvature.exact_updates(pruned, problem.weights, dampings)
        if not self.needs_loss:
            problem.stats.update(cbsu_damping=dampings[0])
            return next(solutions)
        base = problem.weights * ~pruned
        losses, best = {}, None
        for lam, d in zip(dampings, solutions):
            loss = losses[str(lam)] = problem.calibration_loss(base + d)
            if best is not None and loss >= best[0]:
                break
            best = (loss, lam, d)
        losses["none"] = problem.calibration_loss(base)
        if losses["none"] < best[0]:
            best = (losses["none"], None, torch.zeros_like(problem.weights))  # lam = infinity: no compensation
        problem.stats.update(cbsu_damping=best[1], cbsu_calibration_losses=losses)
        return best[2]


UPDATES = {cls.name: cls for cls in (NoUpdate, OptimalBrainSurgeon, ExactOptimalBrainSurgeon)}
