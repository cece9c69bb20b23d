"""The math against dense p x p formulas and brute force, on small random problems."""
import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from brainsurgeon import BrainSurgeonError
from brainsurgeon.curvature.fisher import EmpiricalFisher
from brainsurgeon.curvature.quadratic import GradientSource, Quadratic
from brainsurgeon.methods.budget import Segment
from brainsurgeon.methods.problem import PruningProblem
from brainsurgeon.methods.selection import SwapSearch, WoodFisher
from brainsurgeon.methods.update import ExactOptimalBrainSurgeon, OptimalBrainSurgeon

torch.set_default_dtype(torch.float32)


def split(p, num_blocks):
    """`num_blocks` contiguous regions tiling range(p)."""
    bounds = [round(b * p / num_blocks) for b in range(num_blocks + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def random_problem(seed, n, p, k, damping, num_blocks=1):
    gen = torch.Generator().manual_seed(seed)
    gradients_t = torch.randn(p, n, generator=gen, dtype=torch.float64).float() / n**0.5
    weights = torch.randn(p, generator=gen)
    fisher = EmpiricalFisher(gradients_t, damping, split(p, num_blocks))
    problem = PruningProblem(weights=weights, segments=[Segment(slice(0, p), k)], generator=gen, curvature=fisher)
    return problem


def dense_hessian(problem):
    """The p x p matrix, block-diagonal over the Fisher's regions (cross-block curvature dropped)."""
    g = problem.curvature.store.rows(slice(None)).double()
    hessian = torch.zeros(problem.num_weights, problem.num_weights, dtype=torch.float64)
    for region in problem.curvature.regions:
        hessian[region, region] = g[region] @ g[region].T
    return hessian + problem.curvature.damping * torch.eye(problem.num_weights, dtype=torch.float64)


def objective(problem, pruned):
    """Brute-force f(P) = u^T H u with u = w on P."""
    u = (problem.weights * pruned).double()
    return float(u @ dense_hessian(problem) @ u)


# (seed, samples n, weights p, damping, Fisher blocks): one block is the full Fisher.
problems = st.tuples(st.integers(0, 10_000), st.integers(2, 12), st.integers(3, 14), st.sampled_from([1e-3, 0.1, 1.0]),
                     st.integers(1, 3))


def draw_case(spec, data):
    """A random problem and a random pruned set of 1..p-1 weights (so both solve branches get drawn)."""
    seed, n, p, damping, num_blocks = spec
    k = data.draw(st.integers(1, p - 1))
    problem = random_problem(seed, n, p, k, damping, num_blocks)
    pruned = torch.zeros(p, dtype=torch.bool)
    pruned[torch.randperm(p, generator=problem.generator)[:k]] = True
    return problem, pruned


@settings(max_examples=40, deadline=None)
@given(problems, st.data())
def test_swap_deltas_equal_brute_force_objective_changes(spec, data):
    problem, pruned = draw_case(spec, data)
    search = SwapSearch(problem, pruned, epsilon=0.0, rho=2, tau=3)
    assert abs(search.objective - objective(problem, pruned)) < 1e-6 * (1 + objective(problem, pruned))
    i = int(torch.nonzero(pruned)[0])
    window = torch.nonzero(~pruned).squeeze(1)
    deltas, _ = search.swap_deltas(i, window)
    before = objective(problem, pruned)
    for j, delta in zip(window.tolist(), deltas.tolist()):
        swapped = pruned.clone()
        swapped[i], swapped[j] = False, True
        # G is float32, and the residual r = G_P w_P starts from a float32 product.
        assert abs(delta - (objective(problem, swapped) - before)) < 1e-5 * (1 + before)


@settings(max_examples=25, deadline=None)
@given(problems, st.data())
def test_swap_passes_keep_the_residual_exact_and_never_raise_f(spec, data):
    problem, pruned = draw_case(spec, data)
    k, p = int(pruned.sum()), problem.num_weights
    search = SwapSearch(problem, pruned, epsilon=0.0, rho=p, tau=p)
    previous = search.objective
    for _ in range(5):
        search.run_pass()
        assert int(search.pruned.sum()) == k
        assert abs(search.objective - objective(problem, search.pruned)) < 1e-5 * (1 + previous)
        assert search.objective <= previous + 1e-9
        previous = search.objective


@settings(max_examples=40, deadline=None)
@given(problems, st.data())
def test_cbsu_equals_brute_force_constrained_least_squares(spec, data):
    problem, pruned = draw_case(spec, data)
    d = ExactOptimalBrainSurgeon(damping_grid=[1.0]).delta(problem, pruned).double()
    hessian = dense_hessian(problem)
    kept = ~pruned
    w_p = problem.weights.double()[pruned]
    expected = torch.linalg.solve(hessian[kept][:, kept], hessian[kept][:, pruned] @ w_p)
    assert torch.allclose(d[kept], expected, rtol=1e-3, atol=1e-3 * (1 + expected.abs().max()))
    assert torch.equal(d[pruned], -w_p)
    # Its loss increase is the OBS formula 1/2 w_P^T ([H^-1]_PP)^-1 w_P.
    inverse = torch.linalg.inv(hessian)
    predicted = 0.5 * w_p @ torch.linalg.solve(inverse[pruned][:, pruned], w_p)
    assert abs(0.5 * problem.curvature.quadratic(d.float()) - float(predicted)) < 1e-3 * (1 + float(predicted))


@settings(max_examples=40, deadline=None)
@given(problems)
def test_wf_saliency_and_obs_update_equal_dense_formulas(spec):
    seed, n, p, damping, num_blocks = spec
    problem = random_problem(seed, n, p, max(1, p // 2), damping, num_blocks)
    inverse = torch.linalg.inv(dense_hessian(problem))
    diag = inverse.diagonal()
    assert torch.allclose(problem.curvature.inverse_diagonal, diag, rtol=1e-3)
    pruned = WoodFisher().select(problem)
    saliency = problem.weights.double() ** 2 / (2 * diag)
    assert set(torch.nonzero(pruned).squeeze(1).tolist()) == set(torch.argsort(saliency)[: p // 2 or 1].tolist())
    d = OptimalBrainSurgeon().delta(problem, pruned).double()
    expected = -inverse[:, pruned] @ (problem.weights.double()[pruned] / diag[pruned])
    kept = ~pruned
    assert torch.allclose(d[kept], expected[kept], rtol=1e-3, atol=1e-4 * (1 + expected.abs().max()))


def test_cbs_local_search_finds_the_brute_force_optimum_on_a_tiny_problem():
    problem = random_problem(3, 6, 8, 4, 1e-3)
    best = min(itertools.combinations(range(8), 4),
               key=lambda combo: objective(problem, torch.isin(torch.arange(8), torch.tensor(combo))))
    best_value = objective(problem, torch.isin(torch.arange(8), torch.tensor(best)))
    pruned = torch.zeros(8, dtype=torch.bool)
    pruned[:4] = True
    search = SwapSearch(problem, pruned, epsilon=0.0, rho=8, tau=8)
    while search.run_pass():
        pass
    # With full windows the swap search reaches the global optimum of this instance.
    assert abs(search.objective - best_value) < 1e-6 * best_value


@settings(max_examples=20, deadline=None)
@given(problems)
def test_blockwise_gram_equals_the_full_product(spec):
    seed, n, p, damping, _ = spec
    block = random_problem(seed, n, p, 1, damping).curvature.block(0)
    full = block.gradients_t.double().T @ block.gradients_t.double()
    assert torch.allclose(block.gram, full, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(problems, st.data())
def test_kept_gram_reusing_the_previous_sets_rows_equals_the_fresh_product(spec, data):
    seed, n, p, damping, num_blocks = spec
    fisher = random_problem(seed, n, p, 1, damping, num_blocks).curvature
    for _ in range(4):  # successive kept sets, any order, any overlap, any block
        b = data.draw(st.integers(0, num_blocks - 1))
        block = fisher.block(b)
        size = block.num_weights
        kept = torch.tensor(data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=size, unique=True)))
        columns = block.gradients_t[kept].double()
        assert torch.allclose(block.kept_gram(kept), columns @ columns.T, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 1000))
def test_perturbed_magnitude_scores_rank_weights_inside_equal_random_groups(m, seed):
    from brainsurgeon.methods.selection import perturbed_magnitude_scores

    weights = torch.randn(m * m, generator=torch.Generator().manual_seed(seed))
    scores = perturbed_magnitude_scores(weights, torch.Generator().manual_seed(seed))
    # p = m^2: m groups of m weights, each scored (rank + 0.5) / m by magnitude inside its group.
    expected = ((torch.arange(m, dtype=torch.float64) + 0.5) / m).repeat(m)
    assert torch.equal(torch.sort(scores).values, torch.sort(expected).values)


def test_matvec_of_a_mostly_zero_vector_uses_its_nonzeros_and_equals_the_dense_product():
    gen = torch.Generator().manual_seed(0)
    gradients_t = torch.randn(40, 7, generator=gen)
    fisher = EmpiricalFisher(gradients_t, 0.1)
    v = torch.zeros(40)
    v[[3, 17, 31]] = torch.randn(3, generator=gen)
    assert torch.allclose(fisher.block(0).matvec(v), gradients_t.T @ v, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(1, 3))
def test_the_fisher_is_a_quadratic_whose_matvec_is_the_dense_h(seed, num_blocks):
    problem = random_problem(seed, 6, 12, 1, 1e-2, num_blocks)
    assert isinstance(problem.curvature, Quadratic)
    v = torch.randn(problem.num_weights, generator=torch.Generator().manual_seed(seed))
    expected = dense_hessian(problem) @ v.double()
    torch.testing.assert_close(problem.curvature.matvec(v).double(), expected, rtol=1e-4,
                               atol=1e-4 * float(expected.abs().max()))


def test_every_gradient_store_is_a_gradient_source_and_nothing_else_is(tmp_path):
    from brainsurgeon.curvature.gradient_store import DiskGradients, InMemoryGradients
    from brainsurgeon.curvature.hessian import SharedFactorGradients

    g = torch.randn(8, 3)
    disk = DiskGradients.from_chunks([(0, 3, g.T.contiguous())], 8, 3, tmp_path)
    for source in (InMemoryGradients(g), disk, SharedFactorGradients(torch.eye(4), 2)):
        assert isinstance(source, GradientSource)
        EmpiricalFisher(source, 1e-2)
    disk.close()
    with pytest.raises(BrainSurgeonError, match="must be a GradientSource"):
        EmpiricalFisher(g.numpy(), 1e-2)
