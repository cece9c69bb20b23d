"""The curvature contract the methods are written against, and its block-diagonal factored implementation.

A `Quadratic` is a damped quadratic model of the loss change over the flat prunable weights, block-diagonal over
contiguous regions: H v, one block's factored form, diag(H^-1), H^-1 v, d^T H d, and the exact multi-weight update
(the ridge solutions on every block's kept set). Two curvatures implement it through `FactoredQuadratic`, each
block H_b = G_b^T G_b + lam I read from a `GradientSource`:
  the empirical Fisher (fisher.EmpiricalFisher): G = the per-sample gradients, in memory or streamed from disk;
  the layer-wise quadratic (hessian.LayerQuadratic): one block per output row, G_r^T = the Cholesky factor of the
  layer's damped H, shared by every row.
The selections and updates (methods/) see only this contract.
"""
from abc import ABC, abstractmethod
from functools import cached_property
from typing import Protocol, runtime_checkable

import torch

from ..errors import BrainSurgeonError

OVERFLOW = ("the per-sample gradients are too large for float32 curvature (G G^T overflows); rescale the calibration "
            "inputs or check the model's weights")


@runtime_checkable
class GradientSource(Protocol):
    """G^T (p x n, float32) as the curvature reads it: whole regions of rows, or a few rows by index."""

    streamed: bool  # True when rows are read from storage on every call (then nothing is cached)

    @property
    def shape(self) -> tuple: ...

    def rows(self, region: slice) -> torch.Tensor: ...

    def take(self, index: torch.Tensor) -> torch.Tensor: ...


class Quadratic(ABC):
    """The damped quadratic model H (block-diagonal over `regions`) that selections and updates use."""

    damping: float
    regions: list
    shift: float  # the linear term's scale (0: none)

    @property
    @abstractmethod
    def num_weights(self) -> int: ...

    @abstractmethod
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v."""

    @abstractmethod
    def block(self, index: int) -> "FactoredBlock":
        """Block `index` in factored form (G_b^T, damping): its products, solves and kept-set systems."""

    @property
    @abstractmethod
    def inverse_diagonal(self) -> torch.Tensor:
        """diag(H^-1)."""

    @abstractmethod
    def inverse_apply(self, v: torch.Tensor) -> torch.Tensor:
        """H^-1 v."""

    @abstractmethod
    def quadratic(self, d: torch.Tensor) -> float:
        """d^T H d."""

    @abstractmethod
    def predicted_change(self, d: torch.Tensor) -> float:
        """The modelled loss change of moving the weights by d."""

    @abstractmethod
    def exact_updates(self, pruned: torch.Tensor, weights: torch.Tensor, dampings):
        """For each damping, the exact multi-weight update of the kept weights (zero on the pruned ones)."""


class FactoredBlock:
    """One dense block of a factored quadratic: H_b = G_b^T G_b + damping * I from G_b^T (p_b x n). Solves use the
    n x n Gram.

    `shift` is 1/sqrt(n) when the mean gradient's linear term is modelled (else 0): the loss change
    g_mean^T d + d^T H d / 2 is |G d + shift|^2 / 2 + lam |d|^2 / 2 up to a constant, as g_mean = G^T 1 / sqrt(n).
    """

    def __init__(self, gradients_t: torch.Tensor, damping: float, shift: float = 0.0, gram_cache=None, key=None):
        self.gradients_t = gradients_t
        self.damping = float(damping)
        self.shift = float(shift)
        self.gram_cache, self.key = gram_cache, key

    @property
    def num_weights(self) -> int:
        return self.gradients_t.shape[0]

    @property
    def num_samples(self) -> int:
        return self.gradients_t.shape[1]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """G v (an n-vector); from the nonzero columns only when v is mostly zero, as pruned weights are."""
        nonzero = torch.nonzero(v).squeeze(1)
        if len(nonzero) < len(v) // 4:
            return self.gradients_t[nonzero].T @ v[nonzero]
        return self.gradients_t.T @ v

    def rmatvec(self, r: torch.Tensor) -> torch.Tensor:
        """G^T r (a p-vector)."""
        return self.gradients_t @ r

    @cached_property
    def gram(self) -> torch.Tensor:
        """G G^T in float64 (n x n), by blocks of the upper triangle (about 5/8 of the full product's flops)."""
        n, step = self.num_samples, -(-self.num_samples // 4)
        gram = torch.empty(n, n, dtype=torch.float64, device=self.gradients_t.device)
        for start in range(0, n, step):
            rows = self.gradients_t[:, start : start + step].T
            block = (rows @ self.gradients_t[:, start:]).double()
            gram[start : start + step, start:] = block
            gram[start:, start : start + step] = block.T
        return gram

    @cached_property
    def _gram_cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor of damping * I_n + G G^T (float64)."""
        system = self.gram + self.damping * torch.eye(self.num_samples, dtype=torch.float64, device=self.gram.device)
        if not torch.isfinite(system).all():
            raise BrainSurgeonError(OVERFLOW)
        return torch.linalg.cholesky(system)

    @cached_property
    def inverse_diagonal(self) -> torch.Tensor:
        """diag(H^-1) = (1 - colsum((L^-1 G)^2)) / damping, by Woodbury, in chunks of weights."""
        chunk = 8192
        factor = self._gram_cholesky.float()
        out = torch.empty(self.num_weights, dtype=torch.float64, device=self.gradients_t.device)
        for start in range(0, self.num_weights, chunk):
            block = self.gradients_t[start : start + chunk].T
            solved = torch.linalg.solve_triangular(factor, block, upper=False)
            out[start : start + chunk] = 1.0 - solved.double().pow(2).sum(0)
        return out.clamp_min(1e-12) / self.damping

    def inverse_apply(self, v: torch.Tensor) -> torch.Tensor:
        """H^-1 v = (v - G^T (lam I + G G^T)^-1 G v) / lam."""
        gv = self.matvec(v.float()).double().unsqueeze(1)
        coeff = torch.cholesky_solve(gv, self._gram_cholesky).squeeze(1).float()
        return (v.float() - self.rmatvec(coeff)) / self.damping

    def kept_gram(self, kept: torch.Tensor) -> torch.Tensor:
        """G_S G_S^T in float64 for the weights `kept` (in that order). With a KeptGramCache, the rows shared
        with the previous kept set of this block are reused and only the new ones computed."""
        cache = self.gram_cache
        if cache is None or cache.key != self.key:
            known = torch.zeros(len(kept), dtype=torch.bool, device=kept.device)
        else:
            position = torch.full((self.num_weights,), -1, dtype=torch.long, device=kept.device)
            position[cache.kept] = torch.arange(len(cache.kept), device=kept.device)
            old = position[kept]
            known = old >= 0
        gram = torch.empty(len(kept), len(kept), dtype=torch.float64, device=self.gradients_t.device)
        if known.any():
            reused = torch.nonzero(known).squeeze(1)
            gram[reused.unsqueeze(1), reused] = cache.gram[old[reused].unsqueeze(1), old[reused]]
        fresh = torch.nonzero(~known).squeeze(1)
        if len(fresh):
            rows = (self.gradients_t[kept[fresh]] @ self.gradients_t[kept].T).double()
            gram[fresh], gram[:, fresh] = rows, rows.T
        if cache is not None:
            cache.key, cache.kept, cache.gram = self.key, kept.clone(), gram
        return gram

    def ridge_solver(self, kept, pruned, pruned_weights):
        """lam -> argmin_d |G_S d - G_P w_P + shift|^2 + lam |d|^2 on the kept set S.

        Forms the smaller of the |S| x |S| and n x n systems once; each lam then costs one Cholesky.
        """
        target = self.gradients_t[pruned].T @ pruned_weights.float() - self.shift  # b = G_P w_P - shift
        kept_cols = self.gradients_t[kept]  # |S| x n
        if len(kept) <= self.num_samples:
            system = self.kept_gram(kept)
            rhs = (kept_cols @ target).double()
            return lambda lam: _damped_solve(system, rhs, lam).float()
        # G_S G_S^T from the cached Gram when P is the smaller side: n^2 |P| instead of n^2 |S| flops.
        if len(pruned) < len(kept):
            pruned_cols = self.gradients_t[pruned]
            system = self.gram - (pruned_cols.T @ pruned_cols).double()
        else:
            system = (kept_cols.T @ kept_cols).double()
        return lambda lam: kept_cols @ _damped_solve(system, target.double(), lam).float()


class KeptGramCache:
    """The last kept-weights Gram matrix G_S G_S^T formed, for one block (`key`): a search's candidate sets, its
    final set and the update's solve differ in few weights, so each reuses most of the previous one's rows."""

    def __init__(self):
        self.key = self.kept = self.gram = None


class FactoredQuadratic(Quadratic):
    """H = blockdiag(G_b^T G_b) + damping * I over contiguous weight regions (one region: one dense block), with
    G^T (p x n) read from a GradientSource: in memory, streamed from disk, or one factor shared by many blocks.

    Products cost O(n p); every solve is per block, through its n x n Gram matrix or the smaller kept-weights
    system. Cross-block curvature is dropped. A streamed source is held one block at a time. `shift` (0 unless
    a subclass models a linear term) enters the loss change as |G d + shift|^2 / 2 (FactoredBlock).
    """

    def __init__(self, gradients: GradientSource, damping: float, regions=None, shift: float = 0.0):
        if damping <= 0:
            raise BrainSurgeonError(f"damping must be > 0, got {damping}; try 1e-4..1e-2")
        if not isinstance(gradients, GradientSource):
            raise BrainSurgeonError(f"gradients must be a GradientSource (shape, streamed, rows, take), got "
                                    f"{type(gradients).__name__}")
        self.store = gradients
        self.damping = float(damping)
        self.shift = float(shift)
        num_weights = self.store.shape[0]
        self.regions = list(regions) if regions else [slice(0, num_weights)]
        if self.regions[0].start != 0 or self.regions[-1].stop != num_weights or any(
            a.stop != b.start for a, b in zip(self.regions, self.regions[1:])
        ):
            raise BrainSurgeonError("curvature regions must tile the weights contiguously")
        # In memory, blocks are views whose Gram/Cholesky caches are reused; streamed, they are re-read.
        self.gram_cache = KeptGramCache()
        self._blocks = None if self.store.streamed else [
            FactoredBlock(self.store.rows(r), damping, self.shift, self.gram_cache, b)
            for b, r in enumerate(self.regions)]
        # which block each weight is in: bookkeeping on the host, as the regions are
        sizes = torch.tensor([region.stop - region.start for region in self.regions], device="cpu")
        self.block_of = torch.repeat_interleave(torch.arange(len(self.regions), device="cpu"), sizes)

    def block(self, index: int) -> FactoredBlock:
        if self._blocks is not None:
            return self._blocks[index]
        return FactoredBlock(self.store.rows(self.regions[index]), self.damping, self.shift, self.gram_cache, index)

    def _blocks_with_regions(self):
        return ((self.block(b), region) for b, region in enumerate(self.regions))

    @property
    def num_weights(self) -> int:
        return self.store.shape[0]

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v = G_b^T G_b v_b + damping v, block by block."""
        return self.rmatvec(self.residuals(v)) + self.damping * v

    def residuals(self, v: torch.Tensor) -> torch.Tensor:
        """G_b v_b for every block (num_blocks x n)."""
        return torch.stack([block.matvec(v[region]) for block, region in self._blocks_with_regions()])

    def rmatvec(self, residuals: torch.Tensor) -> torch.Tensor:
        """G_b^T r_b for every block, concatenated (a p-vector)."""
        return torch.cat([block.rmatvec(r) for (block, _), r in zip(self._blocks_with_regions(), residuals)])

    def columns(self, index) -> torch.Tensor:
        """Rows of G^T: the gradient columns g_i for i in `index` (len(index) x n)."""
        return self.store.take(index)

    @cached_property
    def column_sq_norms(self) -> torch.Tensor:
        return torch.cat([block.gradients_t.pow(2).sum(1) for block, _ in self._blocks_with_regions()])

    def quadratic(self, d: torch.Tensor, residuals: torch.Tensor | None = None) -> float:
        """d^T H d; `residuals` = self.residuals(d) when the caller has them already."""
        residuals = self.residuals(d) if residuals is None else residuals
        return float(residuals.pow(2).sum() + self.damping * d.pow(2).sum())

    def predicted_change(self, d: torch.Tensor) -> float:
        """The modelled loss change d^T H d / 2, plus g_mean^T d = shift * sum(G d) when first_order."""
        residuals = self.residuals(d)
        return 0.5 * self.quadratic(d, residuals) + self.shift * float(residuals.sum())

    @cached_property
    def inverse_diagonal(self) -> torch.Tensor:
        return torch.cat([block.inverse_diagonal for block, _ in self._blocks_with_regions()])

    def inverse_apply(self, v: torch.Tensor) -> torch.Tensor:
        return torch.cat([block.inverse_apply(v[region]) for block, region in self._blocks_with_regions()])

    def exact_updates(self, pruned: torch.Tensor, weights: torch.Tensor, dampings):
        """Yield, for each lam in `dampings`, the per-block argmin_d |G_S d - G_P w_P|^2 + lam |d|^2 on the
        kept set S of every block, as one p-vector (zero on the pruned weights). Lazily: a caller may stop
        early. In memory the block systems are formed once; streamed, they are re-formed per lam."""
        solvers = {}
        for lam in dampings:
            d = torch.zeros_like(weights)
            for b, region in enumerate(self.regions):
                local = pruned[region]
                kept_idx, pruned_idx = torch.nonzero(~local).squeeze(1), torch.nonzero(local).squeeze(1)
                if not len(kept_idx) or not len(pruned_idx):
                    continue
                solver = solvers.get(b) or self.block(b).ridge_solver(kept_idx, pruned_idx, weights[region][pruned_idx])
                if not self.store.streamed:
                    solvers[b] = solver
                d[region][kept_idx] = solver(lam)
            yield d


def _damped_solve(system: torch.Tensor, rhs: torch.Tensor, damping: float) -> torch.Tensor:
    """(system + damping I)^-1 rhs for a symmetric positive semi-definite system, by Cholesky."""
    damped = system.clone()
    damped.diagonal().add_(damping)
    factor = torch.linalg.cholesky(damped)
    return torch.cholesky_solve(rhs.unsqueeze(1), factor).squeeze(1)
