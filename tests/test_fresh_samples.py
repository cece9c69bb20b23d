"""Fresh calibration samples per stage, the held-out samples that judge the stages, and refine='auto'."""
import copy
import re

import pytest
import torch
from helpers import assert_same_result
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api import small_mlp
from torch.nn import functional as F

import brainsurgeon
from brainsurgeon import BrainSurgeonError
from brainsurgeon.drivers import judge, plan, schedule
from brainsurgeon.drivers.calibration import (
    CalibrationPool,
    mean_loss,
    per_sample_losses,
)
from brainsurgeon.drivers.layers import find_prunable, flat_weights
from brainsurgeon.drivers.tuning import DEFAULT_TUNING
from brainsurgeon.methods.budget import Budget, smallest_magnitude


@settings(max_examples=60, deadline=None)
@given(per_stage=st.integers(1, 12), extra=st.integers(0, 40), index=st.integers(0, 30))
def test_each_stage_fits_its_own_samples_and_never_the_held_out_ones(per_stage, extra, index):
    rows = torch.arange(per_stage + extra)
    pool = CalibrationPool(rows.unsqueeze(1).float(), rows, per_stage)
    inputs, targets = pool.stage(index)
    assert len(targets) == per_stage and torch.equal(inputs[:, 0].long(), targets)
    first, _ = pool.stage(0)
    assert torch.equal(first[:, 0].long(), rows[:per_stage])  # the first stage is the plain prune's
    if extra < per_stage:  # no room for held-out samples: every stage fits the same ones
        assert pool.held_out is None and torch.equal(targets, rows[:per_stage])
        return
    held_out = pool.held_out[1]
    assert torch.equal(held_out, rows[-per_stage:])
    assert not set(targets.tolist()) & set(held_out.tolist())
    if (index + 1) * per_stage <= len(rows) - per_stage:  # until every sample is used, stages share none
        assert torch.equal(targets, rows[index * per_stage:(index + 1) * per_stage])
    else:
        assert len(set(targets.tolist())) == per_stage
        assert torch.equal(targets, pool.stage(index)[1])  # seeded


def pooled_mlp(samples=256):
    """The small MLP trained briefly on a noisy linear teacher, so that pruning it costs loss."""
    model, _, _ = small_mlp()
    torch.manual_seed(1)
    x = torch.randn(samples, 8)
    y = (x @ torch.randn(8, 5)).argmax(1)
    flip = torch.rand(samples) < 0.1
    y[flip] = torch.randint(0, 5, (int(flip.sum()),))
    optimiser = torch.optim.Adam(model.parameters(), lr=0.03)
    for _ in range(200):
        optimiser.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimiser.step()
    return model.requires_grad_(False).eval(), x, y


def test_a_single_stage_on_a_larger_pool_is_the_prune_of_its_first_samples():
    model, x, y = pooled_mlp()
    plain = brainsurgeon.prune(model, (x[:64], y[:64]), 0.6, "cbs", progress=False, init_trials=3)
    pooled = brainsurgeon.prune(model, (x, y), 0.6, "cbs", num_samples=64, progress=False, init_trials=3,
                                fresh_samples=True)
    assert_same_result(plain, pooled)


def test_auto_refinement_keeps_stages_while_they_stay_below_the_unrefined_held_out_loss():
    model, x, y = pooled_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.9, "max", num_samples=32, progress=False, init_trials=2)
    assert result.settings["held_out_samples"] == 32 and result.settings["refine"] == "auto"
    assert result.num_pruned == int(0.9 * result.num_weights + 0.5)
    stages = result.stats["stages"]
    refined = [stage for stage in stages if "step_loss_bound" not in stage] \
        if result.settings["path"] == "fisher" else stages[1:]
    assert len(refined) == result.settings["refined_stages"] <= DEFAULT_TUNING.refine_limit
    unrefined = stages[-len(refined) - 1]["held_out_loss"]
    assert all(stage["held_out_loss"] < unrefined for stage in refined)
    rejected = result.stats["rejected_stage"]
    assert (rejected is None) == (len(refined) == DEFAULT_TUNING.refine_limit)
    if rejected is not None:
        assert rejected["held_out_loss"] >= unrefined
    pruned = result.apply(copy.deepcopy(model))
    assert abs(mean_loss(pruned, x[-32:], y[-32:], F.cross_entropy) - stages[-1]["held_out_loss"]) < 1e-6


def test_a_refinement_stage_that_raises_the_held_out_loss_is_undone():
    """A stage made worse on purpose through the public on_stage hook (its weights doubled) is reported as
    rejected, and the result is the model before it."""
    seen = []

    def spoilt_refinement(stage, sparsity, result):
        seen.append((stage, sparsity))
        if stage > 2:  # after the two stages of the schedule
            result.weights = {name: 2 * weight for name, weight in result.weights.items()}
            return result
        return None

    model, x, y = pooled_mlp()
    settings = dict(num_samples=32, progress=False, init_trials=2, layer_start=False, schedule=[0.5, 0.9])
    unrefined = brainsurgeon.prune(model, (x, y), 0.9, "max", refine=0, **settings)
    refined = brainsurgeon.prune(model, (x, y), 0.9, "max", on_stage=spoilt_refinement, **settings)
    assert seen == [(1, 0.5), (2, 0.9), (3, 0.9)]
    assert refined.settings["schedule"] == [0.5, 0.9] and refined.stats["rejected_stage"]["sparsity"] == 0.9
    assert refined.stats["rejected_stage"]["held_out_loss"] > refined.stats["stages"][-1]["held_out_loss"]
    for name in unrefined.weights:
        assert torch.equal(unrefined.weights[name], refined.weights[name])


def test_on_stage_sees_every_stage_and_a_wrong_answer_is_one_error():
    model, x, y = pooled_mlp()
    seen = []
    one = brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, num_samples=32,
                             on_stage=lambda *args: seen.append(args))
    assert [(stage, sparsity) for stage, sparsity, _ in seen] == [(1, 0.5)]
    assert seen[0][2].weights.keys() == one.weights.keys()
    with pytest.raises(BrainSurgeonError, match="on_stage returned int for stage 1; return a PruneResult"):
        brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, num_samples=32, on_stage=lambda *args: 3)
    with pytest.raises(BrainSurgeonError, match="on_stage must be callable"):
        brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, on_stage="print")
    with pytest.raises(BrainSurgeonError, match="objective='layer' does not use on_stage"):
        brainsurgeon.prune(model, x, 0.5, "sparsegpt", objective="layer", progress=False, on_stage=print)


@pytest.mark.parametrize("held_out_losses, kept", [
    ([0.8, 0.9, 0.85, 1.0, 0.7], 3),  # above the best stage so far but below the unrefined 1.0: kept
    ([1.0, 0.5], 0),  # level with the unrefined model: undone at once
    ([0.9] * 20, DEFAULT_TUNING.refine_limit),
])
def test_auto_refinement_stops_at_the_first_stage_not_below_the_unrefined_held_out_loss(held_out_losses, kept):
    """Stages with made-up held-out losses after an unrefined 1.0: the first one at or above it is undone (the
    model is back to what the stage before it left) and reported, and no stage runs after it."""
    model, x, y = pooled_mlp()
    planned = plan.plan_run(model, 0.5, "max", num_samples=32, progress=False)
    pool = schedule.collect_pool((x, y), planned)
    losses, ran = iter(held_out_losses), []

    def made_up_stage(pool, plan, dense, progress, staged, schedule, **where):
        with torch.no_grad():
            next(staged.parameters()).add_(1.0)  # a change the undoing must reverse
        ran.append(copy.deepcopy(staged.state_dict()))
        return f"result {len(ran)}", [dict(held_out_loss=next(losses), calibration_loss=0.0)]

    staged, unrefined = copy.deepcopy(model), [dict(held_out_loss=1.0, calibration_loss=0.0)]
    result, reports, rejected = schedule.refine_stages(pool, planned, None, False, staged, "unrefined", unrefined,
                                                DEFAULT_TUNING.refine_limit, None, run=made_up_stage)
    assert [r["held_out_loss"] for r in reports[1:]] == held_out_losses[:kept]
    assert result == (f"result {kept}" if kept else "unrefined")
    if kept == DEFAULT_TUNING.refine_limit:
        assert rejected is None and len(ran) == kept
    else:
        assert rejected["held_out_loss"] == held_out_losses[kept] and len(ran) == kept + 1
    state = ran[kept - 1] if kept else model.state_dict()
    for name, value in staged.state_dict().items():
        assert torch.equal(value, state[name])


def test_auto_refinement_without_held_out_samples_runs_a_fixed_number_of_stages():
    model, x, y = pooled_mlp(64)
    result = brainsurgeon.prune(model, (x, y), 0.9, "max", progress=False, init_trials=2, layer_start=False,
                                schedule=[0.5, 0.9])
    assert result.settings["held_out_samples"] == 0
    assert result.settings["schedule"] == [0.5, 0.9] + [0.9] * DEFAULT_TUNING.refine_without_held_out


@pytest.mark.parametrize("option, value, message", [
    ("fresh_samples", "yes", "fresh_samples must be True or False"),
    ("refine", "sometimes", "refine"),
    ("refine", -1, "refine"),
])
def test_bad_stage_options_are_refused(option, value, message):
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match=message):
        brainsurgeon.prune(model, (x, y), 0.9, "max", progress=False, **{option: value})


@settings(max_examples=40, deadline=None)
@given(sparsity=st.floats(0.0, 0.95), seed=st.integers(0, 1000),
       pattern=st.sampled_from(["global", "layer", "row", "1:2", "2:4"]))
def test_magnitude_pruning_zeroes_each_segments_smallest_weights(sparsity, seed, pattern):
    model, _, _ = small_mlp(seed)
    layers, _ = find_prunable(model)
    flat = flat_weights(model, layers)
    chosen = Budget.parse(pattern, None if ":" in pattern else sparsity)
    try:
        segments = chosen.segments_over(layers)
    except BrainSurgeonError as error:  # a row pattern that would empty a row of the small model
        assert "would prune every weight" in str(error)
        return
    pruned = flat * ~smallest_magnitude(flat, segments)
    for segment in segments:
        kept, region = pruned[segment.region] != 0, flat[segment.region]
        assert int((~kept).sum()) == segment.count
        assert torch.equal(pruned[segment.region][kept], region[kept])
        if segment.count and kept.any():
            assert region[~kept].abs().max() <= region[kept].abs().min()


def _walked(result) -> list:
    """The stages of an adaptive walk (those with a step bound): the refinement stages come after them."""
    return [stage for stage in result.stats["stages"] if "step_loss_bound" in stage]


@pytest.mark.parametrize("sparsity", [0.5, 0.9, 0.97])
def test_the_adaptive_schedule_ends_exactly_at_the_target_count(sparsity):
    model, x, y = pooled_mlp()
    result = brainsurgeon.prune(model, (x, y), sparsity, "max", num_samples=32, schedule="adaptive",
                                layer_start=False, progress=False, init_trials=2)
    assert result.num_pruned == int(sparsity * result.num_weights + 0.5)
    walked = [stage["sparsity"] for stage in _walked(result)]
    assert walked[-1] == sparsity and all(a < b for a, b in zip(walked, walked[1:]))


def test_each_adaptive_step_keeps_its_bound_unless_it_is_the_shortest():
    """A step's magnitude-pruned loss is within its bound, or the step is the shortest one (1/max_walk_stages of
    the log-density to the target); and the bound is step_loss_ratio times the judged loss of the model the step
    starts from."""
    model, x, y = pooled_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.97, "max", num_samples=32, schedule="adaptive", refine=0,
                                layer_start=False, progress=False, init_trials=2)
    walked, previous = _walked(result), dict(sparsity=0.0, held_out_loss=mean_loss(model, x[-32:], y[-32:],
                                                                                    F.cross_entropy))
    assert 2 < len(walked) <= DEFAULT_TUNING.max_walk_stages
    for stage in walked:
        assert stage["step_loss_bound"] == pytest.approx(DEFAULT_TUNING.step_loss_ratio * previous["held_out_loss"])
        shortest = 1 - (1 - previous["sparsity"]) * 0.03 ** (1 / DEFAULT_TUNING.max_walk_stages)
        assert stage["step_magnitude_loss"] <= stage["step_loss_bound"] or \
            stage["sparsity"] == pytest.approx(min(shortest, 0.97))
        previous = stage


def test_the_adaptive_schedule_is_deterministic_and_pinned_reproduces_it_bit_for_bit():
    model, x, y = pooled_mlp()
    settings = dict(num_samples=32, layer_start=False, progress=False, init_trials=2)
    first = brainsurgeon.prune(model, (x, y), 0.9, "max", schedule="adaptive", seed=3, **settings)
    again = brainsurgeon.prune(model, (x, y), 0.9, "max", schedule="adaptive", seed=3, **settings)
    walked = [stage["sparsity"] for stage in _walked(first)]
    pinned = brainsurgeon.prune(model, (x, y), 0.9, "max", schedule=walked, refine=first.settings["refined_stages"],
                                seed=3, **settings)
    assert first.settings["schedule"] == again.settings["schedule"] == pinned.settings["schedule"]
    for other in (again, pinned):
        assert_same_result(first, other)


def test_a_walk_stops_once_the_other_path_is_better_beyond_the_noise_and_not_at_a_tie():
    model, x, y = pooled_mlp()
    planned = plan.plan_run(model, 0.97, "max", num_samples=32, progress=False, init_trials=2)
    pool = schedule.collect_pool((x, y), planned)
    _, whole = schedule.walk(pool, planned, False, False, copy.deepcopy(model))
    first = copy.deepcopy(model)
    schedule.run_stages(pool, planned, False, False, first, [(whole[0]["sparsity"], planned.methods[0])])
    tie = per_sample_losses(first, *pool.held_out, F.cross_entropy)  # as good as the walk's first stage
    _, stopped = schedule.walk(pool, planned, False, False, copy.deepcopy(model), rival=tie - 1e-3)
    _, past_tie = schedule.walk(pool, planned, False, False, copy.deepcopy(model), rival=tie)
    assert len(whole) > 1 and whole[-1]["sparsity"] == 0.97
    assert [stage["sparsity"] for stage in stopped] == [whole[0]["sparsity"]]
    assert len(past_tie) > 1 and [stage["sparsity"] for stage in past_tie] == \
        [stage["sparsity"] for stage in whole[:len(past_tie)]]


def test_per_sample_losses_average_to_the_mean_loss():
    model, x, y = pooled_mlp()
    losses = per_sample_losses(model, x, y, F.cross_entropy)
    assert losses.shape == (len(x),)
    assert float(losses.mean()) == pytest.approx(mean_loss(model, x, y, F.cross_entropy), rel=1e-5)
    assert float(losses[7]) == pytest.approx(float(F.cross_entropy(model(x[7:8]), y[7:8])), rel=1e-5)


@settings(max_examples=80, deadline=None)
@given(losses=st.lists(st.tuples(st.floats(0, 10), st.floats(0, 10)), min_size=2, max_size=40),
       shift=st.floats(-1, 1))
def test_the_layer_path_wins_only_beyond_the_margin_and_a_short_walk_never(losses, shift):
    """choose_path's evidence is the paired mean difference and its standard error; moving the layer path's losses
    by a constant moves only the mean, and the choice flips where the mean passes PATH_MARGIN errors."""
    fisher = torch.tensor([a for a, _ in losses], dtype=torch.float64)
    layer = torch.tensor([b for _, b in losses], dtype=torch.float64)
    path, evidence = judge.choose_path(fisher, layer - shift, True, DEFAULT_TUNING.path_margin)
    difference = fisher - layer
    error = float(difference.std()) / len(losses) ** 0.5
    assert evidence["standard_error"] == pytest.approx(error, abs=1e-9)
    assert evidence["fisher_minus_layer"] == pytest.approx(float(difference.mean()) + shift, abs=1e-9)
    margin = evidence["fisher_minus_layer"] - DEFAULT_TUNING.path_margin * error
    if abs(margin) > 1e-9:
        assert path == ("layer" if margin > 0 else "fisher")
    assert judge.choose_path(fisher, layer - shift, False, DEFAULT_TUNING.path_margin)[0] == "layer"
    assert judge.choose_path(fisher, fisher, True, DEFAULT_TUNING.path_margin)[0] == "fisher"


@pytest.mark.parametrize("method, options, named", [
    ("max", {}, "layer_start, schedule='adaptive'"),
    ("mp", {"schedule": "adaptive"}, "schedule='adaptive'"),
])
def test_what_needs_calibration_data_is_named_when_there_is_none(method, options, named):
    model, _, _ = small_mlp()
    with pytest.raises(BrainSurgeonError, match=f"{re.escape(named)} need calibration data"):
        brainsurgeon.prune(model, None, 0.9, method, progress=False, **options)


def test_the_staged_constants_are_settings_of_one_tuning_object():
    from brainsurgeon import Tuning

    model, x, y = pooled_mlp()
    settings = dict(num_samples=32, progress=False, init_trials=2, layer_start=False, schedule=[0.5, 0.9])
    one = brainsurgeon.prune(model, (x, y), 0.9, "max", tuning=Tuning(refine_limit=1), **settings)
    assert one.settings["refined_stages"] <= 1
    assert_same_result(one, brainsurgeon.prune(model, (x, y), 0.9, "max", refine_limit=1, **settings))
    with pytest.raises(BrainSurgeonError, match="step_loss_ratio must be"):
        Tuning(step_loss_ratio=0.5)
    with pytest.raises(BrainSurgeonError, match="objective='layer' does not use refine_limit"):
        brainsurgeon.prune(model, x, 0.5, "sparsegpt", objective="layer", refine_limit=3, progress=False)
