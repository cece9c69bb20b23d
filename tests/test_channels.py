"""Structured pruning of a convolutional network's channels (issue 23): the residual blocks' inner channels found
by the probes, the surgery exact, BatchNorm shrunk with them, Torch-Pruning's importance as Torch-Pruning computes
it, and the vision bench's measurements."""
import copy

import pytest
import torch

from brainsurgeon import BrainSurgeonError
from brainsurgeon.bench_structured import macs
from brainsurgeon.bench_structured_vision import (
    markdown_table,
    run_vision_structured_benchmark,
)
from brainsurgeon.datasets.vision import Dataset
from brainsurgeon.drivers.layers import recalibrate_batchnorm
from brainsurgeon.drivers.structured import prune_structured, unit_totals
from brainsurgeon.models.vision import ResNet20


def tiny_resnet():
    """ResNet20's shape with one block per stage and BatchNorm layers that shift and scale."""
    torch.manual_seed(0)
    model = ResNet20(blocks=(1, 1, 1))
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.2)
            module.running_mean.normal_(0, 0.2)
            module.running_var.uniform_(0.5, 2)
    return model.eval()


def images(count=16, seed=0):
    return torch.randn(count, 3, 8, 8, generator=torch.Generator().manual_seed(seed))  # small: the probes run often


def with_channels_zeroed(model, removed: dict, x):
    """The dense model's logits with the removed channels of each consumer's input set to zero."""
    handles = []
    for name, channels in removed.items():
        def zero(module, inputs, channels=torch.tensor(channels)):
            out = inputs[0].clone()
            out[:, channels] = 0
            return (out, *inputs[1:])
        handles.append(model.get_submodule(name).register_forward_pre_hook(zero))
    try:
        with torch.no_grad():
            return model(x)
    finally:
        for handle in handles:
            handle.remove()


def test_inner_channels_are_units_and_the_surgery_is_exact():
    model, x = tiny_resnet(), images()
    result = prune_structured(model, x, 0.5, "l1", units_of="channels", progress=False)  # no refit
    assert set(result.widths) == {"layer1.0.conv2", "layer2.0.conv2", "layer3.0.conv2"}
    for name, (width, kept) in result.widths.items():
        stats = result.stats[name]
        assert stats["kind"] == "channels" and stats["producers"] == [name[:-1] + "1", name.replace("conv2", "bn1")]
        assert len(stats["removed"]) == width // 2 and kept == width - width // 2
        block = result.model.get_submodule(name.rsplit(".", 1)[0])
        assert block.conv1.out_channels == block.bn1.num_features == block.conv2.in_channels == kept
        assert block.bn1.running_mean.shape == (kept,)
        assert torch.equal(result.kept_rows[name.replace("conv2", "bn1")],
                           torch.tensor(sorted(set(range(width)) - set(stats["removed"]))))
    removed = {name: stats["removed"] for name, stats in result.stats.items()}
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), with_channels_zeroed(model, removed, x), rtol=1e-5, atol=1e-5)
    dense, shrunk = result.parameters_before_after(model)
    assert shrunk < dense and macs(result.model, x[:1]) < macs(model, x[:1])
    assert set(result.left_dense) == {"conv1", "layer2.0.downsample.0", "layer3.0.downsample.0", "fc"}
    assert "residual stream" in result.left_dense["conv1"]


def test_refits_lower_the_error_and_swaps_never_end_above_obs():
    model, x = tiny_resnet(), images()
    runs = {method: prune_structured(model, x, 0.5, method, units_of="channels", progress=False)
            for method in ("l1", "obs", "swaps")}
    first = "layer1.0.conv2"  # the first consumer sees the same inputs under every method
    assert runs["obs"].stats[first]["error"] <= runs["l1"].stats[first]["error"]
    assert runs["swaps"].stats[first]["error"] <= runs["swaps"].stats[first]["start_error"] * (1 + 1e-9)
    again = prune_structured(model, x, 0.5, "swaps", units_of="channels", progress=False)
    assert again.stats == runs["swaps"].stats  # deterministic


@pytest.mark.parametrize("allocation", ["errors", "loss"])
def test_the_macs_budget_is_spent_and_counted_like_the_flop_counter(allocation):
    model, x = tiny_resnet(), images()
    totals = unit_totals(model, x, cost="macs")
    result = prune_structured(model, x, 0.5, "obs", units_of="channels", allocation=allocation, cost="macs",
                              progress=False)  # loss: the cross-entropy against the model's own predictions
    removed = macs(model, x[:1]) - macs(result.model, x[:1])
    largest = max(stats["units"] for stats in result.stats.values())
    assert abs(removed - 0.5 * totals["channels"]) <= totals["channels"] / largest  # within one unit's cost
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    with pytest.raises(BrainSurgeonError, match="cost"):
        prune_structured(model, x, 0.5, "obs", units_of="channels", cost="flops", progress=False)


def test_torch_pruning_ranks_by_its_group_magnitude():
    pytest.importorskip("torch_pruning")
    model, x = tiny_resnet(), images()
    result = prune_structured(model, x, 0.25, "tp", units_of="channels", progress=False)
    block = model.layer2[0]
    # GroupMagnitudeImportance: the mean over the coupled layers of each channel's squared L2 norm
    importance = (block.conv1.weight.flatten(1).pow(2).sum(1) + block.bn1.weight.pow(2)
                  + block.conv2.weight.transpose(0, 1).flatten(1).pow(2).sum(1))
    expected = sorted(torch.argsort(importance)[:8].tolist())
    assert result.stats["layer2.0.conv2"]["removed"] == expected


def test_batchnorm_matching_follows_the_kept_channels():
    model, x = tiny_resnet(), images(32)
    result = prune_structured(model, x, 0.5, "obs", units_of="channels", progress=False)
    matched = copy.deepcopy(result.model)
    recalibrate_batchnorm(matched, model, x, kept=result.kept_rows)
    # the first shrunk BatchNorm sees its dense inputs on the kept channels: matching leaves it as it was
    torch.testing.assert_close(matched.layer1[0].bn1.running_var, result.model.layer1[0].bn1.running_var)
    assert not torch.allclose(matched.layer2[0].bn2.running_mean, result.model.layer2[0].bn2.running_mean)


def test_the_vision_bench_measures_every_prune_twice(tmp_path, capsys):
    model = tiny_resnet()
    labels = torch.randint(0, 10, (64,), generator=torch.Generator().manual_seed(1))
    dataset = Dataset("random", images(64), labels, images(32, 2), labels[:32])
    report = run_vision_structured_benchmark(model, dataset, ["l1", "swaps"], ["uniform"], [0.3], seeds=[0, 1],
                                             calib_samples=32, progress=False)
    assert len(report["results"]) == 8 and report["complete"]
    for row in report["results"]:
        assert abs(row["macs_removed"] - 0.3) < 0.1 and row["parameters"] < report["dense"]["parameters"]
        assert row["speedup_b1"] > 0 and row["latency_pruned_b128"] > 0
    table = markdown_table(report)
    assert "| swaps · uniform · BN matched |" in table and "0.3 of MACs" in table
    towards = run_vision_structured_benchmark(model, dataset, ["obs"], ["uniform"], [0.3], calib_samples=32,
                                              target="dense", row_weights="none", json_path=tmp_path / "dense.json",
                                              progress=False)
    assert towards["settings"]["target"] == "dense" and towards["settings"]["row_weights"] == "none"
    from brainsurgeon.bench import write_json
    from brainsurgeon.cli import main
    write_json(report, tmp_path / "layer.json")
    assert main(["table", str(tmp_path / "layer.json"), str(tmp_path / "dense.json"), "--plot",
                 str(tmp_path / "plot.png")]) == 0
    printed = capsys.readouterr().out
    assert "| obs · uniform · dense target · rows unweighted |" in printed and "| l1 · uniform |" in printed
    assert (tmp_path / "plot.png").stat().st_size > 0
    with pytest.raises(BrainSurgeonError, match="MACs from channels alone"):
        run_vision_structured_benchmark(model, dataset, ["l1"], ["uniform"], [0.99], progress=False)


def test_a_shrunk_network_round_trips_through_save_resized_and_load_resized(tmp_path):
    from brainsurgeon import load_resized, save_resized

    model, x = tiny_resnet(), images()
    result = prune_structured(model, x, 0.5, "swaps", units_of="channels", biases="add", progress=False)
    save_resized(result.model, model, tmp_path / "shrunk.safetensors")
    reloaded = load_resized(ResNet20(blocks=(1, 1, 1)), tmp_path / "shrunk.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), result.model(x), rtol=0, atol=0)
    assert reloaded.layer1[0].conv2.bias is not None  # the bias the refit added
    with pytest.raises(BrainSurgeonError, match="do not fit the model given|names"):
        load_resized(ResNet20(), tmp_path / "shrunk.safetensors")  # another architecture
    (tmp_path / "plain.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(BrainSurgeonError, match="cannot read"):
        load_resized(ResNet20(), tmp_path / "plain.safetensors")


@pytest.mark.slow
def test_the_cli_writes_a_shrunk_resnet20_that_load_resized_rebuilds(shared_data, capsys, tmp_path):
    import json

    from brainsurgeon import load_resized, save_resized
    from brainsurgeon.cli import main
    from brainsurgeon.datasets.vision import accuracy, load_cifar10

    checkpoint = shared_data / "checkpoints" / "resnet20_cifar10.pth.tar"
    common = ["prune", "--model", "resnet20", "--checkpoint", str(checkpoint), "--dataset", "cifar10",
              "--data-dir", str(shared_data / "cifar10"), "--pattern", "channels", "--quiet"]
    out, report = tmp_path / "r20.safetensors", tmp_path / "report.json"
    code = main([*common, "--sparsity", "0.3", "--method", "obs", "--allocation", "errors", "--biases", "add",
                 "--target", "dense", "--calib-samples", "64", "--bn-recalibration", "--out", str(out),
                 "--report", str(report)])
    assert code == 0, capsys.readouterr().err
    figures = json.loads(report.read_text())
    assert figures["pruned"]["parameters"] < figures["dense"]["parameters"]
    assert figures["settings"]["biases"] == "add" and figures["settings"]["bn_matching"]
    assert figures["settings"]["target"] == "dense"
    reloaded = load_resized(ResNet20(), out)
    cifar = load_cifar10(shared_data / "cifar10")
    assert accuracy(reloaded, cifar.test_x, cifar.test_y) == pytest.approx(figures["pruned"]["accuracy"])
    assert sum(p.numel() for p in reloaded.parameters()) == figures["pruned"]["parameters"]
    save_resized(ResNet20(), ResNet20(), tmp_path / "dense.safetensors")  # nothing resized: an empty map
    assert isinstance(load_resized(ResNet20(), tmp_path / "dense.safetensors"), ResNet20)
    for flags, message in ((["--damp", "1e-3"], "--damp does not apply"),
                           (["--hf-model", str(tmp_path)], "pass --model and --checkpoint")):
        assert main([*common, "--sparsity", "0.3", "--out", str(tmp_path / "x"), *flags]) == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_a_consumer_feeding_a_batchnorm_is_judged_after_it():
    from helpers import tiny_llama

    from brainsurgeon.models.surgery import output_scales

    model, x = tiny_resnet(), images(4)
    bn = model.layer2[0].bn2
    expected = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    torch.testing.assert_close(output_scales(model, "layer2.0.conv2", (x,), {}), expected)
    assert output_scales(model, "fc", (x,), {}) is None  # nothing normalises the logits
    llama = tiny_llama(layers=1)
    assert output_scales(llama, "model.layers.0.mlp.down_proj", (torch.zeros(1, 4, dtype=torch.long),), {}) is None


def test_row_weights_none_leaves_the_following_batchnorm_out_of_the_choice():
    model, x = tiny_resnet(), images()
    rescaled = copy.deepcopy(model)
    rescaled.layer2[0].bn2.weight.data *= torch.linspace(0.1, 10, 32)  # what follows layer2.0.conv2, and only that
    consumer = "layer2.0.conv2"
    plain = [prune_structured(m, x, 0.5, "obs", units_of="channels", row_weights="none", progress=False)
             for m in (model, rescaled)]
    assert plain[0].stats[consumer]["removed"] == plain[1].stats[consumer]["removed"]
    assert plain[0].stats[consumer]["error"] == pytest.approx(plain[1].stats[consumer]["error"], rel=1e-9)
    assert plain[0].settings["row_weights"] == "none"
    weighted = [prune_structured(m, x, 0.5, "obs", units_of="channels", progress=False) for m in (model, rescaled)]
    assert weighted[0].settings["row_weights"] == "batchnorm"
    assert weighted[0].stats[consumer]["error"] != pytest.approx(weighted[1].stats[consumer]["error"], rel=1e-3)
    with pytest.raises(BrainSurgeonError, match="row_weights='none' only changes the methods that refit"):
        prune_structured(model, x, 0.5, "l1", units_of="channels", row_weights="none", progress=False)
