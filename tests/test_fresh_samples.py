"""Fresh calibration samples per stage, the held-out samples that judge the stages, and refine='auto'."""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_api import small_mlp
from torch.nn import functional as F

import brainsurgeon
from brainsurgeon import BrainSurgeonError
from brainsurgeon.drivers import oneshot
from brainsurgeon.drivers.calibration import CalibrationPool, mean_loss


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
    for name in plain.masks:
        assert torch.equal(plain.masks[name], pooled.masks[name])
        assert torch.equal(plain.weights[name], pooled.weights[name])


def test_auto_refinement_keeps_only_stages_that_lower_the_held_out_loss():
    model, x, y = pooled_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.9, "max", num_samples=32, progress=False, init_trials=2)
    assert result.settings["held_out_samples"] == 32 and result.settings["refine"] == "auto"
    assert result.num_pruned == int(0.9 * result.num_weights + 0.5)
    stages = result.stats["stages"]
    refined = stages[-(len(stages) - len(oneshot.sparsity_schedule(0.9, schedule="gradual"))):] \
        if result.settings["path"] == "fisher" else stages[1:]
    assert len(refined) <= oneshot.REFINE_LIMIT
    losses = [stage["held_out_loss"] for stage in stages[-len(refined) - 1:]]
    assert all(after < before for before, after in zip(losses, losses[1:]))
    if result.stats["rejected_stage"] is not None:
        assert result.stats["rejected_stage"]["held_out_loss"] >= losses[-1]
    pruned = result.apply(copy.deepcopy(model))
    assert abs(mean_loss(pruned, x[-32:], y[-32:], F.cross_entropy) - stages[-1]["held_out_loss"]) < 1e-6


def test_a_refinement_stage_that_raises_the_held_out_loss_is_undone(monkeypatch):
    """A stage made worse on purpose (its weights doubled) is reported as rejected, and the result is the model
    before it."""
    real_stage, calls = oneshot._prune_stage, []

    def spoilt_refinement(*args, **kwargs):
        result = real_stage(*args, **kwargs)
        calls.append(result)
        if len(calls) > 2:  # after the two stages of the schedule
            result.weights = {name: 2 * weight for name, weight in result.weights.items()}
        return result

    model, x, y = pooled_mlp()
    settings = dict(num_samples=32, progress=False, init_trials=2, layer_start=False, schedule=[0.5, 0.9])
    unrefined = brainsurgeon.prune(model, (x, y), 0.9, "max", refine=0, **settings)
    monkeypatch.setattr(oneshot, "_prune_stage", spoilt_refinement)
    refined = brainsurgeon.prune(model, (x, y), 0.9, "max", **settings)
    assert refined.settings["schedule"] == [0.5, 0.9] and refined.stats["rejected_stage"]["sparsity"] == 0.9
    assert refined.stats["rejected_stage"]["held_out_loss"] > refined.stats["stages"][-1]["held_out_loss"]
    for name in unrefined.weights:
        assert torch.equal(unrefined.weights[name], refined.weights[name])


def test_auto_refinement_without_held_out_samples_runs_a_fixed_number_of_stages():
    model, x, y = pooled_mlp(64)
    result = brainsurgeon.prune(model, (x, y), 0.9, "max", progress=False, init_trials=2, layer_start=False,
                                schedule=[0.5, 0.9])
    assert result.settings["held_out_samples"] == 0
    assert result.settings["schedule"] == [0.5, 0.9] + [0.9] * oneshot.REFINE_WITHOUT_HELD_OUT


@pytest.mark.parametrize("option, value, message", [
    ("fresh_samples", "yes", "fresh_samples must be True or False"),
    ("refine", "sometimes", "refine"),
    ("refine", -1, "refine"),
])
def test_bad_stage_options_are_refused(option, value, message):
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match=message):
        brainsurgeon.prune(model, (x, y), 0.9, "max", progress=False, **{option: value})
