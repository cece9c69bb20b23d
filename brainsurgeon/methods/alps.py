"""ALPS (Meng, Behdin, Wang and Mazumder, 2024), the baseline our `admm` is measured against.

ALPS prunes one layer on the layer-wise objective by ADMM on the pattern constraint, then refits the kept weights
with a few conjugate-gradient steps. As its paper and the authors' code do:

  - H (damped by 1% of its mean diagonal, as every layer-wise method here) is scaled to a unit diagonal, and W by
    the matching column norms, so one penalty schedule fits every layer;
  - ADMM starts from the magnitude projection of the scaled weights, with the penalty rho = 0.1. Each iteration:
    B = (H + rho I)^-1 (H W - V + rho D) from one eigendecomposition of H; D = the pattern's largest entries of
    B + V / rho; V += rho (B - D);
  - every 3 iterations the support's change, as a fraction of the kept count, sets rho: above 10% x1.3, above
    0.5% x1.2, any smaller change x1.1. Before the first rise, a tiny change restarts from the magnitude start
    with rho / 5, and no change divides rho by 5. After a rise, no change ends ADMM, as does a change below 0.03%
    after 30 iterations. rho is capped at 1e6;
  - the support is the pattern's largest entries of B, and 10 preconditioned CG steps (diag(H) as the
    preconditioner, which the unit diagonal makes the identity) refit the kept weights from there.

Where it differs from `admm` (methods/layerwise.py): a magnitude start instead of SparseGPT's, a schedule driven by
the support's change, a CG refit capped at 10 steps instead of the exact update, and no candidates compared.
"""
from dataclasses import dataclass

import torch

from .. import validation
from .layerwise import LayerMethod
from .options import MethodOptions, option

MAX_PENALTY = 1e6
REFIT_TOLERANCE = 1e-4  # the authors' relative residual for the CG refit


@dataclass(frozen=True)
class AlpsOptions(MethodOptions):
    penalty: float = option(0.1, "ADMM's starting penalty, with H at unit diagonal")
    max_iterations: int = option(300, "cap on ADMM iterations")
    update_every: int = option(3, "ADMM iterations between penalty updates")
    min_iterations: int = option(30, "iterations before a settled support (a change below 3e-4 of the kept count) ends ADMM")
    refit_steps: int = option(10, "preconditioned CG steps of the refit on the support")

    def checked(self):
        return dict(penalty=validation.positive("penalty", self.penalty),
                    max_iterations=validation.count("max_iterations", self.max_iterations),
                    update_every=validation.count("update_every", self.update_every),
                    min_iterations=validation.count("min_iterations", self.min_iterations, minimum=0),
                    refit_steps=validation.count("refit_steps", self.refit_steps, minimum=0))


class AlpsLayer(LayerMethod):
    """ALPS: ADMM with a support-driven penalty from the magnitude start, then a few CG steps on the support."""

    name = "alps"
    Options = AlpsOptions

    def prune(self, objective, pattern):
        scale = torch.diagonal(objective.damped).sqrt()
        hessian = objective.damped / torch.outer(scale, scale)
        values, vectors = (part.float() for part in torch.linalg.eigh(hessian))
        hessian, scale = hessian.float(), scale.float()
        dense = objective.weight * scale
        target = dense @ hessian
        start = torch.where(pattern.prune_lowest(dense.abs()), 0.0, dense)
        solved, split, dual = dense, start, torch.zeros_like(dense)
        support = start == 0
        kept = max(1, int((~support).sum()))
        rho, raised, iteration = self.penalty, False, 0
        for iteration in range(1, self.max_iterations + 1):
            solved = ((target - dual + rho * split) @ vectors) / (values + rho) @ vectors.T
            moved = solved + dual / rho
            pruned = pattern.prune_lowest(moved.abs())
            split = torch.where(pruned, 0.0, moved)
            dual = dual + rho * (solved - split)
            if iteration % self.update_every:
                continue
            change = int((pruned != support).sum()) / kept
            support = pruned
            if change > 0.005:
                rho *= 1.3 if change > 0.1 else 1.2
                raised = True
            elif change > 0 and raised:
                rho *= 1.1
            elif raised:
                break
            else:
                rho /= 5
                if change > 0:  # the support still moves at a penalty too high to explore: start again
                    split, dual = start, torch.zeros_like(dense)
            rho = min(rho, MAX_PENALTY)
            if iteration >= self.min_iterations and change < 3e-4:
                break
        pruned = pattern.prune_lowest(solved.abs())
        projected = torch.where(pruned, 0.0, solved) / scale
        refitted = objective.exact_update(pruned, start=projected, tolerance=REFIT_TOLERANCE,
                                          max_iterations=self.refit_steps)
        self.last_stats = dict(admm_iterations=iteration, final_penalty=rho, error_before_refit=objective.error(
            projected), error=objective.error(refitted), solve_iterations=objective.solve_iterations)
        return pruned, refitted
