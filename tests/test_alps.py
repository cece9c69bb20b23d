"""The `alps` baseline (methods/alps.py): its refit, run to convergence, is the exact least-squares update on the
support it chose, and its ADMM's penalty follows the support-driven schedule."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_layerwise import PATTERNS, layer_problem

from brainsurgeon import BrainSurgeonError
from brainsurgeon.methods.alps import AlpsLayer
from brainsurgeon.methods.budget import Budget


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), case=st.sampled_from(PATTERNS))
def test_alps_refit_run_to_convergence_is_the_exact_update_on_its_support(seed, case):
    _, _, objective = layer_problem(seed, rows=10, cols=16)
    pattern = Budget.parse(*case)
    pruned, new = AlpsLayer(refit_steps=500).prune(objective, pattern)
    expected = objective.exact_update(pruned)
    # ALPS stops its CG at a residual of 1e-4 (the exact update at 1e-5), both on the damped H: equal errors and
    # weights to that precision
    assert objective.error(new) == pytest.approx(objective.error(expected), rel=1e-4)
    torch.testing.assert_close(new, expected, rtol=1e-2, atol=1e-3 * float(expected.abs().max()))
    capped_pruned, capped = AlpsLayer(refit_steps=0).prune(objective, pattern)
    assert torch.equal(capped_pruned, pruned)  # the refit never moves the support
    assert damped_error(objective, new) <= damped_error(objective, capped) * (1 + 1e-6)  # what the refit minimises


def damped_error(objective, new_weight) -> float:
    """(w - w')^T H_damped (w - w') summed over rows: the objective the refit solves (the layer error plus the
    damping's share)."""
    delta = (objective.weight - new_weight).double()
    return float(((delta @ objective.damped) * delta).sum())


def test_alps_penalty_rises_from_its_start_and_ends_admm_early():
    _, _, objective = layer_problem(5, rows=24, cols=32)
    method = AlpsLayer()
    method.prune(objective, Budget.parse("layer", 0.6))
    stats = method.last_stats
    assert stats["final_penalty"] > method.penalty
    assert method.min_iterations <= stats["admm_iterations"] < method.max_iterations
    assert stats["solve_iterations"] <= method.refit_steps


def test_alps_refuses_bad_options_before_any_work():
    with pytest.raises(BrainSurgeonError, match="refit_steps"):
        AlpsLayer(refit_steps=-1)
    with pytest.raises(BrainSurgeonError, match="its options are: penalty, max_iterations"):
        AlpsLayer(rho=0.1)
