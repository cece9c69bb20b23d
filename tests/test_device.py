"""Sequential onloading (issue 25, device=...): each block visits the device only while it is pruned, the answer is
the one pruning where the model is, and every tensor the library creates on the way names its device, so that
nothing is tied to the CPU. This machine has no accelerator: the onloading runs with device='cpu', and the audit
below stands in for a second device by refusing any tensor factory called from the library without a device."""
import json
import sys

import pytest
import torch
from helpers import assert_same_result, lm_folder, tiny_llama
from torch.overrides import TorchFunctionMode

from brainsurgeon import BrainSurgeonError
from brainsurgeon.cli import main
from brainsurgeon.drivers.sequential import prune_layerwise

CALIBRATION = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(0))
FACTORIES = {torch.zeros, torch.ones, torch.eye, torch.arange, torch.empty, torch.full, torch.tensor, torch.randn,
             torch.rand, torch.randint, torch.randperm, torch.linspace}


class FactoriesNameTheirDevice(TorchFunctionMode):
    """Records every tensor factory that brainsurgeon's own code calls without a device: such a tensor would land
    on the CPU whatever device the block is on."""

    def __init__(self):
        super().__init__()
        self.implicit = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("brainsurgeon"):
                self.implicit.add(f"{caller.f_code.co_filename.split('brainsurgeon/')[-1]}:{caller.f_lineno} "
                                  f"{func.__name__}")
        return func(*args, **kwargs)


def test_the_audit_sees_a_factory_without_a_device():
    from brainsurgeon.methods import budget

    with FactoriesNameTheirDevice() as audit:
        budget.Budget.parse("row", 0.5).row_counts(4, 8)
    assert audit.implicit, "the audit must see the library's calls"


SLOW = pytest.mark.slow


@pytest.mark.parametrize("method, pattern, target, reconstruct", [
    ("sparsegpt", "2:4", "layer", "none"), ("admm", "layer", "layer", "none"), ("alps", "2:4", "layer", "none"),
    ("wanda", "row", "layer", "none"), ("mp", "layer", "layer", "none"), ("sparsegpt", "layer", "dense", "block"),
    pytest.param("wf", "row", "layer", "none", marks=SLOW), pytest.param("admm", "2:4", "dense", "none", marks=SLOW),
    pytest.param("sparsegpt", "row", "layer", "sublayer", marks=SLOW),
    pytest.param("cbs", "layer", "layer", "none", marks=SLOW), pytest.param("swaps", "2:4", "layer", "none", marks=SLOW)])
def test_a_block_visiting_a_device_prunes_as_at_home_and_names_the_device_of_all_it_creates(method, pattern, target,
                                                                                         reconstruct):
    at_home = prune_layerwise(tiny_llama(layers=2), CALIBRATION, 0.5, method, pattern=pattern, target=target,
                              reconstruct=reconstruct, progress=False)
    model = tiny_llama(layers=2)
    with FactoriesNameTheirDevice() as audit:
        visiting = prune_layerwise(model, CALIBRATION, 0.5, method, pattern=pattern, target=target,
                                   reconstruct=reconstruct, device="cpu", progress=False)
    assert not audit.implicit, "; ".join(sorted(audit.implicit))
    assert_same_result(at_home, visiting)
    assert visiting.settings["device"] == "cpu"
    assert all(tensor.device.type == "cpu" for tensor in model.parameters())


@pytest.mark.parametrize("device, message", [("nowhere", "not a device torch knows"), ("meta", "holds no values"),
                                             (3.5, "must be a string"), ("cuda:7", "cannot be used on this machine")])
def test_a_device_this_machine_cannot_use_is_refused_before_any_work(device, message):
    model = tiny_llama()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with pytest.raises(BrainSurgeonError, match=message):
        prune_layerwise(model, CALIBRATION, 0.5, "sparsegpt", device=device, progress=False)
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())


def test_a_model_spread_over_devices_is_refused_with_the_fix():
    model = tiny_llama()
    model.model.layers[1].to("meta")
    with pytest.raises(BrainSurgeonError, match="load it on one device"):
        prune_layerwise(model, CALIBRATION, 0.5, "sparsegpt", device="cpu", progress=False)


def test_the_command_line_prunes_on_a_device_as_at_home_and_refuses_one_it_cannot_use(tmp_path, capsys):
    folder, text = lm_folder(tmp_path, tiny_llama(layers=2))
    flags = ["prune", "--hf-model", folder, "--text", text, "--calib-seqs", "8", "--seq-len", "16", "--eval-windows",
             "4", "--method", "sparsegpt", "--pattern", "2:4", "--quiet"]
    for where, device in (("home", []), ("visiting", ["--device", "cpu"])):
        assert main([*map(str, flags), *device, "--out", str(tmp_path / where), "--report",
                     str(tmp_path / f"{where}.json")]) == 0
    home, visiting = (json.loads((tmp_path / f"{where}.json").read_text()) for where in ("home", "visiting"))
    assert visiting["perplexity"] == home["perplexity"] and visiting["settings"]["device"] == "cpu"
    assert main([*map(str, flags), "--device", "cuda", "--out", str(tmp_path / "gpu")]) == 2
    assert "cannot be used on this machine" in capsys.readouterr().err and not (tmp_path / "gpu").exists()
    assert main(["prune", "--model", "mlpnet", "--checkpoint", "x.pt", "--sparsity", "0.5", "--device", "cpu",
                 "--out", str(tmp_path / "vision.safetensors")]) == 2
    assert "--device" in capsys.readouterr().err
