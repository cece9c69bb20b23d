"""The public API: exact counts, determinism, masks through safetensors and torch.nn.utils.prune, errors."""
import copy
import json
import math

import pytest
import torch
from helpers import assert_same_result, tiny_problem
from torch.nn.utils import prune as torch_prune

import brainsurgeon
from brainsurgeon import BrainSurgeonError, PruneResult
from brainsurgeon.demo import demo_setup
from brainsurgeon.drivers.layers import find_prunable, flat_weights
from brainsurgeon.drivers.registry import options_for
from brainsurgeon.drivers.stage import calibration_loss_fn

METHODS = ["mp", "random", "wf", "cbs", "swaps", "mp+cbsu", "wf+cbsu", "cbs+none", "random+obs", "max"]


def small_mlp(seed=0):
    return tiny_problem(seed, n=64, sizes=((8, 16), (16, 12), (12, 5)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sparsity", [0.0, 0.33, 0.5, 0.9])
def test_exactly_round_s_p_weights_are_pruned(method, sparsity):
    model, x, y = small_mlp()
    options = options_for(method, {"init_trials": 3})
    result = brainsurgeon.prune(model, (x, y), sparsity, method, progress=False, **options)
    p = 8 * 16 + 16 * 12 + 12 * 5
    assert result.num_weights == p
    assert result.num_pruned == int(sparsity * p + 0.5)
    for name, mask in result.masks.items():
        assert torch.all(result.weights[name][~mask] == 0)


def test_the_layer_pattern_prunes_each_layer_to_the_sparsity():
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.7, "cbs", pattern="layer", progress=False, init_trials=3)
    for name, mask in result.masks.items():
        assert int((~mask).sum()) == int(0.7 * mask.numel() + 0.5), name
    with pytest.warns(FutureWarning, match="scope is deprecated: pass pattern='layer'"):
        old = brainsurgeon.prune(model, (x, y), 0.7, "cbs", scope="layer", progress=False, init_trials=3)
    assert_same_result(old, result)


@pytest.mark.parametrize("method", ["mp", "wf", "cbs", "swaps"])
def test_row_and_n_m_patterns_hold_exactly_on_the_fisher_objective(method):
    model, x, y = small_mlp()
    nm = brainsurgeon.prune(model, (x, y), None, method, pattern="1:2", progress=False)
    row = brainsurgeon.prune(model, (x, y), 0.5, method, pattern="row", progress=False)
    for name, mask in nm.masks.items():
        rows = mask.reshape(mask.shape[0], -1, 2)
        assert torch.equal((~rows).sum(-1), torch.ones(rows.shape[:2], dtype=torch.long)), name
        per_row = (~row.masks[name]).reshape(mask.shape[0], -1).sum(1)
        assert int(per_row.max() - per_row.min()) <= 1 and int(per_row.sum()) == int(0.5 * mask.numel() + 0.5)
    assert nm.settings["pattern"] == "1:2" and nm.settings["sparsity"] == 0.5


def test_n_m_is_one_stage_and_global_is_the_fisher_objectives():
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match="pattern 2:4 prunes 0.5 in one stage"):
        brainsurgeon.prune(model, (x, y), None, "cbs", pattern="2:4", stages=2, progress=False)
    with pytest.raises(BrainSurgeonError, match="pattern 'global' is the Fisher objective's"):
        brainsurgeon.prune(model, x, 0.5, "sparsegpt", objective="layer", pattern="global", progress=False)
    with pytest.raises(BrainSurgeonError, match="scope and pattern both given"):
        brainsurgeon.prune(model, (x, y), 0.5, "cbs", pattern="layer", scope="layer", progress=False)


def test_same_seed_same_result_and_model_untouched():
    model, x, y = small_mlp()
    before = copy.deepcopy(model.state_dict())
    first = brainsurgeon.prune(model, (x, y), 0.8, "cbs", seed=3, progress=False, init_trials=5)
    second = brainsurgeon.prune(model, (x, y), 0.8, "cbs", seed=3, progress=False, init_trials=5)
    assert_same_result(first, second)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_random_selection_depends_on_the_seed():
    model, x, y = small_mlp()
    masks = [brainsurgeon.prune(model, (x, y), 0.5, "random", seed=s, progress=False).masks for s in (0, 1)]
    assert any(not torch.equal(masks[0][k], masks[1][k]) for k in masks[0])


def test_calibration_as_batches_equals_pair():
    model, x, y = small_mlp()
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    a = brainsurgeon.prune(model, (x, y), 0.6, "wf", progress=False)
    b = brainsurgeon.prune(model, batches, 0.6, "wf", progress=False)
    assert_same_result(a, b, atol=1e-5)


def test_cbs_search_lowers_its_objective_and_never_returns_a_worse_mask_than_its_start():
    model, x, y = small_mlp()
    cbs = brainsurgeon.prune(model, (x, y), 0.8, "cbs+none", progress=False, init_trials=0)
    assert cbs.stats["cbs_swaps"] > 0
    assert cbs.stats["cbs_final_objective"] < cbs.stats["cbs_start_objective"]
    assert cbs.stats["cbs_best_calibration_loss"] <= cbs.stats["cbs_init_loss"]
    assert brainsurgeon.prune(model, (x, y), 0.8, "mp+none", progress=False).selection_objective is None


def test_masks_round_trip_through_safetensors_and_torch_prune(tmp_path):
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.75, "cbs", progress=False, init_trials=3)
    path = tmp_path / "pruned.safetensors"
    result.save(path, model)
    loaded = PruneResult.load(path)
    assert loaded.settings == result.settings
    assert_same_result(loaded, result)
    applied = result.apply(copy.deepcopy(model))
    masked = loaded.apply_masks(copy.deepcopy(model))
    for name, mask in result.masks.items():
        module = dict(masked.named_modules())[name.rsplit(".", 1)[0]]
        assert torch_prune.is_pruned(module)
        assert torch.equal(module.weight_mask.bool(), mask)
    assert torch.allclose(applied(x), masked(x))


def test_apply_refuses_a_different_model():
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "mp", progress=False)
    with pytest.raises(BrainSurgeonError, match="no parameter"):
        result.apply(torch.nn.Sequential(torch.nn.Linear(3, 3)))


@pytest.mark.parametrize("sparsity", [-0.1, 1.0, 1.5, math.nan])
def test_sparsity_outside_range_is_refused(sparsity):
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match=r"sparsity must be in \[0, 1\)"):
        brainsurgeon.prune(model, (x, y), sparsity, "mp")


def test_bad_inputs_name_the_problem():
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match="no prunable layers"):
        brainsurgeon.prune(model, (x, y), 0.5, "mp", include=["Conv2d"])
    with pytest.raises(BrainSurgeonError, match="unknown selection"):
        brainsurgeon.prune(model, (x, y), 0.5, "obd")
    with pytest.raises(BrainSurgeonError, match="unknown update"):
        brainsurgeon.prune(model, (x, y), 0.5, "mp+sgd")
    with pytest.raises(BrainSurgeonError, match="takes no option .rhoo.; its options are: .*rho"):
        brainsurgeon.prune(model, (x, y), 0.5, "cbs", rhoo=3)
    with pytest.raises(BrainSurgeonError, match="not enough calibration samples"):
        brainsurgeon.prune(model, (x, y), 0.5, "wf", num_samples=1000)
    with pytest.raises(BrainSurgeonError, match="NaN"):
        brainsurgeon.prune(model, (x * math.nan, y), 0.5, "wf")
    with pytest.raises(BrainSurgeonError, match="max_memory"):
        brainsurgeon.prune(model, (x, y), 0.5, "wf", max_memory=1000)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken[0].weight[0, 0] = math.nan
    with pytest.raises(BrainSurgeonError, match="NaN or Inf"):
        brainsurgeon.prune(broken, (x, y), 0.5, "mp")


def test_ignore_patterns_leave_layers_dense_and_say_why():
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "mp", ignore=[r"^0$"], progress=False)
    assert "0.weight" not in result.masks
    assert "ignore" in result.dense_layers["0"]


def test_batchnorm_models_are_pruned_in_eval_mode_and_left_in_their_mode():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    model.train()
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    before = model[1].running_mean.clone()
    result = brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, init_trials=2)
    assert model.training and torch.equal(model[1].running_mean, before)
    assert result.num_pruned == 36  # half of 6*8 + 8*3


@pytest.mark.parametrize("method", ["wf", "cbs", "mp+cbsu", "random+obs"])
def test_one_layer_block_structure_equals_the_full_fisher(method):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(10, 6, bias=False)).eval()
    x, y = torch.randn(30, 10), torch.randint(0, 6, (30,))
    options = options_for(method, {"init_trials": 3})
    full = brainsurgeon.prune(model, (x, y), 0.6, method, structure="full", progress=False, **options)
    layer = brainsurgeon.prune(model, (x, y), 0.6, method, structure="layer", progress=False, **options)
    block = brainsurgeon.prune(model, (x, y), 0.6, method, structure="block:60", progress=False, **options)
    for other in (layer, block):
        assert torch.equal(other.masks["0.weight"], full.masks["0.weight"])
        assert torch.allclose(other.weights["0.weight"], full.weights["0.weight"], atol=1e-6)


@pytest.mark.parametrize("structure", ["layer", "block:7", "block:1"])
@pytest.mark.parametrize("method", ["wf", "cbs"])
def test_block_structures_keep_global_sparsity_exact(structure, method):
    model, x, y = small_mlp()
    options = options_for(method, {"init_trials": 2})
    result = brainsurgeon.prune(model, (x, y), 0.7, method, structure=structure, progress=False, **options)
    assert result.num_pruned == int(0.7 * result.num_weights + 0.5)
    assert result.settings["structure"] == structure
    assert len(set(result.layer_sparsity.values())) > 1  # global: layers end at different sparsities


def test_unknown_structure_is_refused():
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match="unknown Fisher structure"):
        brainsurgeon.prune(model, (x, y), 0.5, "wf", structure="block:0")


@pytest.mark.parametrize("method", ["wf", "cbs", "mp+cbsu", "random+obs"])
def test_streaming_gradients_from_disk_gives_the_in_memory_result(method, tmp_path):
    model, x, y = small_mlp()
    options = options_for(method, {"init_trials": 3})
    common = dict(structure="block:50", progress=False, **options)
    memory = brainsurgeon.prune(model, (x, y), 0.8, method, gradients="memory", **common)
    disk = brainsurgeon.prune(model, (x, y), 0.8, method, gradients="disk", scratch_dir=tmp_path, **common)
    assert disk.settings["gradients"] == "disk" and memory.settings["gradients"] == "memory"
    assert_same_result(disk, memory, atol=1e-6)
    assert not list(tmp_path.iterdir())  # the scratch file is gone


def test_auto_streams_only_when_memory_would_not_fit():
    model, x, y = small_mlp()
    # 38 blocks of 10 weights: in memory every block keeps two 64 x 64 float64 matrices (about 2.5 MB).
    roomy = brainsurgeon.prune(model, (x, y), 0.5, "wf", structure="block:10", progress=False)
    assert roomy.settings["gradients"] == "memory"
    tight = brainsurgeon.prune(model, (x, y), 0.5, "wf", structure="block:10", progress=False, max_memory=2**20)
    assert tight.settings["gradients"] == "disk"
    with pytest.raises(BrainSurgeonError, match="smaller blocks"):
        brainsurgeon.prune(model, (x, y), 0.5, "wf", structure="block:10", max_memory=2**16)


@pytest.fixture(scope="module")
def digits():
    """A small MLP trained on scikit-learn's digits (the demo's), and its training split as calibration."""
    model, dataset = demo_setup(0)
    return model, *dataset.train_split()


def test_cbsu_walks_the_damping_grid_until_the_calibration_loss_rises(digits):
    model, x, y = digits
    for sparsity in (0.8, 0.95):
        result = brainsurgeon.prune(model, (x, y), sparsity, "mp+cbsu", damping_grid=[100, 0.01, 1, 0.1, 10],
                                    progress=False)
        tried = dict(result.stats["cbsu_calibration_losses"])
        uncompensated = tried.pop("none")
        losses = [loss for _, loss in sorted((float(k), v) for k, v in tried.items())]
        assert all(a > b for a, b in zip(losses[:-2], losses[1:-1]))  # falling until the last one tried,
        assert len(losses) == 5 or losses[-1] >= losses[-2]  # which rose or ended the grid
        chosen = result.stats["cbsu_damping"]
        assert (uncompensated if chosen is None else tried[str(chosen)]) == min(losses + [uncompensated])
    result = brainsurgeon.prune(model, (x, y), 0.8, "mp+cbsu", damping_grid=[100, 0.01, 1, 0.1, 10], progress=False)
    single = brainsurgeon.prune(model, (x, y), 0.8, "mp+cbsu", damping=result.stats["cbsu_damping"],
                                damping_grid=[1.0], progress=False)
    for name in single.weights:
        assert torch.allclose(single.weights[name], result.weights[name], atol=1e-6)


def calibration_loss(model, result, x, y):
    pruned = result.apply(copy.deepcopy(model))
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(pruned(x), y))


@pytest.mark.parametrize("sparsity", [0.5, 0.8, 0.9, 0.95])
def test_cbsu_never_leaves_a_higher_calibration_loss_than_no_compensation(digits, sparsity):
    model, x, y = digits
    plain = brainsurgeon.prune(model, (x, y), sparsity, "mp+none", progress=False)
    updated = brainsurgeon.prune(model, (x, y), sparsity, "mp+cbsu", progress=False)
    assert calibration_loss(model, updated, x, y) <= calibration_loss(model, plain, x, y) + 1e-6
    if updated.stats["cbsu_damping"] is None:
        assert all(torch.equal(updated.weights[k], plain.weights[k]) for k in plain.weights)


def test_calibration_loss_remembers_recent_weights_and_never_serves_stale_ones(digits):
    model, x, y = digits
    layers, _ = find_prunable(model, None, ())
    calls = []
    loss_fn = lambda out, target: calls.append(1) or torch.nn.functional.cross_entropy(out, target)
    calibration_loss = calibration_loss_fn(model, layers, x, y, loss_fn, batch_size=len(x))
    flat = flat_weights(model, layers).float()
    first = calibration_loss(flat)
    assert calibration_loss(flat.clone()) == first and len(calls) == 1  # equal values: remembered
    original = flat.clone()
    flat.mul_(0.5)  # the caller's tensor changed in place: a new evaluation
    assert calibration_loss(flat) != first and len(calls) == 2
    flat.copy_(original)
    assert calibration_loss(flat) == first and len(calls) == 2


def test_defaults_that_do_not_fit_memory_are_chosen_to_fit():
    """On ResNet20, 10,000 gradients of the full Fisher need about 21 GiB: one block per layer, streamed, fits 8."""
    from brainsurgeon.curvature.fisher import memory_need
    from brainsurgeon.drivers.layers import find_prunable
    from brainsurgeon.drivers.stage import (
        GIB,
        fisher_regions,
        fitting_structure,
        samples_that_fit,
    )
    from brainsurgeon.models.vision import ResNet20

    layers, _ = find_prunable(ResNet20(), None, ())
    structure, why = fitting_structure(layers, 10_000, "auto", 8 * GIB, 64)
    assert structure == "layer" and "need about 21.4 GiB, above max_memory 8.0 GiB" in why
    assert fitting_structure(layers, 10_000, "auto", 32 * GIB, 64) == ("full", None)
    fitting = samples_that_fit(layers, 10_000, 2 * GIB, 64)
    regions = fisher_regions(layers, "layer")
    assert memory_need(fitting, regions, True, 64) <= 2 * GIB < memory_need(fitting + 1, regions, True, 64)
    assert samples_that_fit(layers, 10_000, 8 * GIB, 64) == 10_000


def test_a_chosen_structure_is_in_the_settings_and_an_explicit_one_is_only_refused():
    model, x, y = tiny_problem(0, n=256, sizes=((64, 64), (64, 10)))
    roomy = brainsurgeon.prune(model, (x, y), 0.5, "wf", progress=False)
    assert roomy.settings["structure"] == "full" and "structure_chosen" not in roomy.settings
    with pytest.raises(BrainSurgeonError, match="above max_memory"):
        brainsurgeon.prune(model, (x, y), 0.5, "wf", max_memory=2**20, structure="full", gradients="memory",
                           progress=False)


def test_the_cli_chooses_fewer_samples_where_the_default_would_not_fit(capsys, mnist_like, tmp_path):
    from brainsurgeon.cli import main

    data, checkpoint = mnist_like
    base = ("bench", "--checkpoint", checkpoint, "--data-dir", data, "--methods", "wf", "--sparsities", "0.5",
            "--max-memory-gb", "0.1")
    assert main([str(a) for a in (*base, "--json", tmp_path / "b.json")]) == 0
    report = json.loads((tmp_path / "b.json").read_text())
    chosen = report["settings"]["calib_samples"]
    assert chosen < 300 and f"{chosen} calibration samples, not 300" in report["settings"]["calib_samples_chosen"]
    assert f"chose {chosen} calibration samples" in capsys.readouterr().err
    code = main([str(a) for a in (*base[:-1], "0.05", "--calib-samples", "300", "--structure", "full",
                                  "--gradients", "memory")])
    assert code == 2 and "above max_memory" in capsys.readouterr().err
