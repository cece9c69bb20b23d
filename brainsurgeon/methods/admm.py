"""ADMM on the pattern constraint of one layer's error, with ALPS's support-driven penalty (Meng et al., 2024): the
solver shared by `alps` (its baseline form, methods/alps.py) and our `admm` (methods/layerwise.py).

H (damped) is scaled to a unit diagonal, and W by the matching column norms, so one penalty schedule fits every
layer. From a start D: B = (H + rho I)^-1 (H W - V + rho D) from one eigendecomposition of H; D = the pattern's
largest entries of B + V / rho; V += rho (B - D). Every `update_every` iterations the support's change, as a
fraction of the kept count, sets rho: above 10% x1.3, above 0.5% x1.2, any smaller change x1.1. Before the first
rise, a tiny change restarts from the start with rho / 5 and no change divides rho by 5; after a rise, no change
ends ADMM, as does a change below 3e-4 after `min_iterations`. rho is capped at 1e6.
"""
from dataclasses import dataclass

import torch

from .. import validation
from .options import MethodOptions, option

MAX_PENALTY = 1e6


@dataclass(frozen=True)
class AdmmOptions(MethodOptions):
    penalty: float = option(0.1, "ADMM's starting penalty, with H at unit diagonal")
    max_iterations: int = option(300, "cap on ADMM iterations")
    update_every: int = option(3, "ADMM iterations between penalty updates")
    min_iterations: int = option(30, "iterations before a settled support (a change below 3e-4 of the kept count) "
                                     "ends ADMM")

    def checked(self):
        return dict(penalty=validation.positive("penalty", self.penalty),
                    max_iterations=validation.count("max_iterations", self.max_iterations),
                    update_every=validation.count("update_every", self.update_every),
                    min_iterations=validation.count("min_iterations", self.min_iterations, minimum=0))


def support_admm(objective, pattern, start: torch.Tensor, options: AdmmOptions) -> tuple:
    """ADMM from `start` (weights meeting the pattern, None for the magnitude projection of the scaled weights):
    (the pruned mask, the weights on it before any refit, the iterations, the final penalty)."""
    scale = torch.diagonal(objective.damped).sqrt()
    hessian = (objective.damped / torch.outer(scale, scale)).float()
    # float32 is enough: H is damped and scaled to a unit diagonal, and each solve adds rho (decisions.md)
    values, vectors = torch.linalg.eigh(hessian)
    scale = scale.float()
    dense = objective.weight * scale
    target = dense @ hessian
    start = torch.where(pattern.prune_lowest(dense.abs()), 0.0, dense) if start is None else start * scale
    solved, split, dual = dense, start, torch.zeros_like(dense)
    support = start == 0
    kept = max(1, int((~support).sum()))
    rho, raised, iteration = options.penalty, False, 0
    solve = _penalised_solver(values, vectors, rows=dense.shape[0], update_every=options.update_every)
    for iteration in range(1, options.max_iterations + 1):
        solved = solve(target - dual + rho * split, rho)
        moved = solved + dual / rho
        pruned = pattern.prune_lowest(moved.abs())
        split = torch.where(pruned, 0.0, moved)
        dual = dual + rho * (solved - split)
        if iteration % options.update_every:
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
        if iteration >= options.min_iterations and change < 3e-4:
            break
    pruned = pattern.prune_lowest(solved.abs())
    return pruned, torch.where(pruned, 0.0, solved) / scale, iteration, rho


def _penalised_solver(values: torch.Tensor, vectors: torch.Tensor, rows: int, update_every: int):
    """right -> right (H + rho I)^-1 for H = vectors diag(values) vectors^T: through the eigenbasis (two products
    with `rows` rows), or through the inverse itself, rebuilt whenever rho moves (a d x d product at most once every
    `update_every` iterations, then one product with `rows` rows), whichever multiplies less."""
    width = values.numel()
    if width >= update_every * rows:
        return lambda right, rho: (right @ vectors) / (values + rho) @ vectors.T
    cached = {}

    def solve(right, rho):
        if cached.get("rho") != rho:
            cached.update(rho=rho, inverse=(vectors / (values + rho)) @ vectors.T)
        return right @ cached["inverse"]
    return solve
