"""Structured pruning end to end: units found by probing, the surgery exact, counts exact, the refit never worse
than keeping the columns, the swap search never above its OBS start, and the shrunk model saved and reloaded with
plain transformers."""
import copy
import json

import pytest
import torch
from helpers import tiny_llama

from brainsurgeon import BrainSurgeonError
from brainsurgeon.drivers.structured import prune_structured
from brainsurgeon.methods import units
from brainsurgeon.models.shrunk import WIDTHS_FILE, load_pruned, save_shrunk

transformers = pytest.importorskip("transformers")


def tiny_bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64)
    return transformers.BertModel(config).eval()


def token_ids(seed=0, rows=8, length=16):
    return torch.randint(0, 96, (rows, length), generator=torch.Generator().manual_seed(seed))


def outputs(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def forced_to_zero(model, removed: dict, ids):
    """The dense model's outputs with the removed units' consumer inputs set to zero."""
    handles = []
    for name, columns in removed.items():
        def zero(module, inputs, columns=torch.tensor(columns)):
            x = inputs[0].clone()
            x[..., columns] = 0
            return (x, *inputs[1:])
        handles.append(model.get_submodule(name).register_forward_pre_hook(zero))
    try:
        return outputs(model, ids)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("build, consumers", [(tiny_llama, ("self_attn.o_proj", "mlp.down_proj")),
                                              (tiny_bert, ("attention.output.dense", "output.dense"))])
def test_the_surgery_is_exact_and_the_counts_are(build, consumers):
    model, ids = build(), token_ids()
    before = copy.deepcopy(model.state_dict())
    result = prune_structured(model, ids, 0.3, "norm", progress=False)  # no refit: the kept columns as they were
    assert {name.split(".", 3)[-1] for name in result.widths} == set(consumers)
    removed = {}
    for name, (width, kept) in result.widths.items():
        stats = result.stats[name]
        per_unit = width // stats["units"]
        assert len(stats["removed"]) == int(0.3 * stats["units"] + 0.5)
        assert kept == width - per_unit * len(stats["removed"])
        removed[name] = [u * per_unit + i for u in stats["removed"] for i in range(per_unit)]
    assert {stats["kind"] for stats in result.stats.values()} == {"heads", "neurons"}
    torch.testing.assert_close(outputs(result.model, ids), forced_to_zero(model, removed, ids), rtol=1e-5, atol=1e-5)
    dense, shrunk = result.parameters_before_after(model)
    assert shrunk < dense
    for key, value in model.state_dict().items():  # the caller's model is untouched
        assert torch.equal(value, before[key])


def test_refits_beat_keeping_the_columns_and_swaps_never_end_above_obs():
    model, ids = tiny_llama(), token_ids()
    obs = prune_structured(model, ids, 0.5, "obs", progress=False)
    swaps = prune_structured(model, ids, 0.5, "swaps", progress=False)
    first = next(iter(obs.stats))  # the first block sees the same inputs under both methods
    assert swaps.stats[first]["error"] <= obs.stats[first]["error"] * (1 + 1e-9)
    assert swaps.stats[first]["error"] <= swaps.stats[first]["start_error"] * (1 + 1e-9)
    norm = prune_structured(model, ids, 0.5, "norm", progress=False)
    assert obs.stats[first]["error"] <= norm.stats[first]["error"]


def test_the_shrunk_model_reloads_with_plain_transformers(tmp_path):
    model, ids = tiny_llama(), token_ids()
    result = prune_structured(model, ids, 0.25, "swaps", progress=False)
    assert result.model.config.intermediate_size == 48
    config = result.model.config  # one key-value group of two went, with its two query heads
    assert (config.num_key_value_heads, config.num_attention_heads, config.head_dim) == (1, 2, 8)
    save_shrunk(result.model, None, tmp_path / "shrunk", {})
    assert not (tmp_path / "shrunk" / WIDTHS_FILE).exists()  # the config says it all
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk").eval()
    torch.testing.assert_close(outputs(reloaded, ids), outputs(result.model, ids))
    again = prune_structured(model, ids, 0.25, "swaps", progress=False)
    for key, value in again.model.state_dict().items():  # deterministic
        assert torch.equal(value, result.model.state_dict()[key])


@pytest.mark.parametrize("method, allocation", [("flap", "fluctuation"), ("swaps", "uniform")])
def test_added_biases_turn_on_the_config_switches_and_the_model_reloads(tmp_path, method, allocation):
    model, ids = tiny_llama(), token_ids()
    result = prune_structured(model, ids, 0.3, method, allocation=allocation, biases="add", progress=False)
    assert result.settings["biases"] == "add"
    config = result.model.config
    assert config.mlp_bias and config.attention_bias  # down_proj and o_proj carry the removed columns' mean
    budget = 0.3 * sum(s["units"] * s["parameters_per_unit"] for s in result.stats.values())
    removed = sum(len(s["removed"]) * s["parameters_per_unit"] for s in result.stats.values())
    if allocation != "uniform":  # uniform takes 0.3 of each group's units instead
        assert budget <= removed < budget + max(s["parameters_per_unit"] for s in result.stats.values())
    save_shrunk(result.model, None, tmp_path / "shrunk", {})
    if allocation == "uniform":
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk").eval()
    else:  # widths per block: the width map
        reloaded = load_pruned(tmp_path / "shrunk")[0]
    torch.testing.assert_close(outputs(reloaded, ids), outputs(result.model, ids))
    plain = prune_structured(model, ids, 0.3, "swaps", progress=False)
    assert plain.settings["biases"] == "existing" and not plain.model.config.mlp_bias
    if method == "flap":  # FLAP's default adds biases; its mean output stays the dense model's (first block)
        assert prune_structured(model, ids, 0.3, "flap", progress=False).settings["biases"] == "add"
        name = "model.layers.0.mlp.down_proj"
        means = []
        for net in (model, result.model):
            captured = []
            handle = net.get_submodule(name).register_forward_hook(lambda m, a, out: captured.append(out))
            outputs(net, ids)
            handle.remove()
            means.append(captured[0].reshape(-1, captured[0].shape[-1]).mean(0))
        if result.widths[name][1] < result.widths[name][0]:
            torch.testing.assert_close(means[1], means[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("biases", ["existing", "add"])
def test_the_dense_target_refit_is_the_least_squares_fit_of_the_dense_outputs(biases):
    model, ids = tiny_llama(layers=2), token_ids(rows=16)
    result = prune_structured(model, ids, 0.5, "obs", units_of=("heads", "neurons"), target="dense", biases=biases,
                              relative_damping=1e-9, progress=False)
    assert result.settings["target"] == "dense"
    name = "model.layers.1.mlp.down_proj"  # the last consumer of the second block: its inputs follow every prune

    def inputs_and_weights(net):
        captured = []
        handle = net.get_submodule(name).register_forward_pre_hook(lambda m, a: captured.append(a[0]))
        outputs(net, ids)
        handle.remove()
        layer = net.get_submodule(name)
        bias = None if layer.bias is None else layer.bias.detach().double()
        return captured[0].reshape(-1, captured[0].shape[-1]).double(), layer.weight.detach().double(), bias
    pruned_x, new, bias = inputs_and_weights(result.model)
    dense_x, dense_w, _ = inputs_and_weights(model)
    ones = torch.ones(len(pruned_x), 1, dtype=torch.float64)
    design = torch.cat([pruned_x, ones], 1) if biases == "add" else pruned_x
    solved = torch.linalg.lstsq(design, dense_x @ dense_w.T).solution.T
    fitted = new if bias is None else torch.cat([new, bias[:, None]], 1)

    def residual(w):
        return float(((dense_x @ dense_w.T - design @ w.T) ** 2).sum())
    assert residual(fitted) == pytest.approx(residual(solved), rel=1e-4)
    layer = prune_structured(model, ids, 0.5, "obs", units_of=("heads", "neurons"), biases=biases,
                             relative_damping=1e-9, progress=False)  # towards the layer's own outputs: another fit
    assert not torch.allclose(inputs_and_weights(layer.model)[1], new)
    with pytest.raises(BrainSurgeonError, match="target='dense' only changes the methods that refit"):
        prune_structured(model, ids, 0.5, "wanda_sp", target="dense", progress=False)


def test_allocation_by_errors_removes_the_same_total_and_reloads_through_the_width_map(tmp_path):
    model, ids = tiny_llama(), token_ids()
    uniform = prune_structured(model, ids, 0.4, "obs", progress=False)
    chosen = prune_structured(model, ids, 0.4, "obs", allocation="errors", progress=False)
    budget = 0.4 * sum(s["units"] * s["parameters_per_unit"] for s in uniform.stats.values())
    removed = sum(len(s["removed"]) * s["parameters_per_unit"] for s in chosen.stats.values())
    assert budget <= removed < budget + max(s["parameters_per_unit"] for s in chosen.stats.values())
    assert len({after for _, after in chosen.widths.values()}) > 2  # the blocks differ
    assert chosen.settings["allocation"] == "errors"
    save_shrunk(chosen.model, None, tmp_path / "shrunk", {"method": "obs"})
    with pytest.raises(RuntimeError):  # plain transformers refuses the shapes rather than load them wrong
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "shrunk")
    reloaded, tokenizer = load_pruned(tmp_path / "shrunk")
    assert tokenizer is None
    torch.testing.assert_close(outputs(reloaded, ids), outputs(chosen.model, ids), rtol=0, atol=0)
    assert sum(p.numel() for p in reloaded.parameters()) == sum(p.numel() for p in chosen.model.parameters())


def test_a_width_map_that_does_not_fit_is_one_line(tmp_path):
    model, ids = tiny_llama(), token_ids()
    chosen = prune_structured(model, ids, 0.4, "obs", allocation="errors", progress=False)
    folder = save_shrunk(chosen.model, None, tmp_path / "shrunk", {})
    widths = (folder / WIDTHS_FILE).read_text()
    (folder / WIDTHS_FILE).write_text(widths.replace("down_proj", "no_such_layer", 1))
    with pytest.raises(BrainSurgeonError, match="no nn.Linear"):
        load_pruned(folder)
    (folder / WIDTHS_FILE).write_text("[1, 2]")
    with pytest.raises(BrainSurgeonError, match="not a mapping"):
        load_pruned(folder)
    (folder / WIDTHS_FILE).write_text("{}")
    with pytest.raises(BrainSurgeonError, match="do not fit"):
        load_pruned(folder)


def test_a_model_without_units_and_bad_values_are_one_line():
    plain = torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(BrainSurgeonError, match="no unit groups of heads or neurons or channels found"):
        prune_structured(plain, torch.randn(8, 4), 0.5, "obs", progress=False)
    with pytest.raises(BrainSurgeonError, match="fraction"):
        prune_structured(tiny_llama(), token_ids(), 1.0, "obs", progress=False)
    with pytest.raises(BrainSurgeonError, match="structured method"):
        prune_structured(tiny_llama(), token_ids(), 0.5, "magnitude", progress=False)
    with pytest.raises(BrainSurgeonError, match="unit kind"):
        prune_structured(tiny_llama(), token_ids(), 0.5, "obs", units_of=("filters",), progress=False)
    with pytest.raises(BrainSurgeonError, match="no unit groups of channels found"):
        prune_structured(tiny_llama(), token_ids(), 0.5, "obs", units_of=("channels",), progress=False)
    heads = prune_structured(tiny_llama(), token_ids(), 0.5, "obs", units_of="heads", progress=False)
    assert {stats["kind"] for stats in heads.stats.values()} == {"heads"}
    assert heads.left_dense["lm_head"].startswith("outside the blocks")
    assert heads.left_dense["model.layers.0.mlp.down_proj"] == "its neurons were not asked for"
    with pytest.raises(BrainSurgeonError, match="allocation"):
        prune_structured(tiny_llama(), token_ids(), 0.5, "obs", allocation="global", progress=False)
    assert set(units.SELECTIONS) == {"norm", "l1", "tp", "wanda_sp", "flap", "obs", "swaps"}


def test_tied_embeddings_survive_the_width_map_round_trip(tmp_path):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model, ids = transformers.LlamaForCausalLM(config).eval(), token_ids()
    chosen = prune_structured(model, ids, 0.3, "swaps", allocation="errors", progress=False)
    folder = save_shrunk(chosen.model, None, tmp_path / "tied", {})
    reloaded, _ = load_pruned(folder)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight
    torch.testing.assert_close(outputs(reloaded, ids), outputs(chosen.model, ids), rtol=0, atol=0)


@pytest.mark.parametrize("method, allocation, plain", [("obs", "uniform", True), ("obs", "errors", False),
                                                      ("flap", "fluctuation", False)])
def test_the_cli_writes_a_smaller_model_that_reloads_at_the_reported_perplexity(capsys, tmp_path, method, allocation,
                                                                                 plain):
    from helpers import lm_folder

    from brainsurgeon.cli import main
    from brainsurgeon.datasets.text import perplexity, split_text, token_windows

    folder, text = lm_folder(tmp_path, tiny_llama())
    sizes = ["--calib-seqs", "6", "--seq-len", "16", "--eval-windows", "4", "--text", str(text), "--quiet"]
    out, report = tmp_path / "shrunk", tmp_path / "report.json"
    code = main(["prune", "--hf-model", str(folder), "--pattern", "units", "--sparsity", "0.4", "--method", method,
                 "--allocation", allocation, "--out", str(out), "--report", str(report), *sizes])
    assert code == 0, capsys.readouterr().err
    figures = json.loads(report.read_text())
    assert figures["parameters"] < figures["dense_parameters"] and figures["settings"]["allocation"] == allocation
    reloaded, tokenizer = load_pruned(out)
    if plain:
        reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    evaluation = token_windows(tokenizer, split_text(str(text))[0], 4, 16)
    assert perplexity(reloaded, evaluation) == pytest.approx(figures["perplexity"], rel=1e-6)
    assert (out / WIDTHS_FILE).exists() != plain


@pytest.mark.parametrize("flags, message", [
    (["--pattern", "heads", "--sparsity", "0.3", "--include", "Linear"], "--include does not apply to --pattern heads"),
    (["--pattern", "heads", "--sparsity", "0.3", "--method", "norm", "--target", "dense"],
     "target='dense' only changes the methods that refit"),
    (["--pattern", "heads", "--sparsity", "0.3", "--row-weights", "none"], "--row-weights does not apply with"),
    (["--pattern", "units", "--sparsity", "0.3", "--method", "sparsegpt"], "--method"),
    (["--pattern", "units", "--sparsity", "0.3", "--allocation", "global"], "--allocation"),
    (["--pattern", "units"], "--sparsity is required"),
    (["--pattern", "2:4", "--allocation", "errors"], "--allocation errors applies to a structured --pattern"),
    (["--pattern", "2:4", "--biases", "add"], "--biases applies to a structured --pattern"),
])
def test_the_cli_refuses_what_a_structured_prune_does_not_use(capsys, tmp_path, flags, message):
    from helpers import lm_folder

    from brainsurgeon.cli import main

    folder, text = lm_folder(tmp_path, tiny_llama(layers=1))
    code = main(["prune", "--hf-model", str(folder), "--text", str(text), "--out", str(tmp_path / "x"), *flags])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_the_structured_bench_measures_every_run_and_refuses_a_bad_sweep(capsys, tmp_path):
    from helpers import lm_folder

    from brainsurgeon.cli import main

    folder, text = lm_folder(tmp_path, tiny_llama())
    sizes = ["--calib-seqs", "6", "--seq-len", "16", "--eval-windows", "4", "--text", str(text), "--quiet"]
    out = tmp_path / "bench.json"
    code = main(["bench", "--hf-model", str(folder), "--pattern", "neurons", "--methods", "obs",
                 "--allocations", "uniform,errors", "--sparsities", "0.4", "--json", str(out),
                 "--plot", str(tmp_path / "bench.png"), *sizes])
    assert code == 0, capsys.readouterr().err
    report = json.loads(out.read_text())
    assert report["complete"] and len(report["results"]) == 2 and (tmp_path / "bench.png").stat().st_size
    for row in report["results"]:
        assert row["parameters"] < report["dense"]["parameters"] and row["macs"] < report["dense"]["macs"]
        assert row["file_bytes"] < report["dense"]["file_bytes"] and row["latency_pruned"] > 0
        per_unit = 3 * 32  # a neuron: its gate and up rows and its down_proj column
        assert abs(row["blocks_removed"] - row["fraction"]) * report["settings"]["unit_parameters"]["blocks"] <= \
            3 * per_unit  # within a unit per block of the asked fraction of the blocks' parameters
    assert "| obs · errors · neurons |" in capsys.readouterr().out
    assert main(["table", str(out), str(out), "--plot", str(tmp_path / "both.png")]) == 0  # sweeps make one table
    assert "| obs · uniform · neurons |" in capsys.readouterr().out and (tmp_path / "both.png").stat().st_size
    for flags, message in ((["--sparsities", "0.8"], "cannot remove 0.8 of the blocks' parameters"),
                           (["--methods", "admm"], "unknown structured method"),
                           (["--allocations", "global"], "unknown allocation"),
                           (["--seeds", "0,1"], "--seeds does not apply")):
        code = main(["bench", "--hf-model", str(folder), "--pattern", "neurons", *sizes,
                     *(["--methods", "obs"] if "--methods" not in flags else []), *flags])
        assert code == 2 and message in capsys.readouterr().err, flags


def test_allocation_by_loss_spends_the_budget_and_leaves_the_callers_parameters_as_they_were():
    model, ids = tiny_llama(), token_ids()
    model.model.embed_tokens.weight.requires_grad_(False)
    chosen = prune_structured(model, ids, 0.4, "obs", allocation="loss", progress=False)
    budget = 0.4 * sum(s["units"] * s["parameters_per_unit"] for s in chosen.stats.values())
    removed = sum(len(s["removed"]) * s["parameters_per_unit"] for s in chosen.stats.values())
    assert budget <= removed < budget + max(s["parameters_per_unit"] for s in chosen.stats.values())
    assert all(p.grad is None for p in chosen.model.parameters())
    assert not chosen.model.model.embed_tokens.weight.requires_grad
    with pytest.raises(BrainSurgeonError, match="needs a causal language model whose output has logits"):
        prune_structured(tiny_bert(), ids, 0.4, "obs", allocation="loss", progress=False)


def test_macs_count_every_linear_layer_and_the_attention_products():
    from brainsurgeon.bench_structured import macs

    model, ids = tiny_llama(), token_ids(rows=1, length=64)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) * 64
    attention = 3 * 2 * 4 * 64 * 64 * 8  # layers x (Q K^T and P V) x heads x tokens^2 x head_dim
    assert macs(model, ids) == linear + attention
