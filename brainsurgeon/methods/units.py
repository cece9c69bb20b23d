"""Structured pruning of one consumer layer on the layer-wise objective: which input units to remove, and the exact
refit of the columns that stay.

A unit is a set of a consumer's input columns that must go together: an MLP's hidden neuron is one column of
down_proj (its gate and up rows go with it), an attention head is head_dim columns of o_proj. For the consumer
W (rows x d) and its inputs X, H = X X^T / N (damped), removing the columns J and refitting the kept ones K,

    min over W'_K of |W X - W'_K X_K|^2  =  W'_K = W H_{:,K} H_KK^-1,  error  = tr(W_J [(H^-1)_JJ]^-1 W_J^T),

the group OBS update ZipLM and SlimGPT use, written once here as the exact least-squares refit. Selections:
  norm      the unit's consumer columns by norm (with its producers' rows when the caller adds them)
  l1        the L1 norm of the unit's producer rows: a convolution's filter (Li et al., 2017)
  tp        Torch-Pruning's default importance, computed by Torch-Pruning (drivers/tp_importance.py)
  wanda_sp  sum_i |W_ij| |X_j| over the unit's columns (Wanda-sp)
  flap      FLAP's fluctuation, |W_:,j|^2 Var(X_j) summed over the unit's columns; the removed columns' mean
            contribution W_J mean(X_J) goes into the consumer's bias (An et al., AAAI 2024)
  obs       structured OBS: greedily the unit whose removal raises the error least, H^-1 downdated each time
  swaps     ours: from obs's set, swaps of a removed and a kept unit that lower the exact joint error, never
            above the start
Where the consumer has a bias b, the refit is exact on the objective with it: the inputs gain a constant 1, so
W and H become [W b] and [[H, mean], [mean^T, 1]] (`augmented`), and the constant column is never removed; FLAP's
compensation is the special case that keeps the other columns as they were.
"""
import torch

from ..errors import BrainSurgeonError


def damped(hessian: torch.Tensor, relative_damping: float) -> torch.Tensor:
    """H + relative_damping * mean(diag H) I in float64; inputs that never fire get a unit diagonal."""
    out = hessian.double().clone()
    dead = torch.diagonal(out) <= 0
    out[dead, dead] = 1.0
    out.diagonal().add_(relative_damping * float(torch.diagonal(out).mean()))
    return out


def removal_error(weight: torch.Tensor, hessian: torch.Tensor, removed: torch.Tensor) -> float:
    """tr(W_J [(H^-1)_JJ]^-1 W_J^T): the least error of the consumer without the columns `removed` (indices)."""
    if not len(removed):
        return 0.0
    return float(_joint_error(weight.double(), torch.linalg.inv(hessian.double()), removed))


def _joint_error(w: torch.Tensor, inverse: torch.Tensor, removed: torch.Tensor) -> torch.Tensor:
    """tr(W_J [(H^-1)_JJ]^-1 W_J^T) given H^-1 (or its downdate): removal_error without the inversion."""
    return (torch.linalg.solve(inverse[removed][:, removed], w[:, removed].T) * w[:, removed].T).sum()


def refit(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """W'_K = W H_{:,K} H_KK^-1: the consumer's kept columns refitted to the outputs of all of them."""
    hessian = hessian.double()
    return torch.linalg.solve(hessian[kept][:, kept], (weight.double() @ hessian[:, kept]).T).T.to(weight.dtype)


def error_of(weight: torch.Tensor, hessian: torch.Tensor, kept: torch.Tensor, new_kept: torch.Tensor) -> float:
    """|W X - W'_K X_K|^2 / N for new weights `new_kept` of the kept columns (the others removed)."""
    delta = weight.double().clone()
    delta[:, kept] -= new_kept.double()
    return float(((delta @ hessian.double()) * delta).sum())


def augmented(hessian: torch.Tensor, mean: torch.Tensor, other_mean: torch.Tensor = None) -> torch.Tensor:
    """[[H, mean], [other_mean^T, 1]] (other_mean = mean when None): H of the inputs with a constant 1 appended
    (the consumer's bias as a column); for a cross product X_p X_d^T / N, the means of X_p and X_d."""
    d = len(mean)
    other_mean = mean if other_mean is None else other_mean
    out = torch.empty(d + 1, d + 1, dtype=torch.float64)
    out[:d, :d], out[:d, d], out[d, :d], out[d, d] = hessian.double(), mean.double(), other_mean.double(), 1.0
    return out


def fluctuation_scores(weight: torch.Tensor, hessian: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """FLAP's fluctuation of each input column j: |W_:,j|^2 times the variance of input j (H and mean undamped)."""
    variance = (torch.diagonal(hessian.double()) - mean.double().pow(2)).clamp_min(0)
    return weight.double()[:, : len(mean)].pow(2).sum(0) * variance


def norm_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    return weight.double().norm(dim=0)


def wanda_scores(weight: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    return weight.double().abs().sum(0) * torch.diagonal(hessian.double()).clamp_min(0).sqrt()


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` lowest-scoring units, ties by position, as sorted indices."""
    return torch.sort(torch.sort(scores, stable=True).indices[:count]).values


def obs_path(weight: torch.Tensor, hessian: torch.Tensor, count: int, removable: int = None) -> tuple:
    """Structured OBS: `count` units removed one at a time, each the one whose removal (with the refit of all the
    others) raises the error least; H^-1 is downdated after each, so every score is exact given those removed.
    Only the first `removable` columns may go (all when None; the bias column stays). Returns (the units in the
    order removed, the error after each removal: the path's error curve)."""
    inverse = torch.linalg.inv(hessian.double())
    w = weight.double().clone()
    positions = torch.arange(w.shape[1])  # each current column's index in `weight`
    alive = positions < (removable or w.shape[1])  # the current columns that may still go
    gone = torch.zeros(w.shape[1], dtype=torch.bool)
    removed, errors, total = [], [], 0.0
    for _ in range(count):
        if int(gone.sum()) > len(gone) // 4:
            # a removed column's row and column of H^-1 are zero after its downdate, so dropping them is exact and
            # every later step costs the square of the columns left, not of all
            keep = ~gone
            w, inverse, positions, alive, gone = (w[:, keep], inverse[keep][:, keep], positions[keep], alive[keep],
                                                  gone[keep])
        diagonal = torch.diagonal(inverse).clamp_min(1e-300)
        scores = w.pow(2).sum(0) / diagonal
        scores[~alive] = float("inf")
        j = int(torch.argmin(scores))
        total += float(scores[j])
        row = inverse[j].clone()
        w.addr_(w[:, j].clone(), row, alpha=-1.0 / float(row[j]))  # in place: the path is O(count d^2)
        inverse.addr_(row, row, alpha=-1.0 / float(row[j]))
        alive[j], gone[j], w[:, j] = False, True, 0.0
        removed.append(int(positions[j]))
        errors.append(total)
    return torch.tensor(removed, dtype=torch.long), torch.tensor(errors, dtype=torch.float64)


def block_obs_path(weight: torch.Tensor, hessian: torch.Tensor, columns: torch.Tensor, count: int) -> tuple:
    """obs_path for units of several columns each (`columns`: units x columns per unit, such as an attention
    head's head_dim columns): a unit's score is tr(W_u [(H^-1)_uu]^-1 W_u^T), and the downdate is by blocks."""
    inverse = torch.linalg.inv(hessian.double())
    w = weight.double().clone()
    alive = torch.ones(len(columns), dtype=torch.bool)
    removed, errors, total = [], [], 0.0
    for _ in range(count):
        scores = torch.full((len(columns),), float("inf"), dtype=torch.float64)
        for u in torch.nonzero(alive).squeeze(1).tolist():
            scores[u] = _joint_error(w, inverse, columns[u])
        u = int(torch.argmin(scores))
        cols = columns[u]
        total += float(scores[u])
        rows = inverse[cols].clone()
        solved = torch.linalg.solve(rows[:, cols], rows)  # [(H^-1)_uu]^-1 (H^-1)_u,:
        w -= w[:, cols] @ solved
        inverse -= rows.T @ solved
        alive[u], w[:, cols] = False, 0.0
        removed.append(u)
        errors.append(total)
    return torch.tensor(removed, dtype=torch.long), torch.tensor(errors, dtype=torch.float64)


def unit_path(weight: torch.Tensor, hessian: torch.Tensor, columns: torch.Tensor, count: int) -> tuple:
    """The structured-OBS path over the units `columns` (units x columns per unit)."""
    if columns.shape[1] == 1 and torch.equal(columns[:, 0], torch.arange(len(columns))):
        return obs_path(weight, hessian, count, len(columns))
    return block_obs_path(weight, hessian, columns, count)


def greedy_obs(weight: torch.Tensor, hessian: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` units of the structured OBS path, as sorted indices."""
    return torch.sort(obs_path(weight, hessian, count)[0]).values


def allocate(curves: dict, total: float, costs: dict = None) -> dict:
    """Units to remove per consumer so that `total` is removed in all with the least summed error, given each
    consumer's error curve (curves[name][k-1]: its error with k units removed, on a scale common to all) and the
    cost of one of its units (costs[name], in parameters; 1 when not given, so `total` counts units). Each curve's
    increments are raised to their running maximum, and the increments are taken cheapest per unit of cost first
    until `total` is reached: with equal costs that is the exact optimum when every curve is convex, as OBS paths
    nearly are; with unequal costs it removes at most one unit's cost more than `total`."""
    costs = costs or dict.fromkeys(curves, 1)
    available = sum(len(curve) * costs[name] for name, curve in curves.items())
    if not 0 <= total <= available:
        raise BrainSurgeonError(f"cannot remove {total} where the curves allow {available}")
    names, increments, unit_costs = [], [], []
    for name, curve in curves.items():
        steps = torch.diff(curve.double(), prepend=curve.new_zeros(1, dtype=torch.float64))
        increments.append(torch.cummax(steps, 0).values / costs[name])
        names.extend([name] * len(curve))
        unit_costs.extend([costs[name]] * len(curve))
    counts, removed = dict.fromkeys(curves, 0), 0
    for index in torch.sort(torch.cat(increments), stable=True).indices.tolist():
        if removed >= total:
            break
        counts[names[index]] += 1
        removed += unit_costs[index]
    return counts


class _RemovedSet:
    """The exact joint error of a removed set J, f = tr(W_J A W_J^T) with A = [(H^-1)_JJ]^-1, and Z = W_J A, kept
    current as single units leave and join J (Schur complements, no refactorisation)."""

    def __init__(self, weight, inverse, removed):
        self.w, self.inverse = weight, inverse
        self.removed = list(int(j) for j in removed)
        self.a = torch.linalg.inv(inverse[self.removed][:, self.removed])
        self.z = self.w[:, self.removed] @ self.a
        self.error = float((self.z * self.w[:, self.removed]).sum())

    def gain_of_leaving(self) -> torch.Tensor:
        """f minus f without each member: |Z_:,a|^2 / A_aa."""
        return self.z.pow(2).sum(0) / torch.diagonal(self.a)

    def cost_of_joining(self, candidates: torch.Tensor) -> torch.Tensor:
        """f with each candidate b added, minus f: |W_:,b - Z s_b|^2 / (H^-1_bb - s_b^T A s_b), s_b = H^-1_{J,b}."""
        return self._joining(candidates)[0]

    def _joining(self, candidates: torch.Tensor) -> tuple:
        s = self.inverse[candidates][:, self.removed].T  # H^-1 is symmetric: |candidates| rows gathered, not |J|
        a_s = self.a @ s
        residual = self.w[:, candidates] - self.z @ s
        schur = torch.diagonal(self.inverse)[candidates] - (s * a_s).sum(0)
        return residual.pow(2).sum(0) / schur.clamp_min(1e-300), a_s, residual, schur

    def swap_errors(self, leaving: torch.Tensor, joining: torch.Tensor) -> torch.Tensor:
        """f after the member at each position of `leaving` leaves and each unit of `joining` joins (leaving x
        joining), in closed form: with p leaving, A's Schur complement gives the residual R_b + Z_p (A s_b)_p / A_pp
        and the pivot c_b + (A s_b)_p^2 / A_pp, so no trial set is formed."""
        _, a_s, residual, schur = self._joining(joining)
        pivots = torch.diagonal(self.a)[leaving]
        z_leaving = self.z[:, leaving]
        shift = a_s[leaving] / pivots[:, None]
        leaving_norms = z_leaving.pow(2).sum(0)
        numerator = (residual.pow(2).sum(0)[None] + 2 * shift * (z_leaving.T @ residual)
                     + shift.pow(2) * leaving_norms[:, None])
        denominator = schur[None] + a_s[leaving].pow(2) / pivots[:, None]
        return self.error - (leaving_norms / pivots)[:, None] + numerator / denominator.clamp_min(1e-300)

    def leave(self, position: int) -> None:
        """Drop member `position`: A and Z by one Schur complement, O(|J| (|J| + rows))."""
        a, keep = self.a, [k for k in range(len(self.removed)) if k != position]
        pivot, row, leaving = a[position, position], a[position, keep], self.z[:, position]
        self.error -= float(leaving.pow(2).sum() / pivot)
        self.a = a[keep][:, keep] - torch.outer(row, row) / pivot
        self.z = self.z[:, keep] - torch.outer(leaving, row) / pivot
        del self.removed[position]

    def join(self, unit: int) -> None:
        """Add `unit`: A and Z grown by one bordered inverse, O(|J| (|J| + rows))."""
        s = self.inverse[unit, self.removed]
        a_s = self.a @ s
        c = float(self.inverse[unit, unit] - s @ a_s)
        residual = self.w[:, unit] - self.z @ s
        n = len(self.removed)
        grown = torch.empty(n + 1, n + 1, dtype=torch.float64)
        grown[:n, :n] = self.a + torch.outer(a_s, a_s) / c
        grown[:n, n] = grown[n, :n] = -a_s / c
        grown[n, n] = 1.0 / c
        self.a = grown
        self.z = torch.cat([self.z - torch.outer(residual, a_s) / c, (residual / c).unsqueeze(1)], dim=1)
        self.error += float(residual.pow(2).sum() / c)
        self.removed.append(unit)


def swap_search(weight: torch.Tensor, hessian: torch.Tensor, start: torch.Tensor, max_swaps: int,
                candidates: int = 16, removable: int = None) -> tuple:
    """Ours: from the removed set `start`, swaps of one removed and one kept unit that lower the exact joint error
    (the best of `candidates` of each side per round, ranked by their single-move changes, every pair's error
    exact), until none lowers it or `max_swaps`. Only the first `removable` columns may go (all when None).
    Returns (the removed units, sorted; the number of swaps; the joint errors at the start and the end)."""
    removable = removable or weight.shape[1]
    if not len(start) or len(start) == removable:
        error = removal_error(weight, hessian, start) if len(start) else 0.0
        return start, 0, (error, error)
    inverse = torch.linalg.inv(hessian.double())
    state = _RemovedSet(weight.double(), inverse, start)
    start_error, swaps = state.error, 0
    while swaps < max_swaps:
        kept = torch.tensor(sorted(set(range(removable)) - set(state.removed)), dtype=torch.long)
        leaving = torch.argsort(state.gain_of_leaving(), descending=True)[:candidates]
        joining = kept[torch.argsort(state.cost_of_joining(kept))[:candidates]]
        trial = state.swap_errors(leaving, joining)
        best = int(torch.argmin(trial))
        if float(trial.flatten()[best]) >= state.error * (1 - 1e-12):
            break
        state.leave(int(leaving[best // len(joining)]))
        state.join(int(joining[best % len(joining)]))
        swaps += 1
    return torch.sort(torch.tensor(state.removed, dtype=torch.long)).values, swaps, (start_error, state.error)


def block_swaps(weight: torch.Tensor, hessian: torch.Tensor, columns: torch.Tensor, start: torch.Tensor,
                max_swaps: int) -> tuple:
    """swap_search (returning the same) for units of several columns (heads, convolution channels): each round takes
    the swap of a removed and a kept unit that lowers the exact joint error most, until none does. Every pair is
    scored in one batch from A = [(H^-1)_RR]^-1 of the removed set R: adding unit i costs tr(D C^-1 D^T) (C, D its
    Schur complement and residual), and restoring unit o then gives back tr(V_o [(A_J)_oo]^-1 V_o^T), V = W_J A_J
    for J = R + i, by the block-inverse formulas."""
    inverse = torch.linalg.inv(hessian.double())
    w = weight.double()
    units, width = columns.shape
    removed, swaps = sorted(start.tolist()), 0
    current = float(_joint_error(w, inverse, columns[removed].flatten())) if removed else 0.0
    start_error = current
    while removed and swaps < max_swaps:
        kept = sorted(set(range(units)) - set(removed))
        if not kept:
            break
        r_cols, k_cols = columns[removed].flatten(), columns[kept]  # (r,), (k, width)
        a = torch.linalg.inv(inverse[r_cols][:, r_cols])
        b = torch.einsum("rs,skc->krc", a, inverse[r_cols][:, k_cols])  # A S_Ri per kept unit i
        c = inverse[k_cols.unsqueeze(2), k_cols.unsqueeze(1)] - torch.einsum("kcr,krd->kcd",
                                                                              inverse[k_cols][:, :, r_cols], b)
        d = torch.einsum("or,krc->koc", w[:, r_cols], b) - w[:, k_cols].permute(1, 0, 2)
        c_inv = torch.linalg.inv(c)
        added = (d @ c_inv * d).sum((1, 2))
        v = (w[:, r_cols] @ a).unsqueeze(0) + d @ c_inv @ b.transpose(1, 2)  # (k, rows, r)
        f = b @ c_inv  # (k, r, width)
        blocks = len(removed)
        a_oo = a.reshape(blocks, width, blocks, width).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
        f_o, b_o = f.reshape(len(kept), blocks, width, width), b.reshape(len(kept), blocks, width, width)
        m_oo = a_oo.unsqueeze(0) + f_o @ b_o.transpose(2, 3)  # (k, blocks, width, width)
        v_o = v.reshape(len(kept), -1, blocks, width).permute(0, 2, 3, 1)  # (k, blocks, width, rows)
        restored = (torch.linalg.solve(m_oo, v_o) * v_o).sum((2, 3))
        trial = current + added.unsqueeze(1) - restored  # [into, out]
        best = int(torch.argmin(trial))
        into, out = kept[best // blocks], removed[best % blocks]
        candidate = sorted(set(removed) - {out} | {into})
        exact = float(_joint_error(w, inverse, columns[candidate].flatten()))
        if exact >= current * (1 - 1e-12):
            break
        removed, current, swaps = candidate, exact, swaps + 1
    return torch.tensor(removed, dtype=torch.long), swaps, (start_error, current)


SELECTIONS = ("norm", "l1", "tp", "wanda_sp", "flap", "obs", "swaps")
GIVEN_SCORES = ("l1", "tp", "flap")  # ranked by scores the caller computes (producer weights, input statistics)


def choose_units(weight: torch.Tensor, hessian: torch.Tensor, count: int, method: str, max_swaps: int = 200,
                 columns: torch.Tensor = None, scores: torch.Tensor = None) -> tuple:
    """The `count` units `method` removes, as sorted unit indices, and figures for the report. A unit is one
    column of the consumer `weight`, or the row of `columns` (units x columns per unit) when given. The methods
    of GIVEN_SCORES rank the caller's per-unit `scores`."""
    if columns is None:
        columns = torch.arange(weight.shape[1]).unsqueeze(1)
    if not 0 <= count < len(columns):
        raise BrainSurgeonError(f"cannot remove {count} of {len(columns)} units; keep at least one")
    if method in GIVEN_SCORES:
        if scores is None or scores.shape != (len(columns),):
            raise BrainSurgeonError(f"structured method {method!r} needs one score per unit from the caller")
        return lowest(scores.double(), count), {}
    if method in ("norm", "wanda_sp"):
        per_column = (norm_scores if method == "norm" else wanda_scores)(weight, hessian)
        per_unit = per_column.pow(2)[columns].sum(1) if method == "norm" else per_column[columns].sum(1)
        return lowest(per_unit, count), {}
    single = columns.shape[1] == 1
    start = torch.sort(unit_path(weight, hessian, columns, count)[0]).values
    if method == "obs":
        return start, {}
    if method == "swaps":
        if single:
            removed, swaps, errors = swap_search(weight, hessian, columns[start, 0], max_swaps,
                                                 removable=int(columns.max()) + 1)
            removed = torch.nonzero(torch.isin(columns[:, 0], removed)).squeeze(1)
        else:
            removed, swaps, errors = block_swaps(weight, hessian, columns, start, max_swaps)
        return removed, dict(swaps=swaps, start_error=errors[0], error=errors[1])
    raise BrainSurgeonError(f"unknown structured method {method!r}; choose from {list(SELECTIONS)}")
