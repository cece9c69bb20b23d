"""Structured pruning of a consumer's input units: the refit is the least-squares solve, the errors are exact, the
greedy OBS choice is the brute-force best at every step, and the swap search never ends above its start."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from brainsurgeon import BrainSurgeonError
from brainsurgeon.methods import units


def problem(seed, rows=3, cols=6, samples=20):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    inputs = torch.randn(samples, cols, generator=generator, dtype=torch.float64)
    inputs[:, 1] += 0.9 * inputs[:, 0]  # correlated inputs: removals that compensate each other
    return weight, inputs, inputs.T @ inputs / samples


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 4))
def test_the_refit_is_the_least_squares_solve_and_its_error_is_the_closed_form(seed, count):
    weight, inputs, hessian = problem(seed)
    removed = torch.randperm(6, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    kept = torch.tensor(sorted(set(range(6)) - set(removed.tolist())))
    solved = torch.linalg.lstsq(inputs[:, kept], inputs @ weight.T).solution.T
    new = units.refit(weight, hessian, kept)
    torch.testing.assert_close(new, solved, rtol=1e-8, atol=1e-8)
    brute = float(((inputs @ weight.T - inputs[:, kept] @ new.T) ** 2).sum() / len(inputs))
    assert units.error_of(weight, hessian, kept, new) == pytest.approx(brute, rel=1e-8)
    assert units.removal_error(weight, hessian, removed) == pytest.approx(brute, rel=1e-8, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 4), method=st.sampled_from(["obs", "swaps"]))
def test_with_a_bias_the_refit_is_the_least_squares_solve_with_an_intercept(seed, count, method):
    weight, inputs, _ = problem(seed)
    inputs = inputs + torch.linspace(-1, 2, 6, dtype=torch.float64)  # inputs with a mean
    bias = torch.randn(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    hessian, mean = inputs.T @ inputs / len(inputs), inputs.mean(0)
    full, extended = torch.cat([weight, bias[:, None]], 1), units.augmented(hessian, mean)
    removed, _ = units.choose_units(full, extended, count, method, columns=torch.arange(6).unsqueeze(1))
    assert len(removed) == count and int(removed.max()) < 6  # the bias column never goes
    kept = torch.tensor(sorted(set(range(6)) - set(removed.tolist())) + [6])
    new = units.refit(full, extended, kept)
    ones = torch.ones(len(inputs), 1, dtype=torch.float64)
    target = inputs @ weight.T + bias
    solved = torch.linalg.lstsq(torch.cat([inputs, ones], 1)[:, kept], target).solution.T
    torch.testing.assert_close(new, solved, rtol=1e-7, atol=1e-7)
    residual = target - torch.cat([inputs, ones], 1)[:, kept] @ new.T
    assert units.error_of(full, extended, kept, new) == pytest.approx(float((residual ** 2).sum()) / len(inputs),
                                                                      rel=1e-7)
    # FLAP's compensation keeps the other columns and moves only the bias: the mean output stays exact
    flap = full[:, kept].clone()
    flap[:, -1] += weight[:, removed] @ mean[removed]
    torch.testing.assert_close((torch.cat([inputs, ones], 1)[:, kept] @ flap.T).mean(0), target.mean(0))
    assert units.error_of(full, extended, kept, new) <= units.error_of(full, extended, kept, flap) + 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 4))
def test_greedy_obs_takes_the_brute_force_best_single_removal_at_every_step(seed, count):
    weight, _, hessian = problem(seed)
    removed = units.greedy_obs(weight, hessian, count)
    assert len(set(removed.tolist())) == count
    chosen = []
    for _ in range(count):  # replay: each step's unit is the best given those before it
        errors = {j: units.removal_error(weight, hessian, torch.tensor(sorted(chosen + [j])))
                  for j in range(6) if j not in chosen}
        best = min(errors.values())
        step = [j for j in removed.tolist() if j not in chosen and errors[j] <= best * (1 + 1e-9) + 1e-12]
        assert step, (errors, removed)
        chosen.append(step[0])
    assert sorted(chosen) == removed.tolist()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_the_removed_sets_single_moves_equal_brute_force(seed):
    weight, _, hessian = problem(seed)
    inverse = torch.linalg.inv(hessian)
    state = units._RemovedSet(weight, inverse, [0, 2, 3])
    assert state.error == pytest.approx(units.removal_error(weight, hessian, torch.tensor([0, 2, 3])))
    for position, gain in enumerate(state.gain_of_leaving().tolist()):
        rest = [j for k, j in enumerate([0, 2, 3]) if k != position]
        assert state.error - gain == pytest.approx(units.removal_error(weight, hessian, torch.tensor(rest)), abs=1e-9)
    for unit, cost in zip([1, 4, 5], state.cost_of_joining(torch.tensor([1, 4, 5])).tolist()):
        joined = torch.tensor(sorted([0, 2, 3, unit]))
        assert state.error + cost == pytest.approx(units.removal_error(weight, hessian, joined), rel=1e-7)
    state.leave(1)
    state.join(5)
    assert state.error == pytest.approx(units.removal_error(weight, hessian, torch.tensor([0, 3, 5])), rel=1e-7)
    fresh = units._RemovedSet(weight, inverse, [0, 3, 5])  # the updated A and Z equal those formed from scratch
    swapped = state.swap_errors(torch.tensor([0, 2]), torch.tensor([1, 4]))  # 0 or 5 leaves, 1 or 4 joins
    for row, leaving in enumerate([0, 5]):
        for column, joining in enumerate([1, 4]):
            brute = units.removal_error(weight, hessian, torch.tensor(sorted({0, 3, 5} - {leaving} | {joining})))
            assert float(swapped[row, column]) == pytest.approx(brute, rel=1e-7)
    torch.testing.assert_close(state.a, fresh.a, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(state.z, fresh.z, rtol=1e-7, atol=1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 5))
def test_the_swap_search_never_ends_above_its_start_and_often_reaches_the_optimum(seed, count):
    weight, _, hessian = problem(seed)
    start = units.greedy_obs(weight, hessian, count)
    removed, _, (start_error, error) = units.swap_search(weight, hessian, start, max_swaps=50)
    assert len(removed) == count
    assert start_error == pytest.approx(units.removal_error(weight, hessian, start), rel=1e-7)
    assert error == pytest.approx(units.removal_error(weight, hessian, removed), rel=1e-7)
    assert units.removal_error(weight, hessian, removed) <= units.removal_error(weight, hessian, start) * (1 + 1e-9)
    optimum = min(units.removal_error(weight, hessian, torch.tensor(combination))
                  for combination in itertools.combinations(range(6), count))
    assert units.removal_error(weight, hessian, removed) >= optimum * (1 - 1e-9)


@pytest.mark.parametrize("method", units.SELECTIONS)
def test_every_method_removes_exactly_the_count(method):
    weight, _, hessian = problem(0, rows=4, cols=10, samples=40)
    scores = torch.rand(10, generator=torch.Generator().manual_seed(0)) if method in units.GIVEN_SCORES else None
    removed, _ = units.choose_units(weight, hessian, 4, method, scores=scores)
    assert len(set(removed.tolist())) == 4 and removed.max() < 10
    if scores is not None:
        assert removed.tolist() == sorted(torch.argsort(scores)[:4].tolist())
        with pytest.raises(BrainSurgeonError, match="one score per unit"):
            units.choose_units(weight, hessian, 4, method)
    with pytest.raises(BrainSurgeonError, match="keep at least one"):
        units.choose_units(weight, hessian, 10, method, scores=scores)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 5))
def test_the_obs_paths_error_curve_is_the_exact_error_of_each_prefix(seed, count):
    weight, _, hessian = problem(seed)
    order, errors = units.obs_path(weight, hessian, count)
    for k in range(1, count + 1):
        assert float(errors[k - 1]) == pytest.approx(units.removal_error(weight, hessian, order[:k].sort().values),
                                                     rel=1e-8, abs=1e-12)


def brute_force_allocation(curves, total):
    names = list(curves)
    best = None
    for counts in itertools.product(*(range(len(curves[n]) + 1) for n in names)):
        if sum(counts) == total:
            cost = sum(float(curves[n][k - 1]) for n, k in zip(names, counts) if k)
            best = cost if best is None else min(best, cost)
    return best


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=3), data=st.data())
def test_the_allocation_of_convex_curves_is_the_brute_force_optimum_with_the_exact_total(lengths, data):
    curves = {}
    for i, length in enumerate(lengths):
        steps = sorted(data.draw(st.lists(st.floats(0, 10), min_size=length, max_size=length)))
        curves[f"layer{i}"] = torch.tensor(steps, dtype=torch.float64).cumsum(0)  # nondecreasing steps: convex
    total = data.draw(st.integers(0, sum(lengths)))
    counts = units.allocate(curves, total)
    assert sum(counts.values()) == total and all(0 <= counts[n] <= len(c) for n, c in curves.items())
    cost = sum(float(curves[n][k - 1]) for n, k in counts.items() if k)
    assert cost == pytest.approx(brute_force_allocation(curves, total), rel=1e-9, abs=1e-9)


def test_an_allocation_beyond_the_curves_is_refused():
    with pytest.raises(BrainSurgeonError, match="cannot remove 4 where"):
        units.allocate({"a": torch.ones(3)}, 4)


def block_problem(seed, units_count=4, per_unit=2):
    weight, inputs, hessian = problem(seed, cols=units_count * per_unit)
    return weight, hessian, torch.arange(units_count * per_unit).reshape(units_count, per_unit)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 3))
def test_the_block_obs_path_takes_the_brute_force_best_unit_and_its_curve_is_exact(seed, count):
    weight, hessian, columns = block_problem(seed)
    order, errors = units.block_obs_path(weight, hessian, columns, count)
    for k in range(1, count + 1):
        before = order[:k - 1].tolist()
        options = {u: units.removal_error(weight, hessian, columns[sorted(before + [u])].flatten())
                   for u in range(len(columns)) if u not in before}
        assert options[int(order[k - 1])] <= min(options.values()) * (1 + 1e-9) + 1e-12
        assert float(errors[k - 1]) == pytest.approx(options[int(order[k - 1])], rel=1e-8, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 3))
def test_block_swaps_never_end_above_the_obs_start_nor_below_the_optimum(seed, count):
    weight, hessian, columns = block_problem(seed)
    removed, figures = units.choose_units(weight, hessian, count, "swaps", columns=columns)
    assert len(removed) == count and figures["error"] <= figures["start_error"] * (1 + 1e-9) + 1e-12
    optimum = min(units.removal_error(weight, hessian, columns[list(c)].flatten())
                  for c in itertools.combinations(range(len(columns)), count))
    assert figures["error"] >= optimum * (1 - 1e-9) - 1e-12


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), count=st.integers(1, 3))
def test_one_block_swap_is_the_best_of_every_pair_by_brute_force(seed, count):
    weight, hessian, columns = block_problem(seed)
    start = torch.arange(count)

    def error(removed):
        return units.removal_error(weight, hessian, columns[sorted(removed)].flatten())

    pairs = {(out, into): error(set(range(count)) - {out} | {into})
             for out in range(count) for into in range(count, len(columns))}
    best = min(pairs.values())
    removed, swaps, _ = units.block_swaps(weight, hessian, columns, start, max_swaps=1)
    if best < error(set(range(count))) * (1 - 1e-9):
        assert swaps == 1 and error(set(removed.tolist())) == pytest.approx(best, rel=1e-8)
    else:
        assert swaps == 0 and removed.tolist() == start.tolist()
