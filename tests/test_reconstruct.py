"""Block reconstruction (issue 24): masks fixed, the held-out block error never raised, deterministic, and every
option checked before any work."""
import pytest
import torch
from helpers import assert_same_result, tiny_llama

from brainsurgeon import BrainSurgeonError, prune_layerwise
from brainsurgeon.drivers.reconstruct import Reconstruction, reconstruct_block


def token_ids(count=16, length=24, seed=0):
    return torch.randint(0, 96, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method, pattern, target, window", [
    ("sparsegpt", "2:4", "layer", "block"), ("wanda", "layer", "layer", "block"),
    ("sparsegpt", "layer", "dense", "block"), ("sparsegpt", "2:4", "layer", "sublayer"),
    ("admm", "layer", "dense", "sublayer")])
def test_block_reconstruction_keeps_every_mask_and_never_raises_the_held_out_error(method, pattern, target, window):
    model, ids = tiny_llama(layers=2), token_ids()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    options = dict(pattern=pattern, target=target, reconstruct=window, reconstruct_epochs=2, reconstruct_step=1e-2,
                   batch_size=2)
    refit = prune_layerwise(model, ids, 0.5, method, progress=False, **options)
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())  # the caller's model
    for name, keep in refit.masks.items():
        assert not refit.weights[name][~keep].any(), name
        if pattern == "2:4":
            assert torch.all((~keep).reshape(keep.shape[0], -1, 4).sum(-1) == 2), name
    figures = refit.stats["reconstruction"]
    assert list(figures) == refit.settings["blocks"] and refit.settings["reconstruct"] == window
    for block, entry in figures.items():
        fits = entry["sublayers"] if window == "sublayer" else {"": entry}
        assert list(fits) == (["self_attn", "mlp"] if window == "sublayer" else [""])  # in the order they run
        for fit in fits.values():
            assert fit["held_out_after"] <= fit["held_out_before"], block
    if pattern == "2:4" or window == "sublayer":
        assert_same_result(refit, prune_layerwise(model, ids, 0.5, method, progress=False, **options))  # deterministic


def test_the_first_blocks_masks_are_the_methods_and_later_blocks_see_the_refit_stream():
    model, ids = tiny_llama(layers=2), token_ids()
    plain = prune_layerwise(model, ids, 0.5, "sparsegpt", batch_size=2, progress=False)
    refit = prune_layerwise(model, ids, 0.5, "sparsegpt", reconstruct="block", batch_size=2, progress=False)
    first = [name for name in plain.masks if name.startswith("model.layers.0.")]
    assert first and all(torch.equal(plain.masks[name], refit.masks[name]) for name in first)
    assert "reconstruction" not in plain.stats and plain.settings["reconstruct"] == "none"


def test_reconstruct_block_fits_a_block_to_its_target_with_masks_fixed():
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
    dense = [torch.randn(32, 8) for _ in range(8)]
    targets = [block(x).detach() for x in dense]
    keep = {name: torch.rand(block.get_submodule(name).weight.shape) > 0.5 for name in ("0", "2")}
    with torch.no_grad():
        for name, mask in keep.items():
            block.get_submodule(name).weight.mul_(mask)
    calls = [((x,), {}) for x in dense]
    figures = reconstruct_block(block, keep, calls, targets, Reconstruction("block", epochs=20, step=1e-2))
    assert figures["held_out_after"] < 0.5 * figures["held_out_before"]
    for name, mask in keep.items():
        assert not block.get_submodule(name).weight[~mask].any()
    assert all(p.requires_grad for p in block.parameters()) and all(p.grad is None for p in block.parameters())


@pytest.mark.parametrize("options, message", [
    (dict(reconstruct="blocks"), "reconstruct"),
    (dict(reconstruct="block", reconstruct_epochs=0), "reconstruct_epochs"),
    (dict(reconstruct="block", reconstruct_step=-1.0), "reconstruct_step"),
    (dict(reconstruct="block", reconstruct_step=float("nan")), "reconstruct_step"),
    (dict(reconstruct_epochs=3), "reconstruct_epochs apply to a block reconstruction"),
])
def test_reconstruction_options_are_checked_before_any_work(options, message):
    with pytest.raises(BrainSurgeonError, match=message):
        prune_layerwise(tiny_llama(layers=1), token_ids(), 0.5, "sparsegpt", progress=False, **options)


def test_the_command_line_reconstructs_and_refuses_where_it_does_not_apply(tmp_path, capsys):
    import json

    from helpers import lm_folder

    from brainsurgeon.cli import main

    folder, text = lm_folder(tmp_path, tiny_llama(layers=2))
    sizes = ["--calib-seqs", "16", "--seq-len", "16", "--eval-windows", "4", "--text", str(text), "--quiet"]
    out, report = tmp_path / "pruned", tmp_path / "report.json"
    code = main(["prune", "--hf-model", str(folder), "--pattern", "2:4", "--method", "sparsegpt", "--reconstruct",
                 "block", "--reconstruct-epochs", "2", "--out", str(out), "--report",
                 str(report), *sizes])
    assert code == 0, capsys.readouterr().err
    figures = json.loads(report.read_text())
    assert figures["settings"]["reconstruct"] == "block" and figures["settings"]["reconstruct_epochs"] == 2
    bench = tmp_path / "bench.json"
    assert main(["bench", "--hf-model", str(folder), "--methods", "sparsegpt", "--sparsities", "2:4", "--reconstruct",
                 "sublayer", "--target", "dense", "--json", str(bench), *sizes]) == 0
    written = json.loads(bench.read_text())
    assert written["settings"]["reconstruct"] == "sublayer" and written["settings"]["target"] == "dense"
    assert written["results"][0]["settings"]["target"] == "dense"
    for flags, message in ((["--reconstruct-epochs", "2"], "apply to a block reconstruction"),
                           (["--pattern", "units", "--sparsity", "0.3", "--reconstruct", "block"],
                            "--reconstruct does not apply to --pattern units")):
        code = main(["prune", "--hf-model", str(folder), "--out", str(tmp_path / "x"), *flags, *sizes])
        assert code == 2 and message in capsys.readouterr().err
    assert main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--reconstruct", "block", "--out",
                 str(tmp_path / "y.safetensors")]) == 2
    assert "--reconstruct does not apply without --hf-model" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y.safetensors").exists()


def test_pieces_cut_a_transformer_call_along_its_batch_and_run_to_the_same_outputs():
    """A decoder layer run on the pieces of a captured call gives the call's output, piece by piece: per-sample
    tensors (hidden states, a 2-D mask) are cut, shared ones (rotary tables of batch 1, cache positions) are not."""
    from brainsurgeon.drivers.activations import (
        capture_block_inputs,
        first_output,
        model_calls,
    )
    from brainsurgeon.drivers.reconstruct import pieces

    model, ids = tiny_llama(layers=1), token_ids(count=8, length=12)
    block = model.model.layers[0]
    with torch.no_grad():
        calls = capture_block_inputs(model, block, model_calls(model, [dict(input_ids=ids[:4]),
                                                                       dict(input_ids=ids[4:])], 4))
        outputs = [first_output(block(*args, **kwargs)) for args, kwargs in calls]
        cut_calls, cut_outputs = pieces(calls, outputs, count=4)
        assert len(cut_calls) == 4 and all(len(call[0][0]) == 2 for call in cut_calls)
        for (args, kwargs), expected in zip(cut_calls, cut_outputs):
            torch.testing.assert_close(first_output(block(*args, **kwargs)), expected, rtol=1e-5, atol=1e-6)
        whole, _ = pieces(calls, outputs, count=1)  # pieces never split below a call's own size
        assert len(whole) == 2
    hidden = torch.randn(4, 5, 3)  # an attention called with its hidden states by keyword
    by_keyword, targets = pieces([((), dict(hidden_states=hidden, cache_position=torch.arange(5), flag=True))],
                                 [hidden], count=4)
    assert [call[1]["hidden_states"].shape[0] for call in by_keyword] == [1, 1, 1, 1]
    assert all(call[1]["cache_position"].shape == (5,) and call[1]["flag"] is True for call in by_keyword)
    assert torch.equal(torch.cat(targets), hidden)
