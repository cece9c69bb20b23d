"""Selections: which weights to prune, as a boolean "pruned" mask (or candidate masks) with exact per-segment counts."""
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .. import validation
from ..progress import progress_bar
from .budget import lowest, smallest_magnitude
from .options import Configurable, MethodOptions, option
from .problem import PruningProblem


class Selection(Configurable, ABC):
    name: str
    default_update = "none"  # what 'NAME' alone runs after the selection ('NAME+UPDATE' names another)
    needs_fisher = False
    needs_loss = False

    @abstractmethod
    def select(self, problem: PruningProblem) -> torch.Tensor:
        """The pruned mask; or a list of candidate masks, of which the driver keeps the one with the lowest
        real calibration loss after the update."""



class Magnitude(Selection):
    """Smallest |w| (global, or per layer when the problem has one segment per layer)."""

    name = "mp"

    def select(self, problem):
        return smallest_magnitude(problem.weights, problem.segments)


class Random(Selection):
    """Uniformly at random (seeded)."""

    name = "random"

    def select(self, problem):
        drawn = torch.rand(problem.num_weights, generator=problem.generator, device="cpu")  # the seeded host draw
        return lowest(drawn.to(problem.weights.device), problem.segments)


class WoodFisher(Selection):
    """WoodFisher's OBS saliency w_i^2 / (2 [H^-1]_ii), and (by default) the OBS update.

    diag(H^-1) comes from the n x n Cholesky, no p x p matrix."""

    name = "wf"
    default_update = "obs"
    needs_fisher = True

    def select(self, problem):
        saliency = problem.weights.double().pow(2) / (2 * problem.curvature.inverse_diagonal)
        return lowest(saliency, problem.segments)


def perturbed_magnitude_scores(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Magnitude rank inside random groups of ~sqrt(p) weights, as a quantile in (0, 1).

    Pruning the lowest quantiles prunes about the same fraction of every random group, each by magnitude:
    a mask near global magnitude pruning, perturbed at random.
    """
    p = weights.numel()
    group_size = max(1, math.isqrt(p))
    device = weights.device  # the permutation is drawn on the host, where the seeded generator is
    perm = torch.randperm(p, generator=generator, device="cpu").to(device)
    group = torch.arange(p, device=device) // group_size  # group of position k in the random permutation
    by_magnitude = torch.sort(weights.abs()[perm], stable=True).indices
    order = by_magnitude[torch.sort(group[by_magnitude], stable=True).indices]  # by group, then magnitude
    rank = torch.empty(p, dtype=torch.float64, device=device)
    rank[order] = (torch.arange(p, device=device) - group * group_size).double()  # position inside its group
    sizes = torch.bincount(group).double()
    scores = torch.empty(p, dtype=torch.float64, device=device)
    scores[perm] = (rank + 0.5) / sizes[group]
    return scores


@dataclass(frozen=True)
class CBSOptions(MethodOptions):
    epsilon: float = option(1e-4, "minimum improvement of the objective for a swap to count")
    rho: int = option(10, "candidate window half-width of a swap")
    tau: int = option(20, "failed attempts that end a pass")
    max_passes: int = option(2000, "cap on swap passes")
    init_trials: int = option(50, "perturbed-magnitude starting masks")
    # The reference searched on the undamped F (docs/decisions.md: why 0 stays the default).
    selection_damping: float = option(0.0, "ridge term of the swap search, pulling it toward magnitude")
    candidates: int = option(1, "passes handed to the update as candidate masks (the best and ones spread evenly)")

    def checked(self):
        return dict(epsilon=validation.non_negative("epsilon", self.epsilon), rho=validation.count("rho", self.rho),
                    tau=validation.count("tau", self.tau),
                    max_passes=validation.count("max_passes", self.max_passes, minimum=0),
                    init_trials=validation.count("init_trials", self.init_trials, minimum=0,
                                                 maximum=validation.MAX_INIT_TRIALS),
                    selection_damping=validation.non_negative("selection_damping", self.selection_damping),
                    candidates=validation.count("candidates", self.candidates))


class CombinatorialBrainSurgeon(Selection):
    """CBS-S, the swap search on the loss of deleting the pruned set, and (by default) the exact update CBS-U.

    A local search of swaps on f(P) = u^T H u, u = w restricted to P (docs/design.md section 2). It starts from
    the best (by real calibration loss) of `init_trials` perturbed-magnitude masks and plain
    magnitude, and runs passes of swaps until a pass finds none (or `max_passes`). The reference returns
    the pass with the lowest real calibration loss of the deleted weights; here that pass and
    `candidates` passes spread evenly from the start are returned, and the driver keeps the one whose loss
    is lowest *after* the update: f is the loss without compensation, and a lower f need not mean a lower loss
    after CBS-U (docs/decisions.md).
    """

    name = "cbs"
    default_update = "cbsu"
    needs_fisher = True
    needs_loss = True
    Options = CBSOptions

    def select(self, problem):
        start = self._initial_mask(problem)
        search = SwapSearch(problem, start, self.epsilon, self.rho, self.tau, self.selection_damping)
        losses = [problem.loss_with_pruned(start)]  # real loss after each pass; index 0 is the start
        start_objective = search.objective
        bar = progress_bar(None, "cbs swap passes", problem.show_progress, total=self.max_passes)
        while len(search.pass_swaps) < self.max_passes and search.run_pass():
            losses.append(problem.loss_with_pruned(search.pruned))
            bar.update()
            bar.set_postfix(f=f"{search.objective:.4g}", loss=f"{losses[-1]:.4g}")
        bar.close()
        best = min(range(len(losses)), key=losses.__getitem__)
        last = len(losses) - 1
        spread = {round(k * last / self.candidates) for k in range(self.candidates)}  # includes the start
        chosen = [best] + sorted(spread - {best})
        problem.stats.update(cbs_passes=last, cbs_swaps=sum(map(len, search.pass_swaps)),
                             cbs_start_objective=start_objective, cbs_final_objective=search.objective,
                             cbs_best_calibration_loss=losses[best], cbs_candidate_passes=chosen)
        return [search.mask_after(start, t) for t in chosen]

    def _initial_mask(self, problem):
        candidates = [smallest_magnitude(problem.weights, problem.segments)]
        for _ in range(self.init_trials):
            scores = perturbed_magnitude_scores(problem.weights, problem.generator)
            candidates.append(lowest(scores, problem.segments))
        losses = [problem.loss_with_pruned(mask) for mask in candidates]
        best = min(range(len(candidates)), key=losses.__getitem__)
        problem.stats.update(cbs_init_loss=losses[best], cbs_init_from_magnitude=best == 0)
        return candidates[best]


class SwapSearch:
    """Swap moves on f(P) = |G_P w_P|^2 + lam |w_P|^2 (lam = `damping`), keeping r = G_P w_P up to date in O(n)
    per swap. With a block-diagonal Fisher, r is kept per block and g_i.g_j = 0 across blocks, so swaps may
    still cross blocks and layers.

    With c = G^T r:
      alpha_i = f(P) - f(P - i) = 2 w_i c_i - w_i^2 |g_i|^2 + lam w_i^2
      beta_j  = f(P + j) - f(P) = 2 w_j c_j + w_j^2 |g_j|^2 + lam w_j^2
      swapping i out and j in changes f by -alpha_i + beta_j - 2 w_i w_j g_i.g_j.
    (docs/design.md writes -lam w_i^2 in alpha; removing i from P also removes its lam w_i^2 from f, hence +.)
    """

    def __init__(self, problem: PruningProblem, pruned: torch.Tensor, epsilon, rho, tau, damping=None):
        self.curvature = problem.curvature
        self.damping = problem.curvature.damping if damping is None else damping
        self.weights = problem.weights.double()
        self.segments = problem.segments
        self.pruned = pruned.clone()
        self.epsilon, self.rho, self.tau = epsilon, rho, tau
        squares = self.weights.pow(2)
        self.curvature_terms = squares * self.curvature.column_sq_norms.double()  # w_i^2 |g_i|^2
        self.damping_terms = squares * self.damping  # lam w_i^2
        # One residual per Fisher block; without cross-block curvature, f is the sum over blocks.
        self.residual = self.curvature.residuals((problem.weights * pruned).float()).double()
        self.pass_swaps = []  # per accepted-swap pass: the (i out, j in) pairs, to replay any pass's mask

    def mask_after(self, start: torch.Tensor, passes: int) -> torch.Tensor:
        """The pruned mask after the first `passes` passes, replayed from `start`."""
        mask = start.clone()
        for swaps in self.pass_swaps[:passes]:
            for i, j in swaps:
                mask[i], mask[j] = False, True
        return mask

    @property
    def objective(self) -> float:
        return float(self.residual.pow(2).sum() + self.damping * self.weights[self.pruned].pow(2).sum())

    def run_pass(self) -> int:
        """One pass per segment over the current orderings; returns the number of swaps accepted."""
        linear = 2 * self.weights * self.curvature.rmatvec(self.residual.float()).double()
        alpha = linear - self.curvature_terms + self.damping_terms
        beta = linear + self.curvature_terms + self.damping_terms
        self.pass_swaps.append([])
        accepted = sum(self._segment_pass(segment.region, alpha, beta) for segment in self.segments)
        if not accepted:
            self.pass_swaps.pop()
        return accepted

    def _segment_pass(self, region, alpha, beta) -> int:
        offset = region.start
        in_pruned = self.pruned[region]
        pruned_idx = torch.nonzero(in_pruned).squeeze(1)
        kept_idx = torch.nonzero(~in_pruned).squeeze(1)
        if len(pruned_idx) == 0 or len(kept_idx) == 0:
            return 0
        pruned_order = (pruned_idx[torch.argsort(alpha[region][pruned_idx], descending=True)] + offset).tolist()
        kept_order = kept_idx[torch.argsort(beta[region][kept_idx])] + offset
        accepted = failures = 0
        for rank, i in enumerate(pruned_order):
            window = kept_order[max(0, rank - self.rho) : rank + self.rho + 1]
            window = window[~self.pruned[window]]  # skip weights already swapped in during this pass
            if len(window) and self._try_swap(i, window):
                accepted += 1
                continue
            failures += 1
            if failures >= self.tau:
                break
        return accepted

    def swap_deltas(self, i: int, window: torch.Tensor):
        """Exact change of f for swapping pruned i with each kept j in `window`, and the columns used."""
        index = torch.cat([torch.tensor([i], device=window.device), window])
        columns = self.curvature.columns(index).double()  # (1 + m) x n
        blocks = self.curvature.block_of[index]
        dots = (columns * self.residual[blocks]).sum(1)  # g_k . r_(block of k)
        w = self.weights[index]
        alpha_i = 2 * w[0] * dots[0] - self.curvature_terms[i] + self.damping_terms[i]
        beta = 2 * w[1:] * dots[1:] + self.curvature_terms[window] + self.damping_terms[window]
        same_block = blocks[1:] == blocks[0]
        gamma = 2 * w[0] * w[1:] * (columns[1:] @ columns[0]) * same_block
        return beta - gamma - alpha_i, columns

    def _try_swap(self, i: int, window: torch.Tensor) -> bool:
        """Apply the first swap (i out of P, j in) that lowers f by at least epsilon."""
        delta, columns = self.swap_deltas(i, window)
        better = torch.nonzero(delta <= -self.epsilon)
        if len(better) == 0:
            return False
        k = int(better[0])
        j = int(window[k])
        self.pruned[i], self.pruned[j] = False, True
        self.pass_swaps[-1].append((i, j))
        block_of = self.curvature.block_of
        self.residual[block_of[j]] += self.weights[j] * columns[1 + k]
        self.residual[block_of[i]] -= self.weights[i] * columns[0]
        return True


SELECTIONS = {cls.name: cls for cls in (Magnitude, Random, WoodFisher, CombinatorialBrainSurgeon)}
