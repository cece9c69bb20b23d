"""Convolutional networks: per-sample gradients, BatchNorm, residual models, ResNet20 on the shared CIFAR-10."""
import copy

import pytest
import torch
from torch import nn

import brainsurgeon
from brainsurgeon.curvature.fisher import per_sample_gradients
from brainsurgeon.datasets.vision import accuracy, load_cifar10
from brainsurgeon.drivers.layers import (
    batchnorm_statistics,
    find_prunable,
    recalibrate_batchnorm,
)
from brainsurgeon.models.vision import ResNet20, build_model


def two_batchnorm_conv_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def small_conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False), nn.ReLU(),  # grouped
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.ReLU(),  # depthwise
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    ).eval()


def test_conv_per_sample_gradients_equal_autograd_one_sample_at_a_time():
    model = small_conv_net()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    x, y = torch.randn(6, 3, 8, 8), torch.randint(0, 4, (6,))
    layers, _ = find_prunable(model, include=["Conv2d", "Linear"])
    gradients_t = per_sample_gradients(model, layers, x, y, nn.functional.cross_entropy, chunk_size=4,
                                       show_progress=False)
    params = dict(model.named_parameters())
    for s in range(len(x)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x[s : s + 1]), y[s : s + 1]).backward()
        expected = torch.cat([params[layer.param].grad.reshape(-1) for layer in layers]) / len(x) ** 0.5
        assert torch.allclose(gradients_t[:, s], expected, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["mp", "wf", "cbs", "wf+cbsu"])
def test_conv_models_prune_to_exact_global_sparsity(method):
    model = small_conv_net()
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 4, (40,))
    result = brainsurgeon.prune(model, (x, y), 0.6, method, include=["Conv2d"], progress=False,
                                **brainsurgeon.drivers.registry.options_for(method, {"init_trials": 2}))
    p = 8 * 3 * 9 + 8 * 2 * 9 + 8 * 1 * 9
    assert result.num_weights == p and result.num_pruned == int(0.6 * p + 0.5)


def test_resnet20_prunes_the_18_block_convolutions_by_default():
    layers, dense = find_prunable(ResNet20())
    assert len(layers) == 18 and sum(layer.size for layer in layers) == 267_264
    assert {"conv1", "fc", "layer2.0.downsample.0", "layer3.0.downsample.0"} <= set(dense)


@pytest.fixture(scope="module")
def resnet20(shared_data):
    model = build_model("resnet20", shared_data / "checkpoints" / "resnet20_cifar10.pth.tar")
    return model, load_cifar10(shared_data / "cifar10")


def test_resnet20_checkpoint_scores_924_of_the_1017_exact_test_images(resnet20):
    model, cifar = resnet20
    assert len(cifar.test_x) == 1017 and cifar.num_train == 50_000
    assert accuracy(model, cifar.test_x, cifar.test_y) == pytest.approx(100 * 924 / 1017)


def test_resnet20_cbs_end_to_end_is_exact_and_beats_magnitude(resnet20):
    model, cifar = resnet20
    calibration = cifar.calibration(128, seed=0)
    mp = brainsurgeon.prune(model, None, 0.7, "mp", progress=False)
    cbs = brainsurgeon.prune(model, calibration, 0.7, "cbs", progress=False, init_trials=5)
    assert cbs.num_pruned == mp.num_pruned == int(0.7 * 267_264 + 0.5)
    mp_acc = accuracy(mp.apply(copy.deepcopy(model)), cifar.test_x, cifar.test_y)
    cbs_acc = accuracy(cbs.apply(copy.deepcopy(model)), cifar.test_x, cifar.test_y)
    assert cbs_acc > mp_acc


def _channel_moments(x: torch.Tensor):
    """Per-channel mean and (biased) variance over every other dimension, in float64."""
    flat = x.double().transpose(0, 1).reshape(x.shape[1], -1)
    return flat.mean(1), flat.var(1, unbiased=False)


def _batchnorm_outputs(model, images):
    """{BatchNorm name: its output on `images`} in eval mode."""
    outputs, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_hook(
                lambda module, args, out, name=name: outputs.setdefault(name, out.detach())))
    with torch.no_grad():
        model.eval()(images)
    for handle in handles:
        handle.remove()
    return outputs


def _resnet20_with_stored_statistics(seed: int) -> nn.Module:
    """A ResNet20 whose BatchNorm statistics are unlike those of random inputs, as after training on other data."""
    torch.manual_seed(seed)
    dense = ResNet20().eval()
    with torch.no_grad():
        for module in dense.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return dense


def test_batchnorm_recalibration_matches_the_dense_outputs_changes_only_statistics_and_restores_modes():
    """Every BatchNorm of the pruned model, shortcuts included, gives on the calibration inputs the per-channel
    mean and variance of the dense model's output; weights, modes and momenta are untouched."""
    dense = _resnet20_with_stored_statistics(0)
    images = torch.randn(48, 3, 32, 32)
    pruned = brainsurgeon.prune(dense, (images, torch.zeros(48, dtype=torch.long)), 0.7, "mp", progress=False)
    model = pruned.apply(copy.deepcopy(dense))
    model.train()
    model.layer2.eval()
    modes = [m.training for m in model.modules()]
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    params = {k: v.clone() for k, v in model.named_parameters()}
    stats = recalibrate_batchnorm(model, dense, images, batch_size=20)
    assert [m.training for m in model.modules()] == modes
    assert [m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)] == momenta
    assert all(torch.equal(v, params[k]) for k, v in model.named_parameters())
    assert len(stats) == 3 * 21  # 21 BatchNorms (stem, 18 in blocks, 2 shortcuts): mean, variance, batch count
    assert all(torch.equal(value, dict(model.named_buffers())[name]) for name, value in stats.items())
    wanted, got = _batchnorm_outputs(dense, images), _batchnorm_outputs(model, images)
    for name in wanted:
        for want, have in zip(_channel_moments(wanted[name]), _channel_moments(got[name])):
            torch.testing.assert_close(have, want, rtol=1e-3, atol=1e-4)
    again = recalibrate_batchnorm(model, dense, images)  # from the re-estimated statistics: the same ones
    for name, value in stats.items():
        torch.testing.assert_close(again[name], value, rtol=1e-5, atol=1e-6)


def test_batchnorm_recalibration_of_the_dense_model_itself_changes_nothing():
    """Unlike re-estimating from the inputs' batch statistics, matching keeps the stored statistics where nothing
    was pruned."""
    dense = _resnet20_with_stored_statistics(1)
    stored = batchnorm_statistics(dense)
    stats = recalibrate_batchnorm(copy.deepcopy(dense), dense, torch.randn(16, 3, 32, 32))
    for name, value in stored.items():
        torch.testing.assert_close(stats[name], value, rtol=1e-5, atol=1e-6)


def test_prune_with_batchnorm_recalibration_carries_the_statistics():
    model = ResNet20().eval()
    images, labels = torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,))
    plain = brainsurgeon.prune(model, (images, labels), 0.5, "mp", progress=False)
    recalibrated = brainsurgeon.prune(model, (images, labels), 0.5, "mp", progress=False, bn_recalibration=True)
    assert all(torch.equal(plain.masks[k], recalibrated.masks[k]) for k in plain.masks)
    assert plain.settings["bn_recalibration"] is False and recalibrated.settings["bn_recalibration"] is True
    pruned = recalibrated.apply(copy.deepcopy(model))
    assert torch.equal(pruned.bn1.running_mean, recalibrated.buffers["bn1.running_mean"])
    assert not torch.equal(pruned.layer3[0].bn1.running_var, model.layer3[0].bn1.running_var)
    trace = recalibrated.stats["stages"]
    assert len(trace) == 1 and trace[0]["sparsity"] == 0.5 and trace[0]["calibration_loss"] > 0
    assert 0 < trace[0]["timings"]["batchnorm"] < trace[0]["seconds"] == recalibrated.timings["total"]


@pytest.mark.parametrize("layer_start", [False, True])
def test_max_with_batchnorm_recalibration_carries_the_final_models_statistics(layer_start):
    """Whichever path wins, the buffers handed back are the re-estimate on the final pruned weights."""
    model = two_batchnorm_conv_net()
    images, labels = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    result = brainsurgeon.prune(model, (images, labels), 0.9, "max", progress=False, bn_recalibration=True,
                                include=["Conv2d", "Linear"], init_trials=2, layer_start=layer_start)
    assert result.settings["layer_start"] is layer_start and result.num_pruned == int(0.9 * result.num_weights + 0.5)
    pruned = result.apply(copy.deepcopy(model))
    again = recalibrate_batchnorm(copy.deepcopy(pruned), model, images)
    for name, value in again.items():
        torch.testing.assert_close(result.buffers[name], value, rtol=1e-4, atol=1e-5)
        assert torch.equal(dict(pruned.named_buffers())[name], result.buffers[name])




def test_layer_objective_with_batchnorm_recalibration_matches_the_dense_model():
    """On the layer-wise objective too the result carries statistics re-estimated on the pruned weights; a
    calibration it cannot take the inputs from is refused before any work."""
    model = two_batchnorm_conv_net()
    images, labels = torch.randn(64, 3, 8, 8), torch.randint(0, 4, (64,))
    options = dict(objective="layer", include=["Conv2d", "Linear"], progress=False)
    plain = brainsurgeon.prune(model, (images, labels), 0.5, "sparsegpt", **options)
    result = brainsurgeon.prune(model, (images, labels), 0.5, "sparsegpt", bn_recalibration=True, **options)
    assert result.settings["bn_recalibration"] is True and plain.settings["bn_recalibration"] is False
    assert not plain.buffers and all(torch.equal(plain.masks[k], result.masks[k]) for k in plain.masks)
    expected = recalibrate_batchnorm(plain.apply(copy.deepcopy(model)), model, images)
    assert set(result.buffers) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(result.buffers[name], value)
    with pytest.raises(brainsurgeon.BrainSurgeonError, match="one tensor or an \\(inputs, targets\\) pair"):
        brainsurgeon.prune(model, list(images.split(16)), 0.5, "sparsegpt", bn_recalibration=True, **options)


def test_max_layer_start_prunes_and_refits_a_resnets_residual_blocks_one_by_one():
    """The layer start finds the residual blocks (the repeated module class holding every pruned layer, each
    feeding the next), prunes them in order and fits each to the dense block's output; tuning turns it off."""
    from brainsurgeon.drivers.tuning import Tuning
    from brainsurgeon.models.vision import ResNet20

    model = ResNet20(blocks=(1, 1, 1)).eval()
    images, labels = torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randint(0, 10, (96,))
    settings = dict(progress=False, init_trials=2, num_samples=64, tuning=Tuning(layer_reconstruct_epochs=2))
    result = brainsurgeon.prune(model, (images, labels), 0.8, "max", **settings)
    assert result.num_pruned == int(0.8 * result.num_weights + 0.5)
    layer_stage = layer_start_stage(result)
    fits = layer_stage["stats"]["reconstruction"]
    assert list(fits) == ["layer1.0", "layer2.0", "layer3.0"]
    assert all(fit["held_out_after"] <= fit["held_out_before"] for fit in fits.values())
    plain = brainsurgeon.prune(model, (images, labels), 0.8, "max",
                               **dict(settings, tuning=Tuning(layer_reconstruct="none")))
    assert "reconstruction" not in layer_start_stage(plain)["stats"]


def layer_start_stage(result) -> dict:
    """The layer start's stage report, on the path taken or the one not taken."""
    stages = result.stats["stages"] + result.stats["other_path_stages"].get("layer", [])
    return next(stage for stage in stages if stage.get("path") == "layer")
