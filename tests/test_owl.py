"""OWL's allocation (issue 24): the published rule, the outlier ratios by brute force, and the global count exact."""
import json

import pytest
import torch
from helpers import tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from brainsurgeon import BrainSurgeonError, prune_layerwise
from brainsurgeon.drivers.owl import block_sparsities, exact_counts, outlier_ratios
from brainsurgeon.drivers.sequential import plan_layerwise
from brainsurgeon.methods.budget import num_to_prune


@settings(max_examples=50, deadline=None)
@given(ratios=st.lists(st.floats(0, 0.2), min_size=2, max_size=12), sparsity=st.floats(0.2, 0.8))
def test_the_rule_keeps_the_mean_spans_twice_lambda_and_spares_the_outlier_rich(ratios, sparsity):
    values = torch.tensor(block_sparsities(ratios, sparsity, 0.08), dtype=torch.float64)
    assert float(values.mean()) == pytest.approx(sparsity, abs=1e-12)
    if max(ratios) - min(ratios) > 1e-9:
        assert float(values.max() - values.min()) == pytest.approx(0.16, abs=1e-9)
        assert values[ratios.index(max(ratios))] == values.min()


@settings(max_examples=50, deadline=None)
@given(sizes=st.lists(st.integers(10, 500), min_size=1, max_size=8), sparsity=st.floats(0.3, 0.7),
       jitter=st.lists(st.floats(-0.08, 0.08), min_size=8, max_size=8))
def test_the_counts_add_up_to_the_global_count_exactly(sizes, sparsity, jitter):
    names = [f"l{i}" for i in range(len(sizes))]
    chosen = exact_counts({n: sparsity + j for n, j in zip(names, jitter)}, dict(zip(names, sizes)), sparsity)
    counts = [num_to_prune(chosen[n], size) for n, size in zip(names, sizes)]
    assert sum(counts) == num_to_prune(sparsity, sum(sizes))


def test_the_outlier_ratio_is_the_fraction_of_wanda_scores_above_m_times_their_mean():
    model, ids = tiny_llama(layers=2), torch.randint(0, 96, (4, 16), generator=torch.Generator().manual_seed(0))
    _, _, blocks, per_block, _ = plan_layerwise(model, 0.5, "layer", "sparsegpt")
    ratios = outlier_ratios(model, ids, per_block, blocks, outlier_multiple=2.0)
    captured = {}
    block = model.model.layers[1]

    def keep(module, args, out, name):
        captured.setdefault(name, []).append(args[0].reshape(-1, args[0].shape[-1]))

    handles = [block.get_submodule(name).register_forward_hook(lambda *call, name=name: keep(*call, name))
               for name, *_ in per_block[1]]
    with torch.no_grad():
        model(ids)
    for handle in handles:
        handle.remove()
    scores = torch.cat([(block.get_submodule(name).weight.double().abs()
                         * torch.cat(captured[name]).double().norm(dim=0)).flatten() for name, *_ in per_block[1]])
    assert ratios[1] == pytest.approx(float((scores > 2.0 * scores.mean()).double().mean()), rel=1e-9)


def test_prune_with_owl_prunes_the_global_count_with_one_sparsity_per_block():
    model, ids = tiny_llama(layers=3), torch.randint(0, 96, (8, 16), generator=torch.Generator().manual_seed(0))
    result = prune_layerwise(model, ids, 0.6, "sparsegpt", allocation="owl", progress=False)
    pruned = sum(int((~mask).sum()) for mask in result.masks.values())
    assert pruned == round(0.6 * sum(mask.numel() for mask in result.masks.values()))
    chosen = result.settings["layer_sparsities"]
    assert result.settings["allocation"] == "owl" and len(chosen) == len(result.masks)
    per_block = {}
    for name, value in chosen.items():
        per_block.setdefault(name.split(".")[2], []).append(value)
    assert max(max(v) for v in per_block.values()) - min(min(v) for v in per_block.values()) <= 0.16 + 1e-2
    with pytest.raises(BrainSurgeonError, match="allocation 'owl' chooses"):
        prune_layerwise(model, ids, None, "sparsegpt", pattern="2:4", allocation="owl", progress=False)
    with pytest.raises(BrainSurgeonError, match="allocation"):
        prune_layerwise(model, ids, 0.5, "sparsegpt", allocation="owls", progress=False)


def test_the_command_line_prunes_and_benches_with_owl_and_reports_each_layers_sparsity(capsys, tmp_path):
    from helpers import lm_folder

    from brainsurgeon.cli import main

    folder, text = lm_folder(tmp_path, tiny_llama(layers=3))
    sizes = ["--calib-seqs", "8", "--seq-len", "16", "--eval-windows", "2", "--text", str(text), "--quiet"]
    report = tmp_path / "report.json"
    assert main(["prune", "--hf-model", str(folder), "--sparsity", "0.6", "--method", "sparsegpt", "--allocation",
                 "owl", "--out", str(tmp_path / "pruned"), "--report", str(report), *sizes]) == 0
    settings = json.loads(report.read_text())["settings"]
    assert settings["allocation"] == "owl" and len(set(settings["layer_sparsities"].values())) > 1
    bench = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    assert main(["bench", "--hf-model", str(folder), "--methods", "mp,sparsegpt", "--sparsities", "0.6",
                 "--allocations", "uniform,owl", "--json", str(bench), "--plot", str(plot), *sizes]) == 0
    assert plot.stat().st_size > 0  # perplexities, and beside them the per-layer sparsities OWL chose
    table = capsys.readouterr().out.splitlines()
    assert any(line.startswith("sparsegpt (owl) ") for line in table)
    assert any(line.startswith("sparsegpt ") and "(owl)" not in line for line in table)
    rows = json.loads(bench.read_text())["results"]
    assert [(row["method"], row["allocation"]) for row in rows] == [
        ("mp", "uniform"), ("sparsegpt", "uniform"), ("mp", "owl"), ("sparsegpt", "owl")]
    for flags, message in ((["--sparsities", "2:4", "--allocations", "owl"], "allocation 'owl' chooses"),
                           (["--sparsities", "0.5", "--allocations", "owls"],
                            "--allocations owls applies to a structured --pattern (units, heads, neurons or channels) or is unknown")):
        assert main(["bench", "--hf-model", str(folder), "--methods", "sparsegpt", *flags, *sizes]) == 2
        assert message in capsys.readouterr().err
    assert main(["prune", "--hf-model", str(folder), "--sparsity", "0.6", "--allocation", "uniform,owl", "--out",
                 str(tmp_path / "z"), *sizes]) == 2
    assert "--allocation takes one allocation" in capsys.readouterr().err
    assert main(["prune", "--model", "mlpnet", "--sparsity", "0.5", "--allocation", "owl", "--out",
                 str(tmp_path / "y.safetensors")]) == 2
    assert "--allocation applies to a structured --pattern (units, heads, neurons or channels) or with --hf-model" \
        in capsys.readouterr().err
