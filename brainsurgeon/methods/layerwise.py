"""Pruning one layer on the layer-wise objective (docs/design.md section 4).

For a weight W (rows = outputs, columns = inputs; a convolution as its unfolded matrix) and calibration inputs
X, the error of new weights W' is |W X - W' X|_F^2 = sum over rows r of (w_r - w'_r)^T H (w_r - w'_r), with
H = X X^T shared by all rows. `LayerObjective` (curvature/hessian.py) holds W and H and solves the exact
update; the methods below choose the pruned set:

  mp        smallest |w| under the pattern, no update
  wanda     smallest |w_ij| * |X_j|, compared within each output row (Wanda), no update
  sparsegpt the OBS column sweep with lazy batched updates (SparseGPT), block size 128
  admm      ours: the pruned set that is best *with* its exact update. ADMM on W' = D, D in the pattern
            (thresholding the weights while a penalty that grows as the support settles pulls the exactly
            updated W' onto D: ALPS's schedule, methods/admm.py), warm-started from SparseGPT; then the exact
            multi-weight update on D's support. SparseGPT's own weights are a candidate too, and the lower
            error wins, so it is never above SparseGPT's.

and, through `LayerObjective.quadratic` (the layer error as a Quadratic, curvature/quadratic.py, with one block per
output row), the Fisher path's own selections and updates, not copied:

  wf        WoodFisher's saliency w^2 / [H^-1]_ii under the pattern, and the OBS update
  cbs       the CBS swap search (from magnitude), and the exact multi-weight update (CBS-U)
  swaps     the Fisher path's swaps selection (thresholding, exact backsolve on the kept set, swaps with the
            update inside) warm-started from SparseGPT's mask, and the exact multi-weight update

`joint`, the old name of `admm` here and of `swaps` on the Fisher objective, is a deprecated alias
(methods/catalog.py).
"""
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .. import validation
from ..curvature.hessian import LayerObjective
from .admm import AdmmOptions, support_admm
from .budget import Budget, smallest_magnitude
from .joint import JointSelection
from .options import Configurable, MethodOptions, option
from .problem import PruningProblem, best_candidate
from .selection import CombinatorialBrainSurgeon, Magnitude, Selection, WoodFisher
from .update import ExactOptimalBrainSurgeon, OptimalBrainSurgeon

REFIT_TOLERANCE = 1e-3  # relative residual of admm's refit: tighter costs CG steps, no layer error (decisions.md)


class LayerMethod(Configurable, ABC):
    """Chooses the pruned set of one layer under a pattern and returns (pruned mask, new weights); a method may
    leave figures of its last call in `last_stats` for the report."""

    name: str
    needs_hessian = True
    fisher_counterpart = None  # the Fisher objective's selection of the same name that this runs, if any

    @abstractmethod
    def prune(self, objective: LayerObjective, pattern: Budget) -> tuple: ...


class MagnitudeLayer(LayerMethod):
    """Smallest |w| under the pattern, no update."""

    name = "mp"
    needs_hessian = False
    fisher_counterpart = Magnitude

    def prune(self, objective, pattern):
        rows, cols = objective.shape
        pruned = smallest_magnitude(objective.weight.reshape(-1), pattern.segments(rows, cols)).view(rows, cols)
        return pruned, objective.weight * ~pruned


class Wanda(LayerMethod):
    """Smallest |w_ij| * |X_j| within each output row (Wanda), no update.

    |X_j| = sqrt(N H_jj), and the sqrt(N) is common to all scores."""

    name = "wanda"

    def prune(self, objective, pattern):
        norms = objective.hessian_diagonal.clamp_min(0).sqrt().float()
        pruned = pattern.as_rows().prune_lowest(objective.weight.abs() * norms)
        return pruned, objective.weight * ~pruned


@dataclass(frozen=True)
class SparseGPTOptions(MethodOptions):
    block_size: int = option(128, "columns per lazy batch of the OBS sweep")

    def checked(self):
        return dict(block_size=validation.count("block_size", self.block_size))


class SparseGPT(LayerMethod):
    """SparseGPT's OBS column sweep with lazy batched updates, each block's mask chosen as the sweep reaches it.

    Columns are pruned left to right, each pruned weight's error spread over the columns
    to its right through the upper Cholesky factor of H^-1; updates within a block of `block_size` columns are
    immediate, those beyond it batched once per block. The mask of each block (each group of M columns for
    N:M) is chosen when the sweep reaches it, by w^2 / [H^-1]_cc^2 on the weights updated so far."""

    name = "sparsegpt"

    Options = SparseGPTOptions

    def settings(self):
        return {"block_size": self.block_size}

    def prune(self, objective, pattern):
        weight = objective.weight.clone()
        weight[:, objective.dead] = 0
        rows, cols = weight.shape
        # the float64 intermediates are freed before the sweep: only the float32 factor stays
        factor = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(objective.damped)),
                                       upper=True).float()
        pruned = torch.zeros(rows, cols, dtype=torch.bool, device=weight.device)
        step = self.block_size - self.block_size % pattern.m if pattern.kind == "nm" else self.block_size
        for start in range(0, cols, step):
            stop = min(start + step, cols)
            self._sweep_block(weight, factor, pruned, pattern, start, stop, cols)
        return pruned, weight

    @staticmethod
    def _sweep_block(weight, factor, pruned, pattern, start, stop, cols):
        block = weight[:, start:stop].clone()
        local = factor[start:stop, start:stop]
        diag = torch.diagonal(local)
        errors = torch.zeros_like(block)
        mask = None if pattern.kind == "nm" else pattern.prune_lowest(block.pow(2) / diag.pow(2), start, stop, cols)
        if mask is None:
            mask = torch.zeros_like(block, dtype=torch.bool)
        for i in range(stop - start):
            if pattern.kind == "nm" and i % pattern.m == 0:
                group = slice(i, i + pattern.m)
                mask[:, group] = pattern.prune_lowest(block[:, group].pow(2) / diag[group].pow(2))
            column = block[:, i]
            quantised = torch.where(mask[:, i], 0.0, column)
            error = (column - quantised) / local[i, i]
            block[:, i:] -= error.unsqueeze(1) * local[i, i:].unsqueeze(0)
            block[:, i] = quantised
            errors[:, i] = error
        weight[:, start:stop] = block
        weight[:, stop:] -= errors @ factor[start:stop, stop:]
        pruned[:, start:stop] = mask


@dataclass(frozen=True)
class AdmmLayerOptions(AdmmOptions):
    start: str = option("sparsegpt", "warm start: sparsegpt, wanda or mp")

    def checked(self):
        return dict(super().checked(), start=validation.choice("admm start", self.start, ("sparsegpt", "wanda", "mp")))


class AdmmLayer(LayerMethod):
    """Ours: ADMM with a support-driven penalty from SparseGPT's start, then the exact update on its support.

    The ADMM is ALPS's (methods/admm.py), started from SparseGPT's weights rather than the magnitude projection;
    the support it ends on gets the exact multi-weight update (to a relative residual of 1e-3), and SparseGPT's own
    weights are a candidate too, so the layer error is never above SparseGPT's.
    """

    name = "admm"
    Options = AdmmLayerOptions

    def prune(self, objective, pattern):
        start_pruned, start_weight = LAYER_METHODS[self.start]().prune(objective, pattern)
        pruned, projected, iterations, penalty = support_admm(objective, pattern, start_weight, self.options)
        candidates = [(start_pruned, start_weight),
                      (pruned, objective.exact_update(pruned, start=projected, tolerance=REFIT_TOLERANCE))]
        errors = [objective.error(w) for _, w in candidates]
        best = min(range(len(candidates)), key=errors.__getitem__)
        self.last_stats = dict(admm_iterations=iterations, final_penalty=penalty, start_error=errors[0], chosen=best,
                               error=errors[best], solve_iterations=objective.solve_iterations)
        return candidates[best]


@dataclass(frozen=True)
class FisherOnRowsOptions(MethodOptions):
    seed: int = option(0, "seed of the method's random choices")

    def checked(self):
        return dict(seed=validation.seed(self.seed))


class FisherOnRows(LayerMethod):
    """A Fisher selection and update (methods/selection.py, update.py) on the layer objective's Fisher form. The
    real loss they may compare candidates by is the layer error itself, and the exact update solves the damped
    H on the kept set, as `LayerObjective.exact_update` does."""

    Options = FisherOnRowsOptions

    @abstractmethod
    def methods(self, objective, pattern) -> tuple:
        """(selection, update) for this layer."""

    def prune(self, objective, pattern):
        rows, cols = objective.shape
        problem = PruningProblem(weights=objective.weight.reshape(-1), segments=pattern.segments(rows, cols),
                                 generator=torch.Generator().manual_seed(self.seed), curvature=objective.quadratic(),
                                 show_progress=False)
        problem.calibration_loss = lambda flat: objective.error(flat.view(rows, cols))
        selection, update = self.methods(objective, pattern)
        pruned, delta = best_candidate(problem, update, selection.select(problem))
        new = problem.weights + delta
        new[pruned] = 0.0
        self.last_stats = {key: value for key, value in problem.stats.items() if isinstance(value, (int, float))}
        return pruned.view(rows, cols), new.view(rows, cols)


class WoodFisherLayer(FisherOnRows):
    """WoodFisher's saliency w^2 / [H^-1]_ii under the pattern, and the OBS update."""

    name = "wf"
    fisher_counterpart = WoodFisher

    def methods(self, objective, pattern):
        return WoodFisher(), OptimalBrainSurgeon()


@dataclass(frozen=True)
class CBSLayerOptions(FisherOnRowsOptions):
    init_trials: int = option(10, "perturbed-magnitude starting masks of each row's swap search")

    def checked(self):
        return dict(super().checked(), init_trials=validation.count(
            "init_trials", self.init_trials, minimum=0, maximum=validation.MAX_INIT_TRIALS))


class CBSLayer(FisherOnRows):
    """Ours: the CBS swap search from magnitude in each row, and the exact multi-weight update."""

    name = "cbs"
    fisher_counterpart = CombinatorialBrainSurgeon
    Options = CBSLayerOptions

    def methods(self, objective, pattern):
        return CombinatorialBrainSurgeon(init_trials=self.init_trials), ExactOptimalBrainSurgeon(damping_grid=(1.0,))


class GivenMask(Selection):
    """A mask chosen beforehand (a warm start)."""

    name = "given"

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.mask = mask

    def select(self, problem):
        return self.mask


@dataclass(frozen=True)
class SwapsLayerOptions(FisherOnRowsOptions):
    iht_rounds: int = option(10, "thresholding-plus-backsolve rounds")
    max_swaps: int = option(200, "cap on swaps with the update inside")

    def checked(self):
        return dict(super().checked(), iht_rounds=validation.count("iht_rounds", self.iht_rounds, minimum=0),
                    max_swaps=validation.count("max_swaps", self.max_swaps, minimum=0))


class SwapsLayer(FisherOnRows):
    """Ours: the swaps selection in each row (from SparseGPT's mask), and the exact multi-weight update."""

    name = "swaps"
    fisher_counterpart = JointSelection
    Options = SwapsLayerOptions

    def methods(self, objective, pattern):
        start, _ = SparseGPT().prune(objective, pattern)
        selection = JointSelection(start_selection=GivenMask(start.reshape(-1)), iht_rounds=self.iht_rounds,
                                   max_swaps=self.max_swaps)
        return selection, ExactOptimalBrainSurgeon(damping_grid=(1.0,))


LAYER_METHODS = {cls.name: cls for cls in (MagnitudeLayer, Wanda, SparseGPT, AdmmLayer, WoodFisherLayer, CBSLayer,
                                           SwapsLayer)}

