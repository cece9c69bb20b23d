"""Curvature from per-sample gradients: the damped empirical Fisher H = G^T G + lam I as an operator.

G is n x p (one row per calibration sample, scaled by 1/sqrt(n)); the p x p matrix is never formed.
It is stored transposed (p x n, contiguous) so that one weight's gradient column g_i is a contiguous row,
which is what the combinatorial searches read most.
"""
from functools import cached_property

import torch
from torch.func import functional_call, grad, vmap

from ..errors import BrainSurgeonError
from ..modes import evaluating
from ..progress import progress_bar
from .gradient_store import FLOAT_BYTES, TRANSPOSE_BUFFER_BYTES, InMemoryGradients

GIB = 1024**3


# Samples per vmap chunk at most. A conv net's per-sample activations under vmap, not its gradients, set the
# peak: ResNet20 with 1,000 gradients peaked at 3.6 GiB in chunks of 256 and 2.1 GiB in chunks of 64, and
# smaller chunks were no slower (MLPNet, 10,000 gradients: 1.7 s in chunks of 64, 2.7 s in chunks of 256).
MAX_CHUNK_SIZE = 64
OVERFLOW = ("the per-sample gradients are too large for float32 curvature (G G^T overflows); rescale the calibration "
            "inputs or check the model's weights")
BYTES_PER_WEIGHT_OF_WORK = 96  # the O(p) vectors of the methods: weights, swap terms, orders, masks


def memory_need(num_samples: int, regions, streamed: bool, chunk_size: int = MAX_CHUNK_SIZE) -> int:
    """Estimated peak bytes of the Fisher methods.

    In memory: G twice (storage and one working copy) plus each block's cached n x n Gram and Cholesky
    factor (float64). Streamed: the gradient chunks and transposition buffer, one block's rows twice and
    its two n x n matrices. Both add the O(p) working vectors.
    """
    n = num_samples
    sizes = [region.stop - region.start for region in regions]
    p = sum(sizes)
    work = BYTES_PER_WEIGHT_OF_WORK * p
    if not streamed:
        return 2 * n * p * FLOAT_BYTES + len(regions) * 2 * n * n * 8 + work
    chunks = 2 * min(chunk_size, n) * p * FLOAT_BYTES
    transpose = 2 * min(TRANSPOSE_BUFFER_BYTES, n * p * FLOAT_BYTES)
    return chunks + transpose + 2 * max(sizes) * n * FLOAT_BYTES + 2 * n * n * 8 + work


def choose_gradient_store(mode: str, num_samples: int, regions, max_memory: float,
                          chunk_size: int = MAX_CHUNK_SIZE) -> bool:
    """Whether to stream G from disk: 'memory', 'disk', or 'auto' (disk only when memory would not fit)."""
    if mode not in ("auto", "memory", "disk"):
        raise BrainSurgeonError(f"unknown gradients='{mode}'; use 'auto', 'memory' or 'disk'")
    in_memory = memory_need(num_samples, regions, False, chunk_size)
    streamed = memory_need(num_samples, regions, True, chunk_size)
    if mode == "memory" or (mode == "auto" and in_memory <= max_memory):
        need, stream = in_memory, False
    else:
        need, stream = streamed, True
    if need > max_memory:
        raise BrainSurgeonError(
            f"needs about {need / GIB:.1f} GiB ({'streamed' if stream else 'in memory'}) for {num_samples} "
            f"gradients of {sum(r.stop - r.start for r in regions)} weights in {len(regions)} Fisher block(s), above "
            f"max_memory={max_memory / GIB:.1f} GiB; use fewer calibration samples, smaller blocks "
            "(structure='layer' or 'block:K', which can stream from disk), or raise max_memory"
        )
    return stream


def per_sample_gradient_chunks(model, layers, inputs, targets, loss_fn, chunk_size=MAX_CHUNK_SIZE,
                               show_progress=True):
    """Yield (start, stop, rows of G): per-sample gradients of the loss w.r.t. the prunable weights only,
    for samples [start, stop), over sqrt(n), float32, with the model in eval mode."""
    n = len(inputs)
    params = dict(model.named_parameters())
    prunable = {layer.param: params[layer.param].detach() for layer in layers}
    frozen = {k: v.detach() for k, v in params.items() if k not in prunable}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(weights, x, y):
        out = functional_call(model, {**frozen, **weights}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    with evaluating(model):
        for start in progress_bar(range(0, n, chunk_size), "per-sample gradients", show_progress):
            stop = min(start + chunk_size, n)
            grads = per_sample_grad(prunable, inputs[start:stop], targets[start:stop])
            chunk = torch.cat([layer.gather(grads[layer.param]) for layer in layers], dim=1)
            scaled = (chunk / n**0.5).float()
            flat = scaled.reshape(-1)
            # The sum of squares bounds every entry of G G^T (Cauchy-Schwarz), and NaN and Inf propagate into it:
            # one pass, far cheaper than an elementwise check.
            if not torch.isfinite(flat @ flat):
                if not torch.isfinite(chunk.sum()):
                    raise BrainSurgeonError("per-sample gradients contain NaN or Inf; check the model, data and "
                                            "loss_fn")
                raise BrainSurgeonError(OVERFLOW)
            yield start, stop, scaled


def per_sample_gradients(model, layers, inputs, targets, loss_fn, chunk_size=MAX_CHUNK_SIZE, show_progress=True):
    """G^T in memory (p x n, float32): column s is the gradient of sample s's loss over sqrt(n)."""
    chunks = per_sample_gradient_chunks(model, layers, inputs, targets, loss_fn, chunk_size, show_progress)
    num_weights = sum(layer.size for layer in layers)
    return InMemoryGradients.from_chunks(chunks, num_weights, len(inputs)).gradients_t


class FisherBlock:
    """One dense block: H_b = G_b^T G_b + damping * I from G_b^T (p_b x n). Solves use the n x n Gram.

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
        gram = torch.empty(n, n, dtype=torch.float64)
        for start in range(0, n, step):
            rows = self.gradients_t[:, start : start + step].T
            block = (rows @ self.gradients_t[:, start:]).double()
            gram[start : start + step, start:] = block
            gram[start:, start : start + step] = block.T
        return gram

    @cached_property
    def _gram_cholesky(self) -> torch.Tensor:
        """Lower Cholesky factor of damping * I_n + G G^T (float64)."""
        system = self.gram + self.damping * torch.eye(self.num_samples, dtype=torch.float64)
        if not torch.isfinite(system).all():
            raise BrainSurgeonError(OVERFLOW)
        return torch.linalg.cholesky(system)

    @cached_property
    def inverse_diagonal(self) -> torch.Tensor:
        """diag(H^-1) = (1 - colsum((L^-1 G)^2)) / damping, by Woodbury, in chunks of weights."""
        chunk = 8192
        factor = self._gram_cholesky.float()
        out = torch.empty(self.num_weights, dtype=torch.float64)
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
            known = torch.zeros(len(kept), dtype=torch.bool)
        else:
            position = torch.full((self.num_weights,), -1, dtype=torch.long)
            position[cache.kept] = torch.arange(len(cache.kept))
            old = position[kept]
            known = old >= 0
        gram = torch.empty(len(kept), len(kept), dtype=torch.float64)
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


class EmpiricalFisher:
    """H = blockdiag(G_b^T G_b) + damping * I over contiguous weight regions (one region: the full Fisher).

    Built from G^T (p x n) in memory or streamed from disk (`gradient_store`). Products cost O(n p); every
    solve is per block, through its n x n Gram matrix or the smaller kept-weights system. Cross-block
    curvature is dropped, as in the paper's ResNet20 runs. A streamed Fisher holds one block at a time.
    """

    def __init__(self, gradients, damping: float, regions=None, first_order: bool = False):
        if damping <= 0:
            raise BrainSurgeonError(f"damping must be > 0, got {damping}; try 1e-4..1e-2")
        self.store = InMemoryGradients(gradients) if isinstance(gradients, torch.Tensor) else gradients
        self.damping = float(damping)
        # Model the mean gradient too (the model need not be at a minimum, e.g. after an earlier stage).
        self.shift = self.store.shape[1] ** -0.5 if first_order else 0.0
        num_weights = self.store.shape[0]
        self.regions = list(regions) if regions else [slice(0, num_weights)]
        if self.regions[0].start != 0 or self.regions[-1].stop != num_weights or any(
            a.stop != b.start for a, b in zip(self.regions, self.regions[1:])
        ):
            raise BrainSurgeonError("Fisher regions must tile the weights contiguously")
        # In memory, blocks are views whose Gram/Cholesky caches are reused; streamed, they are re-read.
        self.gram_cache = KeptGramCache()
        self._blocks = None if self.store.streamed else [
            FisherBlock(self.store.rows(r), damping, self.shift, self.gram_cache, b)
            for b, r in enumerate(self.regions)]
        sizes = torch.tensor([region.stop - region.start for region in self.regions])
        self.block_of = torch.repeat_interleave(torch.arange(len(self.regions)), sizes)

    def block(self, index: int) -> FisherBlock:
        if self._blocks is not None:
            return self._blocks[index]
        return FisherBlock(self.store.rows(self.regions[index]), self.damping, self.shift, self.gram_cache, index)

    def _blocks_with_regions(self):
        return ((self.block(b), region) for b, region in enumerate(self.regions))

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

    def ridge_solutions(self, pruned: torch.Tensor, weights: torch.Tensor, dampings):
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
