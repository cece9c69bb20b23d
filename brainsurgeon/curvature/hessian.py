"""The layer-wise Hessian: for a layer with weight W (rows = outputs, columns = inputs; a convolution as its
unfolded matrix) and calibration inputs X, |W X - W' X|^2 / N = sum over rows r of (w_r - w'_r)^T H (w_r - w'_r)
with H = X X^T / N shared by all rows (docs/design.md section 4). H is damped by a fraction of mean(diag H), as
SparseGPT does, for the solves."""
import torch

from .. import validation
from .quadratic import FactoredQuadratic

DEFAULT_RELATIVE_DAMPING = 0.01  # SparseGPT's: 1% of the mean diagonal of H
SOLVE_TOLERANCE = 1e-5  # relative residual of the exact update's solve: float32 precision
SOLVE_MAX_ITERATIONS = 500


class LayerObjective:
    """W (rows x d) and H = X X^T / N (d x d) of one layer, with the damped H the solves use.

    Inputs that never fire (H_jj = 0) carry no information: their weights are free to prune, as SparseGPT does.
    """

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, relative_damping=DEFAULT_RELATIVE_DAMPING):
        self.weight = weight.detach().float().reshape(weight.shape[0], -1).clone()  # the caller may overwrite its own
        self.relative_damping = validation.positive("relative damping", relative_damping)
        hessian = hessian.double()
        self.dead = torch.diagonal(hessian) <= 0
        damped = hessian.clone()
        damped[self.dead, self.dead] = 1.0
        damped.diagonal().add_(self.relative_damping * float(torch.diagonal(damped).mean()))
        self.damped = damped
        # H itself is damped H less this diagonal: one d x d copy is kept, not two (the widest layer's H is as
        # large as the block's weights in float64)
        self.added = torch.diagonal(damped) - torch.diagonal(hessian)
        self.hessian_diagonal = torch.diagonal(hessian).clone()

    @classmethod
    def reproducing(cls, weight, hessian, cross, relative_damping=DEFAULT_RELATIVE_DAMPING) -> "LayerObjective":
        """|W X_d - W' X_p|^2 / N up to a constant, with H = X_p X_p^T / N and cross = X_p X_d^T / N: the objective
        of W* = W + W (C - H)^T H_damped^-1, the best dense weights on X_p (W itself where X_p = X_d)."""
        objective = cls(weight, hessian, relative_damping)
        weight = objective.weight.double()
        correction = torch.linalg.solve(objective.damped, (cross.double() - hessian.double()) @ weight.T).T
        objective.weight = (weight + correction).float()
        return objective

    def quadratic(self) -> "LayerQuadratic":
        """The error as a Quadratic over the row-major flat weights (one block per output row), for the methods
        written against that contract (methods/selection.py, update.py, joint.py)."""
        return LayerQuadratic(self)

    @property
    def shape(self):
        return tuple(self.weight.shape)

    def error(self, new_weight: torch.Tensor) -> float:
        """|W X - W' X|^2 / N."""
        delta = (self.weight - new_weight.reshape(self.shape)).double()
        return float(((delta @ self.damped) * delta).sum() - (delta.pow(2) @ self.added).sum())

    def exact_update(self, pruned: torch.Tensor, start: torch.Tensor | None = None, *,
                     tolerance: float = SOLVE_TOLERANCE, max_iterations: int = SOLVE_MAX_ITERATIONS) -> torch.Tensor:
        """The best weights with `pruned` zero: for each row, w'_S = H_SS^-1 (H w)_S on its kept set S (damped H).

        All rows at once by conjugate gradients on the masked system, preconditioned by diag(H) and started from
        `start` (default: the weights with `pruned` zeroed), until every row's residual is below `tolerance`
        of its right-hand side: float32 precision by default, reached far sooner than batched Cholesky factors of
        each row's H_SS (docs/decisions.md). A baseline that refits with a few steps (ALPS) caps `max_iterations`.
        """
        hessian, keep = self.damped.float(), (~pruned).float()
        rhs = (self.weight @ hessian) * keep
        solution = (self.weight if start is None else start.float()) * keep
        residual = rhs - (solution @ hessian) * keep
        preconditioner = 1.0 / torch.diagonal(hessian)
        scale = rhs.norm(dim=1, keepdim=True).clamp_min(1e-30)
        direction = residual * preconditioner
        rz = (residual * direction).sum(1, keepdim=True)
        steps = 0
        while steps < max_iterations and float((residual.norm(dim=1, keepdim=True) / scale).max()) >= tolerance:
            steps += 1
            product = (direction @ hessian) * keep
            step = rz / (direction * product).sum(1, keepdim=True).clamp_min(1e-30)
            solution += step * direction
            residual -= step * product
            preconditioned = residual * preconditioner
            rz, previous = (residual * preconditioned).sum(1, keepdim=True), rz
            direction = preconditioned + rz / previous.clamp_min(1e-30) * direction
        self.solve_iterations = steps  # for the report
        return solution * keep


class LayerQuadratic(FactoredQuadratic):
    """The layer error's damped H once per output row, in factored form: each row's block is G_r^T G_r + lam I
    with G_r^T = L, the Cholesky factor of damped H - lam I, lam = half the damping (the part of the damping that
    is the same on every input), shared by every row (SharedFactorGradients)."""

    def __init__(self, objective: LayerObjective):
        rows, cols = objective.shape
        lam = 0.5 * float(objective.added.min().clamp_min(1e-12))
        identity = torch.eye(cols, dtype=torch.float64, device=objective.damped.device)
        factor = torch.linalg.cholesky(objective.damped - lam * identity)
        super().__init__(SharedFactorGradients(factor.float(), rows), lam,
                         [slice(r * cols, (r + 1) * cols) for r in range(rows)])


class SharedFactorGradients:
    """A GradientSource of (rows * d) x d: the d x d factor L once per output row, read through views instead of
    copies (LayerQuadratic)."""

    streamed = False

    def __init__(self, factor: torch.Tensor, rows: int):
        self.factor, self.num_rows = factor, rows

    @property
    def shape(self):
        return (self.num_rows * self.factor.shape[0], self.factor.shape[1])

    def rows(self, region: slice) -> torch.Tensor:
        cols = self.factor.shape[0]
        if region.start % cols == 0 and region.stop - region.start == cols:
            return self.factor
        return self.factor[torch.arange(region.start, region.stop) % cols]

    def take(self, index: torch.Tensor) -> torch.Tensor:
        return self.factor[index % self.factor.shape[0]]
