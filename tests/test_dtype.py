"""Weights stored in bfloat16 or float16 while pruning (issue 25): the solves run in float32, the weights come back
in the storage dtype with exact masks, the answer is the float32 prune's up to rounding, and the command line
scores in float32 and writes a folder plain transformers reloads in that dtype."""
import argparse
import json

import pytest
import torch
import transformers
from helpers import lm_folder, tiny_llama
from safetensors.torch import load_file

from brainsurgeon.cli import main
from brainsurgeon.cli_lm import load_language_model
from brainsurgeon.datasets.text import perplexity
from brainsurgeon.drivers.sequential import prune_layerwise

CALIBRATION = torch.randint(0, 96, (16, 32), generator=torch.Generator().manual_seed(0))
EVALUATION = torch.randint(0, 96, (8, 32), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method, pattern", [("sparsegpt", "2:4"), ("admm", "layer")])
def test_a_model_stored_in_half_precision_prunes_as_float32_does(dtype, method, pattern):
    full = tiny_llama(layers=3, hidden=64)
    half = tiny_llama(layers=3, hidden=64).to(dtype)
    reference = prune_layerwise(full, CALIBRATION, 0.5, method, pattern=pattern, progress=False)
    result = prune_layerwise(half, CALIBRATION, 0.5, method, pattern=pattern, progress=False)
    assert all(value.dtype == dtype for value in half.parameters())  # handed back as it came
    agreeing = 0
    for name, mask in result.masks.items():
        assert result.weights[name].dtype == dtype
        assert torch.all(result.weights[name][~mask] == 0)
        if pattern == "2:4":
            assert torch.all((~mask).reshape(mask.shape[0], -1, 4).sum(-1) == 2)
        agreeing += int((mask == reference.masks[name]).sum())
    assert agreeing >= 0.97 * sum(mask.numel() for mask in result.masks.values())  # rounded inputs, other ties
    scores = [perplexity(r.apply(tiny_llama(layers=3, hidden=64)), EVALUATION) for r in (reference, result)]
    assert scores[1] == pytest.approx(scores[0], rel=0.02)


@pytest.mark.parametrize("window", ["block", "sublayer"])
def test_a_half_precision_block_is_fitted_in_float32_and_comes_back_in_its_dtype(window):
    model = tiny_llama(layers=2).to(torch.bfloat16)
    options = dict(pattern="2:4", batch_size=2, progress=False)
    fit = dict(reconstruct=window, reconstruct_epochs=2)
    result = prune_layerwise(model, CALIBRATION, 0.5, "sparsegpt", **fit, **options)
    assert all(value.dtype == torch.bfloat16 for value in [*model.parameters(), *model.buffers()])
    for name, keep in result.masks.items():
        assert result.weights[name].dtype == torch.bfloat16 and not result.weights[name][~keep].any(), name
        assert torch.all((~keep).reshape(keep.shape[0], -1, 4).sum(-1) == 2), name
    for entry in result.stats["reconstruction"].values():
        for figures in (entry["sublayers"].values() if window == "sublayer" else [entry]):
            assert figures["held_out_after"] <= figures["held_out_before"]  # judged on the float32 weights it fits
    plain = prune_layerwise(model, CALIBRATION, 0.5, "sparsegpt", **options)
    first = [name for name in plain.masks if name.startswith("model.layers.0.")]
    assert all(torch.equal(plain.masks[name], result.masks[name]) for name in first)  # the fit moves no mask
    assert any(not torch.equal(plain.weights[name], result.weights[name]) for name in first)  # but weights
    again = prune_layerwise(model, CALIBRATION, 0.5, "sparsegpt", **fit, **options)
    assert all(torch.equal(again.weights[name], result.weights[name]) for name in result.masks)


def test_the_command_line_writes_the_storage_dtype_and_scores_in_float32(tmp_path):
    folder, text = lm_folder(tmp_path, tiny_llama(layers=3, hidden=64))
    flags = ["prune", "--hf-model", folder, "--text", text, "--calib-seqs", "8", "--seq-len", "16", "--eval-windows",
             "4", "--method", "sparsegpt", "--pattern", "2:4", "--quiet"]
    for dtype in ("float32", "bfloat16"):
        assert main([*map(str, flags), "--dtype", dtype, "--out", str(tmp_path / dtype), "--report",
                     str(tmp_path / f"{dtype}.json")]) == 0
    full, half = (json.loads((tmp_path / f"{dtype}.json").read_text()) for dtype in ("float32", "bfloat16"))
    assert half["perplexity"] == pytest.approx(full["perplexity"], rel=0.02)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bfloat16", dtype="auto")
    assert reloaded.dtype == torch.bfloat16
    assert float((reloaded.model.layers[0].mlp.down_proj.weight == 0).float().mean()) == 0.5
    # scoring the dense model in float32 first leaves the model as loaded (its float32 rotary frequencies too):
    # the command line prunes what the library prunes on the same windows
    args = argparse.Namespace(hf_model=str(folder), dtype="bfloat16", quiet=True, text=str(text), calib_seqs=8,
                              seq_len=16, eval_windows=4, seed=0)
    model, _, calibration, _ = load_language_model(args)
    expected = prune_layerwise(model, calibration, None, "sparsegpt", pattern="2:4", progress=False)
    written = load_file(tmp_path / "bfloat16" / "masks.safetensors")
    assert all(torch.equal(written[name].bool(), mask) for name, mask in expected.masks.items())


@pytest.mark.parametrize("flags", [["--model", "mlpnet", "--checkpoint", "x.pt", "--sparsity", "0.5"],
                                   ["--hf-model", "x", "--pattern", "heads", "--sparsity", "0.5"]])
def test_dtype_is_refused_where_it_does_not_apply(flags, tmp_path, capsys):
    assert main(["prune", *flags, "--dtype", "bfloat16", "--out", str(tmp_path / "out")]) == 2
    assert "--dtype" in capsys.readouterr().err
