"""Joint selection: the pruned set that is best *with* its update (docs/design.md section 1).

Over the new weights x, with y_b = G_b w_b and lam the Fisher damping, minimise

    Q(x) = sum_b |G_b x_b - y_b|^2 + lam |x - w|^2   subject to exactly the segments' counts of zeros in x,

which is the loss increase after the best multi-weight OBS update (CBS-U) of the pruned set. For a kept
set S the best x is the backsolve x_S = A^-1 c_S, A = G_S^T G_S + lam I, c = G^T y + lam w, and
Q*(S) = |y|^2 + lam |w|^2 - c_S^T x_S. Three moves, each never raising Q:
  1. a warm start (any selection, CBS-S by default), backsolved;
  2. iterative hard thresholding with a backtracking step (no step size to tune), each new support
     backsolved;
  3. swaps with the update inside: exact changes of Q* for taking a kept weight out and a pruned one in,
     with A^-1 kept current by rank-one updates instead of refactorising.
"""
from dataclasses import dataclass

import torch

from .. import validation
from ..curvature.quadratic import FactoredBlock
from ..progress import progress_bar
from .budget import lowest
from .options import MethodOptions, option
from .problem import PruningProblem
from .selection import SELECTIONS, Selection


class KeptSystem:
    """One Fisher block's backsolve on its kept set, with B = A^-1 updated as weights leave and join.

    `columns` holds g_k for the kept weights (in slot order); `kept` their indices inside the block.
    """

    def __init__(self, block: FactoredBlock, c: torch.Tensor, sq_norms: torch.Tensor, damping: float,
                 kept: torch.Tensor):
        self.gradients_t, self.c, self.damping = block.gradients_t, c, damping
        self.sq_norms = sq_norms.double() + damping  # |g_k|^2 + lam: A's diagonal
        self.kept = kept.clone()
        self.columns = self.gradients_t[kept]  # float32, like G: the products below are cast to float64
        system = block.kept_gram(kept).clone()
        system.diagonal().add_(damping)
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(system))
        self.refresh()

    def refresh(self):
        """The backsolve x_S and, for every weight of the block, t_k = c_k - g_k . (G_S x_S)."""
        self.solution = self.inverse @ self.c[self.kept]
        self.scores = self.c - (self.gradients_t @ (self.columns.T @ self.solution.float())).double()

    def removal_costs(self) -> torch.Tensor:
        """Rise of Q* for pruning each kept slot: the OBS saliency x_i^2 / [A^-1]_ii."""
        return self.solution.pow(2) / self.inverse.diagonal()

    def candidate_moves(self, candidates: torch.Tensor):
        """For candidate weights j (not kept): the exact change of Q* for each (kept slot i out, j in), a
        |S| x m matrix, and the fall of Q* for un-pruning j alone, t_j^2 / s_j.

        With a_j = G_S^T g_j, V = A^-1 a_j and the Schur complement s_j = |g_j|^2 + lam - a_j^T V_j, removing
        slot i first moves t_j by V_ij x_i / B_ii and s_j by V_ij^2 / B_ii (B = A^-1)."""
        coupling = (self.columns @ self.gradients_t[candidates].T).double()
        solved = self.inverse @ coupling
        schur = (self.sq_norms[candidates] - (coupling * solved).sum(0)).clamp_min(1e-300)
        gains = self.scores[candidates].pow(2) / schur
        diag = self.inverse.diagonal().unsqueeze(1)
        x = self.solution.unsqueeze(1)
        scores = self.scores[candidates] + solved * x / diag
        pair_deltas = x.pow(2) / diag - scores.pow(2) / (schur + solved.pow(2) / diag)
        return pair_deltas, gains

    def replace(self, slot: int, j: int):
        """Swap: weight j takes the kept slot `slot`, in place: remove the slot from A^-1 (Schur
        complement), then border A^-1 with j in the freed slot. O(|S|^2), no refactorisation."""
        inverse = self.inverse
        inverse.addr_(inverse[:, slot].clone(), inverse[slot].clone(), alpha=-1 / float(inverse[slot, slot]))
        inverse[slot], inverse[:, slot] = 0, 0
        column, solved, schur = self._bordering(j, free_slot=slot)
        inverse.addr_(solved, solved, alpha=1 / schur)
        inverse[slot], inverse[:, slot] = -solved / schur, -solved / schur
        inverse[slot, slot] = 1 / schur
        self.columns[slot], self.kept[slot] = column, j
        self.refresh()

    def _bordering(self, j: int, free_slot: int | None = None):
        """g_j, A^-1 a_j with a_j = G_S^T g_j (a freed slot's entry taken as 0), and the Schur complement
        |g_j|^2 + lam - a_j^T A^-1 a_j: what bordering A^-1 with weight j needs."""
        column = self.gradients_t[j]
        coupling = (self.columns @ column).double()
        if free_slot is not None:
            coupling[free_slot] = 0
        solved = self.inverse @ coupling
        return column, solved, float(self.sq_norms[j] - coupling @ solved)

    def remove(self, slot: int):
        inverse = self.inverse - torch.outer(self.inverse[:, slot], self.inverse[slot]) / self.inverse[slot, slot]
        keep = torch.arange(len(self.kept)) != slot
        self.inverse = inverse[keep][:, keep]
        self.kept, self.columns = self.kept[keep], self.columns[keep]
        self.refresh()

    def add(self, j: int):
        column, solved, schur = self._bordering(j)
        size = len(self.kept)
        grown = torch.empty(size + 1, size + 1, dtype=torch.float64)
        grown[:size, :size] = self.inverse + torch.outer(solved, solved) / schur
        grown[size, :size] = grown[:size, size] = -solved / schur
        grown[size, size] = 1 / schur
        self.inverse = grown
        self.kept = torch.cat([self.kept, torch.tensor([j])])
        self.columns = torch.cat([self.columns, column.unsqueeze(0)])
        self.refresh()


@dataclass(frozen=True)
class JointOptions(MethodOptions):
    start: str = option("cbs", "warm-start selection (mp, random, wf or cbs, with its own defaults)")
    iht_rounds: int = option(10, "thresholding-plus-backsolve rounds")
    max_swaps: int = option(200, "cap on swaps with the update inside")
    swap_candidates: int = option(64, "pruned weights per block whose exact swap changes are evaluated each round")
    max_kept: int = option(6000, "a block keeping more weights is backsolved and takes no swaps")

    def checked(self):
        return dict(start=validation.choice("swaps start", self.start, SELECTIONS),
                    iht_rounds=validation.count("iht_rounds", self.iht_rounds, minimum=0),
                    max_swaps=validation.count("max_swaps", self.max_swaps, minimum=0),
                    swap_candidates=validation.count("swap_candidates", self.swap_candidates),
                    max_kept=validation.count("max_kept", self.max_kept, maximum=validation.MAX_KEPT))


class JointSelection(Selection):
    """The pruned set best with its exact update: a warm start, thresholding with exact backsolves, then swaps.

    It searches the joint objective Q* (selection with the CBS-U update inside); see the module docstring.

    Options: `start` (the warm-start selection, by name or as a Selection; with several candidate masks the one
    with the lowest Q* is used), `iht_rounds` (thresholding-plus-backsolve rounds), `max_swaps`,
    `swap_candidates` (pruned weights per block, ranked by a bound on their gain, whose exact swap changes are
    evaluated each round) and `max_kept` (a block keeping more weights is backsolved through its n x n system
    and takes no swaps: its A^-1 would be too large).
    """

    name = "swaps"
    default_update = "cbsu"
    needs_fisher = True
    Options = JointOptions

    def __init__(self, options=None, *, start_selection: Selection | None = None, **given):
        """`start_selection`: a Selection to start from instead of the one `start` names (a mask chosen
        beforehand)."""
        super().__init__(options, **given)
        # The basic selections: swaps does not start from itself.
        self.start_selection = start_selection or SELECTIONS[self.start]()

    @property
    def needs_loss(self) -> bool:
        return self.start_selection.needs_loss

    def settings(self):
        return dict(super().settings(), start=self.start_selection.name, **self.start_selection.settings())

    def select(self, problem: PruningProblem) -> torch.Tensor:
        search = JointSearch(problem, self.max_kept)
        starts = self.start_selection.select(problem)
        for mask in [starts] if isinstance(starts, torch.Tensor) else starts:
            search.offer(mask)
        start_objective = search.objective
        rounds = search.threshold(self.iht_rounds)
        iht_objective = search.objective
        swaps = search.swap(self.max_swaps, self.swap_candidates)
        problem.stats.update(joint_start_objective=start_objective, joint_iht_rounds=rounds,
                             joint_iht_objective=iht_objective, joint_swaps=swaps,
                             joint_objective=search.objective)
        return search.pruned


class JointSearch:
    """The state of the search: the best pruned mask so far, its backsolved weights x and Q*(x)."""

    def __init__(self, problem: PruningProblem, max_kept: int):
        self.problem, self.curvature, self.max_kept = problem, problem.curvature, max_kept
        self.damping = self.curvature.damping
        self.weights = problem.weights.double()
        self.targets = self.curvature.residuals(problem.weights) - self.curvature.shift  # y_b = G_b w_b - shift
        self.c = self.curvature.rmatvec(self.targets).double() + self.damping * self.weights
        self.pruned, self.x, self.objective = None, None, float("inf")
        self.systems = {}  # the KeptSystems of the current support's small blocks, for the swaps
        self._lipschitz, self._step = None, 2.0**10

    def value(self, x: torch.Tensor) -> float:
        """Q(x) for any x."""
        residual = self.curvature.residuals(x.float()) - self.targets
        return float(residual.double().pow(2).sum() + self.damping * (x - self.weights).pow(2).sum())

    def backsolve(self, pruned: torch.Tensor):
        """argmin Q over the weights kept by `pruned` (block by block), zero on the pruned ones; and the
        KeptSystems of the blocks keeping at most max_kept weights."""
        x, systems = torch.zeros_like(self.weights), {}
        for b, region in enumerate(self.curvature.regions):
            kept = torch.nonzero(~pruned[region]).squeeze(1)
            if len(kept) <= self.max_kept:
                systems[b] = self.kept_system(b, kept)
                x[region][kept] = systems[b].solution
            else:
                lost = torch.nonzero(pruned[region]).squeeze(1)
                solve = self.curvature.block(b).ridge_solver(kept, lost, self.problem.weights[region][lost])
                x[region][kept] = self.weights[region][kept] + solve(self.damping).double()
        return x, systems

    def kept_system(self, b: int, kept: torch.Tensor) -> KeptSystem:
        region = self.curvature.regions[b]
        return KeptSystem(self.curvature.block(b), self.c[region], self.curvature.column_sq_norms[region],
                          self.damping, kept)

    def offer(self, pruned: torch.Tensor) -> bool:
        """Backsolve `pruned`; keep it if it lowers Q*."""
        x, systems = self.backsolve(pruned)
        objective = self.value(x)
        if objective < self.objective:
            self.pruned, self.x, self.objective, self.systems = pruned.clone(), x, objective, systems
            return True
        return False

    @property
    def lipschitz(self) -> torch.Tensor:
        """Per weight, its block's sigma_max(G_b)^2 + lam (power iteration, 10% margin): the step bound."""
        if self._lipschitz is None:
            # drawn on the host, where the seeded generator is, so that every device starts alike
            v = torch.randn(len(self.weights), generator=self.problem.generator, device="cpu").to(self.weights.device)
            for _ in range(5):
                v = self.curvature.rmatvec(self.curvature.residuals(v))
                norms = torch.stack([v[region].norm() for region in self.curvature.regions]).clamp_min(1e-30)
                v = v / norms[self.curvature.block_of]
            top = self.curvature.residuals(v).double().pow(2).sum(1)
            self._lipschitz = (1.1 * top + self.damping)[self.curvature.block_of]
        return self._lipschitz

    def threshold(self, rounds: int, steps: int = 10) -> int:
        """Rounds of up to `steps` hard-thresholding steps then a backsolve; stops when the support stays."""
        done = 0
        for done in range(1, rounds + 1):
            candidate = self._thresholding_steps(steps)
            if candidate is None or not self.offer(candidate):
                return done - 1
        return done

    def _thresholding_steps(self, steps: int):
        """IHT from x: z = x - eta grad / L, keep the largest L z^2 per segment. eta backtracks from a long
        step, halving until Q falls (with L above the true bound, eta = 1 is the majorise-minimise step and
        always descends), and doubles after each accepted step. Returns the last support reached if it
        differs from the current."""
        x, pruned, objective, eta = self.x, self.pruned, self.objective, self._step
        lipschitz = self.lipschitz
        for _ in range(steps):
            residual = self.curvature.residuals(x.float()) - self.targets
            grad = self.curvature.rmatvec(residual).double() + self.damping * (x - self.weights)
            while eta > 1e-3:
                z = x - eta * grad / lipschitz
                candidate = lowest(lipschitz * z.pow(2), self.problem.segments)
                z[candidate] = 0
                value = self.value(z)
                if value < objective:
                    x, pruned, objective, eta = z, candidate, value, 2 * eta
                    break
                eta /= 2
            else:
                break
        self._step = max(eta, 1.0)
        return None if torch.equal(pruned, self.pruned) else pruned

    def swap(self, max_swaps: int, candidates: int) -> int:
        """Best-improvement swaps with the update inside, across blocks of the same segment."""
        if max_swaps == 0:
            return 0
        swaps = SwapMoves(self, candidates)
        done = 0
        bar = progress_bar(None, "swaps", self.problem.show_progress, total=max_swaps)
        while done < max_swaps and swaps.apply_best():
            done += 1
            bar.update()
        bar.close()
        if done:
            for b, system in swaps.systems.items():
                region = self.curvature.regions[b]
                self.x[region] = 0
                self.x[region][system.kept] = system.solution
            self.objective = self.value(self.x)
        return done


class SwapMoves:
    """Swaps on the blocks small enough for a KeptSystem. Each round takes the best of: a swap inside a
    block (exact pair change; inside one segment), or pruning one weight in a block and un-pruning one in another
    block of the same segment (exact, as the blocks do not couple). Only the blocks a move touched are re-scored."""

    def __init__(self, search: JointSearch, candidates: int, rel_tol: float = 1e-9):
        self.search, self.candidates, self.rel_tol = search, candidates, rel_tol
        regions = search.curvature.regions
        self.systems = search.systems
        starts = torch.tensor([segment.region.start for segment in search.problem.segments], device="cpu")
        # A block inside one segment may trade weights with the other blocks of that segment; a block cut by
        # several segments (N:M groups of a row) only swaps within each of them, by its local segment ids.
        self.segment_of, self.local_segment = {}, {}
        for b in self.systems:
            ids = torch.bucketize(torch.arange(regions[b].start, regions[b].stop, device="cpu"), starts, right=True) - 1
            if bool((ids == ids[0]).all()):
                self.segment_of[b] = int(ids[0])
            else:
                self.local_segment[b] = ids
        self.moves = {}

    def _block_moves(self, b: int) -> dict:
        """This block's best pair swap, cheapest removal and best addition."""
        system = self.systems[b]
        outside = torch.ones(len(system.c), dtype=torch.bool, device=system.c.device)
        outside[system.kept] = False
        outside = torch.nonzero(outside).squeeze(1)
        inf = float("inf")
        moves = dict(pair=(inf, None, None), remove=(inf, None), add=(-inf, None))
        if len(system.kept):
            costs = system.removal_costs()
            moves["remove"] = (float(costs.min()), int(costs.argmin()))
        if len(outside):
            bound = system.scores[outside].pow(2) / system.sq_norms[outside]  # <= the true gain
            chosen = outside[torch.topk(bound, min(self.candidates, len(outside))).indices]
            pair_deltas, gains = system.candidate_moves(chosen)
            if b in self.local_segment:
                local = self.local_segment[b]
                same = local[system.kept].unsqueeze(1) == local[chosen].unsqueeze(0)
                pair_deltas = torch.where(same, pair_deltas, torch.full_like(pair_deltas, inf))
            moves["add"] = (float(gains.max()), int(chosen[gains.argmax()]))
            if len(system.kept):
                flat = int(pair_deltas.argmin())
                slot, k = divmod(flat, len(chosen))
                moves["pair"] = (float(pair_deltas[slot, k]), slot, int(chosen[k]))
        return moves

    def _best_move(self):
        for b in self.systems:
            if b not in self.moves:
                self.moves[b] = self._block_moves(b)
        best = (float("inf"), None)
        for b, moves in self.moves.items():
            delta, slot, j = moves["pair"]
            best = min(best, (delta, (b, slot, b, j)), key=lambda t: t[0])
        for segment in set(self.segment_of.values()):
            blocks = [b for b in self.moves if self.segment_of.get(b) == segment]
            removals = sorted(blocks, key=lambda b: self.moves[b]["remove"][0])[:2]
            additions = sorted(blocks, key=lambda b: -self.moves[b]["add"][0])[:2]
            for a in removals:
                for b in additions:
                    if a != b:
                        delta = self.moves[a]["remove"][0] - self.moves[b]["add"][0]
                        best = min(best, (delta, (a, self.moves[a]["remove"][1], b, self.moves[b]["add"][1])),
                                   key=lambda t: t[0])
        return best

    def apply_best(self) -> bool:
        """Apply the best move if it lowers Q* by more than rel_tol * Q*; whether one was applied."""
        delta, move = self._best_move()
        if move is None or not delta < -self.rel_tol * abs(self.search.objective):
            return False
        a, slot, b, j = move
        regions, pruned = self.search.curvature.regions, self.search.pruned
        pruned[regions[a].start + int(self.systems[a].kept[slot])] = True
        pruned[regions[b].start + j] = False
        if a == b:
            self.systems[a].replace(slot, j)
        else:
            self.systems[a].remove(slot)
            self.systems[b].add(j)
        self.search.objective += delta
        self.moves.pop(a, None)
        self.moves.pop(b, None)
        return True
