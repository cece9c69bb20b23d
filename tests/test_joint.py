"""The joint selection against brute force on small problems, and multi-stage pruning."""
import copy
import itertools
from types import SimpleNamespace

import pytest
import torch
from helpers import assert_same_result
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api import small_mlp
from test_fresh_samples import pooled_mlp
from test_math import dense_hessian, draw_case, problems, random_problem
from torch.nn import functional as F

import brainsurgeon
from brainsurgeon import BrainSurgeonError
from brainsurgeon.curvature.fisher import EmpiricalFisher
from brainsurgeon.drivers.allocation import exact_layer_sparsities
from brainsurgeon.drivers.calibration import mean_loss
from brainsurgeon.drivers.registry import options_for
from brainsurgeon.drivers.schedule import sparsity_schedule
from brainsurgeon.drivers.tuning import DEFAULT_TUNING
from brainsurgeon.methods.budget import Segment, num_to_prune
from brainsurgeon.methods.joint import JointSearch, JointSelection
from brainsurgeon.methods.problem import PruningProblem


def joint_objective(problem, pruned):
    """Brute force Q*(P) = min over the kept weights of d^T H d, d = x - w, x = 0 on P (dense H)."""
    hessian = dense_hessian(problem)
    w = problem.weights.double()
    kept = ~pruned
    d = torch.zeros_like(w)
    d[pruned] = -w[pruned]
    if kept.any():
        d[kept] = -torch.linalg.solve(hessian[kept][:, kept], hessian[kept][:, pruned] @ d[pruned])
    return float(d @ hessian @ d)


def well_conditioned(spec):
    """KeptSystem takes float32 Gram products (as G is float32), so it agrees with float64 brute force to
    about cond(A) x 1e-7; its algebra is checked with damping >= 0.1, where that is well inside 1e-5."""
    seed, n, p, damping, num_blocks = spec
    return seed, n, p, max(damping, 0.1), num_blocks


def block_system(problem, pruned, block=0):
    search = JointSearch(problem, max_kept=10**6)
    search.offer(pruned)
    return search, search.systems[block], problem.curvature.regions[block]


def close(a, b, scale):
    return abs(a - b) < 1e-5 * (1 + abs(scale))


@settings(max_examples=40, deadline=None)
@given(problems, st.data())
def test_backsolve_objective_equals_brute_force(spec, data):
    problem, pruned = draw_case(spec, data)
    search = JointSearch(problem, max_kept=10**6)
    search.offer(pruned)
    expected = joint_objective(problem, pruned)
    assert close(search.objective, expected, expected)
    assert torch.all(search.x[pruned] == 0)


@settings(max_examples=40, deadline=None)
@given(problems, st.data())
def test_swap_deltas_removal_costs_and_gains_equal_brute_force(spec, data):
    problem, pruned = draw_case(well_conditioned(spec), data)
    search, system, region = block_system(problem, pruned)
    local = pruned[region]
    outside = torch.nonzero(local).squeeze(1)
    if not len(outside) or not len(system.kept):
        return
    pair_deltas, gains = system.candidate_moves(outside)
    before = joint_objective(problem, pruned)
    for slot, i in enumerate(system.kept.tolist()):
        removed = pruned.clone()
        removed[region.start + i] = True
        assert close(float(system.removal_costs()[slot]), joint_objective(problem, removed) - before, before)
        for k, j in enumerate(outside.tolist()):
            swapped = removed.clone()
            swapped[region.start + j] = False
            assert close(float(pair_deltas[slot, k]), joint_objective(problem, swapped) - before, before)
    for k, j in enumerate(outside.tolist()):
        added = pruned.clone()
        added[region.start + j] = False
        assert close(-float(gains[k]), joint_objective(problem, added) - before, before)


@settings(max_examples=30, deadline=None)
@given(problems, st.data())
def test_rank_one_updates_match_a_fresh_factorisation(spec, data):
    """replace (a swap in place), remove and add keep A^-1 and the backsolve equal to rebuilding them."""
    problem, pruned = draw_case(well_conditioned(spec), data)
    search, system, region = block_system(problem, pruned)
    outside = torch.nonzero(pruned[region]).squeeze(1).tolist()
    if not outside or len(system.kept) < 2:
        return
    system.replace(0, outside[0])
    system.remove(1)
    if len(outside) > 1:
        system.add(outside[1])
    fresh = search.kept_system(0, system.kept)
    assert torch.allclose(system.inverse, fresh.inverse, rtol=1e-4, atol=1e-6 * float(fresh.inverse.abs().max()))
    assert torch.allclose(system.solution, fresh.solution, rtol=1e-4, atol=1e-6 * (1 + float(fresh.solution.abs().max())))


@settings(max_examples=25, deadline=None)
@given(problems, st.data(), st.sampled_from(["mp", "random", "wf"]))
def test_joint_never_worse_than_its_warm_start_and_exact_count(spec, data, start):
    problem, _ = draw_case(spec, data)
    problem.show_progress = False
    selection = JointSelection(start=start, swap_candidates=4)
    pruned = selection.select(problem)
    assert int(pruned.sum()) == problem.segments[0].count
    assert problem.stats["joint_objective"] <= problem.stats["joint_start_objective"] * (1 + 1e-9) + 1e-12
    assert close(problem.stats["joint_objective"], joint_objective(problem, pruned), problem.stats["joint_objective"])


def brute_force_minimum(problem):
    p, k = problem.num_weights, problem.segments[0].count
    best = float("inf")
    for chosen in itertools.combinations(range(p), k):
        pruned = torch.zeros(p, dtype=torch.bool)
        pruned[list(chosen)] = True
        best = min(best, joint_objective(problem, pruned))
    return best


@pytest.mark.parametrize("num_blocks", [1, 2])
def test_joint_finds_the_brute_force_optimum_on_small_problems(num_blocks):
    """Enumeration over all C(10, k) pruned sets: the search (from magnitude) reaches the optimum."""
    misses = 0
    for seed in range(12):
        problem = random_problem(seed, n=5, p=10, k=3 + seed % 5, damping=0.05, num_blocks=num_blocks)
        problem.show_progress = False
        pruned = JointSelection(start="mp").select(problem)
        best = brute_force_minimum(problem)
        found = joint_objective(problem, pruned)
        assert found >= best - 1e-6 * (1 + best)
        misses += found > best + 1e-6 * (1 + best)
    assert misses == 0


def test_joint_ends_at_a_swap_local_optimum():
    """No single swap (one weight out of P, one in) lowers Q* once the search stops."""
    problem = random_problem(3, n=8, p=14, k=8, damping=0.01, num_blocks=3)
    problem.show_progress = False
    pruned = JointSelection(start="random").select(problem)
    objective = joint_objective(problem, pruned)
    for i in torch.nonzero(pruned).squeeze(1).tolist():
        for j in torch.nonzero(~pruned).squeeze(1).tolist():
            swapped = pruned.clone()
            swapped[i], swapped[j] = False, True
            assert joint_objective(problem, swapped) >= objective - 1e-6 * (1 + objective)


def test_joint_keeps_per_segment_counts():
    gen = torch.Generator().manual_seed(0)
    fisher = EmpiricalFisher(torch.randn(12, 6, generator=gen) / 6**0.5, 0.1, [slice(0, 5), slice(5, 12)])
    segments = [Segment(slice(0, 5), 2), Segment(slice(5, 12), 4)]
    problem = PruningProblem(weights=torch.randn(12, generator=gen), segments=segments, generator=gen,
                             curvature=fisher, show_progress=False)
    pruned = JointSelection(start="random").select(problem)
    assert int(pruned[:5].sum()) == 2 and int(pruned[5:].sum()) == 4


def test_sparsity_schedule_is_geometric_in_density_and_ends_on_target():
    schedule = sparsity_schedule(0.98, 4)
    assert schedule[-1] == 0.98 and len(schedule) == 4
    densities = [1 - s for s in schedule]
    ratios = [b / a for a, b in zip([1.0] + densities, densities)]
    assert max(ratios) - min(ratios) < 1e-9
    assert sparsity_schedule(0.9, 1) == [0.9]
    assert sparsity_schedule(0.9, schedule=[0.5, 0.9]) == [0.5, 0.9]


@pytest.mark.parametrize("method", ["swaps+cbsu", "swaps+obs"])
def test_one_stage_equals_the_single_stage_method(method):
    model, x, y = small_mlp()
    single = brainsurgeon.prune(model, (x, y), 0.8, method, progress=False, start="wf")
    for staged in (dict(stages=1), dict(schedule=[0.8]), dict(stages=1, first_order=True)):
        other = brainsurgeon.prune(model, (x, y), 0.8, method, progress=False, start="wf", **staged)
        assert_same_result(single, other)


@pytest.mark.slow
def test_stages_reach_the_exact_count_deterministically_and_leave_the_model_untouched():
    model, x, y = small_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [brainsurgeon.prune(model, (x, y), 0.9, "swaps", stages=3, first_order=True, progress=False,
                               start="mp") for _ in range(2)]
    assert runs[0].num_pruned == int(0.9 * runs[0].num_weights + 0.5)
    assert [stage["sparsity"] for stage in runs[0].stats["stages"]] == sparsity_schedule(0.9, 3)
    assert_same_result(runs[0], runs[1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.slow
def test_max_preset_resolves_to_stages_and_takes_overrides():
    model, x, y = pooled_mlp()  # trained: pruning it to 0.95 takes the adaptive schedule several steps
    result = brainsurgeon.prune(model, (x, y), 0.95, "max", progress=False, init_trials=2, layer_start=False)
    walked = [stage["sparsity"] for stage in result.stats["stages"] if "step_loss_bound" in stage]
    assert len(walked) > 1 and result.settings["schedule"] == walked + [0.95] * 2
    assert result.settings["first_method"] == "cbs+cbsu" and result.settings["selection"] == "swaps"
    assert result.settings["first_order"] is True
    assert result.num_pruned == int(0.95 * result.num_weights + 0.5)
    light = brainsurgeon.prune(model, (x, y), 0.95, "max", progress=False, init_trials=2, schedule=[0.9, 0.95],
                               layer_start=False)
    assert light.settings["schedule"] == [0.9, 0.95, 0.95, 0.95]  # the two refinement stages


def test_bad_schedules_are_refused():
    for bad in ([0.5, 0.4, 0.9], [0.5, 0.8], [0.0, 0.9]):
        with pytest.raises(BrainSurgeonError, match="schedule"):
            sparsity_schedule(0.9, schedule=bad)
    with pytest.raises(BrainSurgeonError, match="stages"):
        sparsity_schedule(0.9, 0)


def test_max_below_its_first_stage_is_cbs():
    """Up to 0.86, the Fisher path of 'max' is one cbs stage with the caller's settings: exactly plain cbs."""
    model, x, y = small_mlp()
    for overrides in ({}, {"damping": 1e-5, "selection_damping": 1e-2}):
        plain = brainsurgeon.prune(model, (x, y), 0.6, "cbs", progress=False, init_trials=3, **overrides)
        preset = brainsurgeon.prune(model, (x, y), 0.6, "max", progress=False, init_trials=3, layer_start=False,
                                    **overrides)
        assert preset.settings["method"] == "cbs+cbsu"
        assert_same_result(plain, preset)


def test_later_stages_take_their_own_damping_and_max_passes_cbs_options_on():
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.9, "cbs", schedule=[0.5, 0.9], progress=False, init_trials=2,
                                damping=1e-3, damping_grid=[1.0], later_damping=0.5, later_damping_grid=[1.0])
    first, second = result.stats["stages"]
    assert first["stats"]["cbsu_damping"] == 1e-3 and second["stats"]["cbsu_damping"] == 0.5
    assert options_for("max", {"selection_damping": 1e-2, "rho": 3}) == {"selection_damping": 1e-2, "rho": 3}
    with pytest.raises(BrainSurgeonError, match="damping"):
        brainsurgeon.prune(model, (x, y), 0.9, "max", later_damping=0.0, progress=False)


def test_zero_damping_and_zero_stages_are_refused_not_defaulted():
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match="damping"):
        brainsurgeon.prune(model, (x, y), 0.5, "wf", damping=0.0, progress=False)
    with pytest.raises(BrainSurgeonError, match="stages"):
        brainsurgeon.prune(model, (x, y), 0.5, "mp", stages=0, progress=False)


def test_max_refines_the_path_its_judge_keeps_at_the_exact_count():
    """The two paths are compared before refinement (the layer path is kept only where it is better beyond the
    noise, or the Fisher walk stopped short); only the kept one is refined, and it ends at the exact global count,
    deterministically."""
    model, x, y = small_mlp()
    runs = [brainsurgeon.prune(model, (x, y), sparsity, "max", progress=False, init_trials=2)
            for sparsity in (0.6, 0.9, 0.9)]
    for result in runs:
        losses, path = result.stats["path_calibration_loss"], result.settings["path"]
        evidence = result.stats["path_evidence"]
        assert set(losses) == {"fisher", "layer"}
        assert evidence["fisher_minus_layer"] == pytest.approx(losses["fisher"] - losses["layer"], abs=1e-6)
        beyond_noise = evidence["fisher_minus_layer"] > DEFAULT_TUNING.path_margin * evidence["standard_error"]
        fisher = result.stats["other_path_stages"].get("fisher")  # the Fisher path's stages where it lost
        fisher_reached = fisher is None or fisher[-1]["sparsity"] == result.settings["sparsity"]
        assert path == ("layer" if beyond_noise or not fisher_reached else "fisher")
        assert result.num_pruned == int(result.settings["sparsity"] * result.num_weights + 0.5)
        stages = result.stats["stages"]
        assert result.settings["schedule"] == [stage["sparsity"] for stage in stages]
        (other, other_stages), = result.stats["other_path_stages"].items()
        assert other != path and other_stages[-1]["calibration_loss"] == losses[other]
        walked = [stage for stage in stages if "step_loss_bound" in stage]
        refined = 2 if path == "layer" or len(walked) > 1 else 0
        assert stages[-1 - refined]["calibration_loss"] == losses[path]
        trial = copy.deepcopy(model)
        result.apply(trial)
        assert abs(mean_loss(trial, x, y, F.cross_entropy) - stages[-1]["calibration_loss"]) < 1e-6
        if path == "layer":
            assert result.settings["schedule"] == [result.settings["sparsity"]] * 3
            assert result.settings["first_method"] == "admm (layer-wise, to dense)"
            assert all(stage["path"] == "layer" for stage in stages)
    assert_same_result(runs[1], runs[2])


def test_max_without_its_layer_start_is_the_explicit_fisher_schedule_bit_for_bit():
    model, x, y = small_mlp()
    preset = brainsurgeon.prune(model, (x, y), 0.95, "max", progress=False, init_trials=2, layer_start=False)
    explicit = brainsurgeon.prune(model, (x, y), 0.95, "swaps", progress=False, init_trials=2, first_method="cbs",
                                  schedule="adaptive", refine=2, first_order=True,
                                  later_damping=1e-2, later_damping_grid=(0.01, 0.1, 1.0, 10.0, 100.0, 1000.0),
                                  start="mp", iht_rounds=1, max_swaps=10)
    assert_same_result(preset, explicit)


def test_max_layer_start_is_skipped_with_its_reason_when_the_layer_driver_cannot_prune():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv1d(2, 4, 3), torch.nn.Flatten(), torch.nn.Linear(24, 3))
    x, y = torch.randn(64, 2, 8), torch.randint(0, 3, (64,))
    result = brainsurgeon.prune(model, (x, y), 0.5, "max", progress=False, init_trials=2, include=["Conv1d", "Linear"])
    assert result.settings["path"] == "fisher" and "Conv1d" in result.settings["layer_start_skipped"]
    assert set(result.stats["path_calibration_loss"]) == {"fisher"}


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(1, 500), min_size=1, max_size=8), sparsity=st.floats(0.01, 0.99))
def test_exact_layer_sparsities_add_up_to_the_global_count(sizes, sparsity):
    layers = [SimpleNamespace(module=f"layer{i}", size=size) for i, size in enumerate(sizes)]
    shares = exact_layer_sparsities(layers, sparsity)
    counts = [num_to_prune(shares[layer.module], layer.size) for layer in layers]
    assert sum(counts) == num_to_prune(sparsity, sum(sizes))
    assert all(abs(count - sparsity * size) < 1 for count, size in zip(counts, sizes))


def test_layer_start_must_be_a_bool():
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match="layer_start must be True or False"):
        brainsurgeon.prune(model, (x, y), 0.9, "max", layer_start="yes", progress=False)
