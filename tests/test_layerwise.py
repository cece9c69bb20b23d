"""The layer-wise objective |W X - W' X|^2: exact updates against least squares, every method's error computed
directly, exact pattern counts, the admm method never above its warm start, block-by-block propagation, Hugging
Face models (a tiny Llama and a tiny BERT built from a config) pruned, saved and reloaded."""
import copy
import json
import os

import numpy as np
import pytest
import torch
import transformers
from helpers import lm_folder, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

import brainsurgeon
from brainsurgeon import BrainSurgeonError
from brainsurgeon.curvature.hessian import SOLVE_TOLERANCE, LayerObjective
from brainsurgeon.curvature.quadratic import Quadratic
from brainsurgeon.drivers.activations import (
    capture_block_inputs,
    find_blocks,
    input_groups,
    model_calls,
)
from brainsurgeon.drivers.sequential import prune_layerwise
from brainsurgeon.methods.budget import Budget
from brainsurgeon.methods.catalog import LAYER_METHODS
from brainsurgeon.methods.layerwise import SparseGPT
from brainsurgeon.models.hf import save_pruned
from brainsurgeon.models.vision import ResNet20

PATTERNS = [("layer", 0.5), ("layer", 0.7), ("row", 0.6), ("2:4", None), ("4:8", None)]


def layer_problem(seed=0, rows=12, cols=16, samples=200):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=generator) / cols**0.5 + torch.eye(cols)
    inputs = torch.randn(samples, cols, generator=generator) @ mixing  # correlated, as real activations are
    weight = torch.randn(rows, cols, generator=generator)
    return weight, inputs, LayerObjective(weight, inputs.T.double() @ inputs.double() / samples)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), sparsity=st.floats(0.05, 0.95))
def test_exact_update_equals_least_squares(seed, sparsity):
    weight, _, objective = layer_problem(seed)
    pruned = Budget.parse("layer", sparsity).prune_lowest(torch.rand(weight.shape, generator=torch.Generator()
                                                                      .manual_seed(seed)))
    new = objective.exact_update(pruned).double().numpy()
    damped = objective.damped.numpy()
    factor = np.linalg.cholesky(damped)  # damped H = L L^T: the error is |L^T (w - w')|^2
    for row in range(weight.shape[0]):
        kept = ~pruned[row].numpy()
        original = weight[row].double().numpy()
        assert np.all(new[row][~kept] == 0)
        if not kept.any():
            continue
        expected = np.linalg.lstsq(factor.T[:, kept], factor.T @ original, rcond=None)[0]
        # the solve's contract: the normal equations' residual on the kept set is below SOLVE_TOLERANCE of the
        # right-hand side, plus float32's rounding of H w, so the weights match least squares only to within
        # that times H_SS's condition number, while the error exceeds least squares' by r^T H_SS^-1 r at most
        rhs = (damped @ original)[kept]
        residual = rhs - damped[np.ix_(kept, kept)] @ new[row][kept]
        rounding = 10 * np.finfo(np.float32).eps * np.linalg.norm(damped[kept], 2) * np.linalg.norm(original)
        assert np.linalg.norm(residual) <= SOLVE_TOLERANCE * np.linalg.norm(rhs) + rounding
        least = np.sum((factor.T @ original - factor.T[:, kept] @ expected) ** 2)
        found = np.sum((factor.T @ (original - new[row])) ** 2)
        smallest = np.linalg.eigvalsh(damped[np.ix_(kept, kept)])[0]
        assert least - 1e-9 <= found <= least + np.linalg.norm(residual) ** 2 / smallest + 1e-9 * (1 + least)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 300), groups=st.integers(1, 40),
       pattern=st.sampled_from(["layer", "row", "1:2", "2:4", "3:8", "4:16"]), sparsity=st.floats(0.0, 0.95),
       levels=st.sampled_from([0, 3, 50]), double=st.booleans())
def test_pattern_projection_is_a_stable_sort(seed, rows, groups, pattern, sparsity, levels, double):
    """The projection every method and ADMM iteration uses prunes exactly what a stable sort of each group would:
    the lowest, ties (few levels: many of them) by position, on matrices big enough for the sampled selection."""
    generator = torch.Generator().manual_seed(seed)
    cols = 16 * groups
    scores = (torch.randint(0, levels, (rows, cols), generator=generator).float() if levels
              else torch.rand(rows, cols, generator=generator))
    scores = scores.double() if double else scores
    budget = Budget.parse(pattern) if ":" in pattern else Budget.parse(pattern, sparsity)
    pruned = budget.prune_lowest(scores)
    if ":" in pattern:
        m = budget.m
        expected = torch.zeros(rows * cols // m, m, dtype=torch.bool)
        order = torch.sort(scores.reshape(-1, m), dim=1, stable=True).indices[:, :budget.n]
        expected.scatter_(1, order, True)
    elif pattern == "row":
        expected = torch.zeros(rows, cols, dtype=torch.bool)
        counts = budget.row_counts(rows, cols, scores.device)
        for row in range(rows):
            expected[row, torch.sort(scores[row], stable=True).indices[: int(counts[row])]] = True
    else:
        expected = torch.zeros(rows * cols, dtype=torch.bool)
        expected[torch.sort(scores.reshape(-1), stable=True).indices[: budget.count(rows * cols)]] = True
    assert torch.equal(pruned.reshape(-1), expected.reshape(-1))


@pytest.mark.parametrize("method", sorted(LAYER_METHODS))
@pytest.mark.parametrize("pattern, sparsity", PATTERNS)
def test_every_method_meets_its_pattern_and_reports_the_true_error(method, pattern, sparsity):
    weight, inputs, objective = layer_problem(1)
    parsed = Budget.parse(pattern, sparsity)
    pruned, new = LAYER_METHODS[method]().prune(objective, parsed)
    rows, cols = weight.shape
    assert int(pruned.sum()) == int(parsed.sparsity * rows * cols + 0.5)
    assert torch.all(new[pruned] == 0)
    if parsed.kind == "nm":
        groups = pruned.reshape(rows, cols // parsed.m, parsed.m).sum(-1)
        assert torch.all(groups == parsed.n)
    if parsed.kind == "row":
        assert int(pruned.sum(1).max() - pruned.sum(1).min()) <= 1
    direct = float(((weight - new).double() @ inputs.T.double()).pow(2).sum()) / len(inputs)
    assert objective.error(new) == pytest.approx(direct, rel=1e-6)


@pytest.mark.parametrize("method", ["admm", "swaps"])
@pytest.mark.parametrize("pattern, sparsity", PATTERNS)
def test_combinatorial_methods_are_never_worse_than_their_warm_start(method, pattern, sparsity):
    for seed in range(4):
        _, _, objective = layer_problem(seed, rows=24, cols=32)
        parsed = Budget.parse(pattern, sparsity)
        _, start = SparseGPT().prune(objective, parsed)
        _, found = LAYER_METHODS[method]().prune(objective, parsed)
        # swaps searches the damped objective; the undamped error may differ by the damping's share
        assert objective.error(found) <= objective.error(start) * (1 + 1e-3 if method == "swaps" else 1 + 1e-9)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), rows=st.integers(1, 6), cols=st.integers(2, 12))
def test_the_layer_quadratic_is_the_layers_damped_h_once_per_row(seed, rows, cols):
    """LayerQuadratic: H v, d^T H d, H^-1 v and diag(H^-1) equal those of blockdiag(damped H) built densely."""
    _, _, objective = layer_problem(seed, rows=rows, cols=cols, samples=3 * cols)
    fisher = objective.quadratic()
    assert isinstance(fisher, Quadratic)
    dense = torch.block_diag(*[objective.damped] * rows)
    d = torch.randn(rows * cols, generator=torch.Generator().manual_seed(seed))
    assert fisher.quadratic(d) == pytest.approx(float(d.double() @ dense @ d.double()), rel=1e-5)
    product = dense @ d.double()
    torch.testing.assert_close(fisher.matvec(d).double(), product, rtol=1e-4, atol=1e-4 * float(product.abs().max()))
    inverse = torch.linalg.inv(dense)
    torch.testing.assert_close(fisher.inverse_diagonal, inverse.diagonal(), rtol=1e-3, atol=1e-6)
    expected = inverse @ d.double()  # float32 solves: errors scale with the largest entry, not each one
    torch.testing.assert_close(fisher.inverse_apply(d).double(), expected, rtol=1e-3,
                               atol=1e-3 * float(expected.abs().max()))


@pytest.mark.parametrize("method", ["cbs", "swaps"])
@pytest.mark.parametrize("pattern, sparsity", PATTERNS)
def test_fisher_methods_on_rows_end_with_the_exact_update(method, pattern, sparsity):
    _, _, objective = layer_problem(3)
    pruned, new = LAYER_METHODS[method]().prune(objective, Budget.parse(pattern, sparsity))
    torch.testing.assert_close(new, objective.exact_update(pruned), rtol=1e-3, atol=1e-4)


def test_sparsegpt_lazy_batches_are_exact():
    """With the mask fixed per group (N:M), block sizes only batch the same updates."""
    _, _, objective = layer_problem(2, rows=8, cols=64)
    results = [SparseGPT(block_size=block_size).prune(objective, Budget.parse("2:4")) for block_size in (4, 16, 64)]
    for pruned, new in results[1:]:
        assert torch.equal(pruned, results[0][0])
        torch.testing.assert_close(new, results[0][1], rtol=1e-4, atol=1e-5)


def test_patterns_refuse_bad_requests():
    with pytest.raises(BrainSurgeonError, match="0 < N < M"):
        Budget.parse("4:4")
    with pytest.raises(BrainSurgeonError, match="not 0.7"):
        Budget.parse("2:4", 0.7)
    with pytest.raises(BrainSurgeonError, match="needs a sparsity"):
        Budget.parse("row")
    with pytest.raises(BrainSurgeonError, match="groups of 8"):
        Budget.parse("4:8").check_shape(4, 12, "layer")


def token_ids(count=8, length=24, seed=0):
    return torch.randint(0, 96, (count, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", sorted(LAYER_METHODS))
def test_llama_blocks_pruned_in_order_and_the_model_handed_back(method):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    result = prune_layerwise(model, token_ids(), 0.5, method, progress=False, batch_size=4)
    assert [name for name, _ in find_blocks(model)] == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert len(result.masks) == 3 * 7 and "lm_head" in result.dense_layers
    for name, mask in result.masks.items():
        assert int((~mask).sum()) == int(0.5 * mask.numel() + 0.5), name
        assert torch.all(result.weights[name][~mask] == 0)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_each_block_sees_the_outputs_of_the_pruned_blocks_before_it():
    model, ids = tiny_llama(), token_ids()
    result = prune_layerwise(model, ids, 0.5, "sparsegpt", progress=False, batch_size=4)
    pruned = result.apply(copy.deepcopy(model))
    last = pruned.model.layers[2]
    last.load_state_dict(model.model.layers[2].state_dict())  # the last block as the driver saw it: still dense
    hessian, count = 0, 0
    with torch.no_grad():
        for args, _ in capture_block_inputs(pruned, last, model_calls(pruned, ids, 4)):
            rows = last.input_layernorm(args[0]).reshape(-1, 32).double()
            hessian, count = hessian + rows.T @ rows, count + len(rows)
    weight = model.model.layers[2].self_attn.q_proj.weight.detach().double()
    expected = float(((weight @ (hessian / count)) * weight).sum())  # |W X|^2 / N on those inputs
    recorded = result.stats["layers"]["model.layers.2.self_attn.q_proj"]["dense_output"]
    assert recorded == pytest.approx(expected, rel=1e-5)


def test_pruned_llama_saves_and_reloads_with_plain_transformers(tmp_path):
    model, ids = tiny_llama(), token_ids()
    result = brainsurgeon.prune(model, ids, None, "admm", objective="layer", pattern="2:4", progress=False)
    folder = save_pruned(model, None, result, tmp_path / "pruned", {"method": "admm"})
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded(ids).logits)
    assert torch.equal(reloaded.model.layers[0].mlp.up_proj.weight, result.weights["model.layers.0.mlp.up_proj.weight"])
    assert json.loads((folder / "brainsurgeon_report.json").read_text())["method"] == "admm"
    assert sorted(os.listdir(tmp_path)) == ["pruned"]  # no scratch folder left beside it


def test_a_bert_encoder_and_a_cnn_take_the_same_path():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    bert = transformers.BertModel(config).eval()
    result = prune_layerwise(bert, token_ids(), None, "sparsegpt", pattern="4:8", progress=False)
    assert [name for name in result.settings["blocks"]] == ["encoder.layer.0", "encoder.layer.1"]
    assert len(result.masks) == 2 * 6 and all(int((~m).sum()) * 2 == m.numel() for m in result.masks.values())
    resnet = ResNet20().eval()
    images = torch.randn(16, 3, 32, 32)
    result = prune_layerwise(resnet, (images, torch.zeros(16, dtype=torch.long)), 0.5, "admm", progress=False)
    assert result.settings["blocks"] == [""] and len(result.masks) == 18
    assert result.num_pruned == sum(int(0.5 * m.numel() + 0.5) for m in result.masks.values())


@pytest.fixture
def tiny_lm_folder(tmp_path):
    return lm_folder(tmp_path, tiny_llama())


def test_cli_prunes_saves_and_benches_a_hugging_face_model(capsys, tiny_lm_folder, tmp_path):
    from brainsurgeon.cli import main
    from brainsurgeon.datasets.text import perplexity, split_text, token_windows

    folder, text = tiny_lm_folder
    sizes = ["--calib-seqs", "6", "--seq-len", "16", "--eval-windows", "4", "--text", str(text), "--quiet"]
    out, report = tmp_path / "pruned", tmp_path / "report.json"
    code = main(["prune", "--hf-model", str(folder), "--pattern", "2:4", "--method", "admm", "--target", "dense",
                 "--out", str(out), "--report", str(report), *sizes])
    assert code == 0, capsys.readouterr().err
    figures = json.loads(report.read_text())
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    evaluation = token_windows(tokenizer, split_text(str(text))[0], 4, 16)
    assert perplexity(reloaded, evaluation) == pytest.approx(figures["perplexity"], rel=1e-6)
    assert figures["num_pruned"] * 2 == figures["num_weights"] and "lm_head" in figures["dense_layers"]
    assert figures["settings"]["target"] == "dense"
    bench = tmp_path / "bench.json"
    code = main(["bench", "--hf-model", str(folder), "--methods", "mp,sparsegpt", "--sparsities", "0.5,2:4",
                 "--json", str(bench), *sizes])
    assert code == 0
    table = json.loads(bench.read_text())
    assert table["metric"] == "perplexity" and len(table["results"]) == 4
    assert {row["sparsity"] for row in table["results"]} == {0.5, "2:4"}
    assert "perplexity" in capsys.readouterr().out


def test_a_failure_inside_a_block_hands_the_model_back_unchanged(monkeypatch):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    calls = []

    def fail_in_the_second_block(self, objective, pattern):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt
        return original(self, objective, pattern)

    original = SparseGPT.prune
    monkeypatch.setattr(SparseGPT, "prune", fail_in_the_second_block)
    with pytest.raises(KeyboardInterrupt):
        prune_layerwise(model, token_ids(), 0.5, "sparsegpt", progress=False)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000))
def test_reproducing_the_dense_output_is_a_least_squares_fit_up_to_a_constant(seed):
    """|W X_d - W' X_p|^2 / N and the objective of W* differ by the same constant for every W'; W* is the
    least-squares fit of W X_d on X_p, and W itself where the two inputs agree."""
    weight, dense_inputs, _ = layer_problem(seed, samples=400)
    generator = torch.Generator().manual_seed(seed + 1)
    inputs = dense_inputs + 0.3 * torch.randn(dense_inputs.shape, generator=generator)  # the pruned model's
    x_p, x_d = inputs.double(), dense_inputs.double()
    hessian, cross = x_p.T @ x_p / len(x_p), x_p.T @ x_d / len(x_p)
    objective = LayerObjective.reproducing(weight, hessian, cross, relative_damping=1e-12)
    fit = np.linalg.lstsq(x_p.numpy(), (x_d @ weight.double().T).numpy(), rcond=None)[0].T
    np.testing.assert_allclose(objective.weight.numpy(), fit, rtol=1e-4, atol=1e-4)

    def direct(new):
        return float(((x_d @ weight.double().T - x_p @ new.double().T) ** 2).sum()) / len(x_p)
    candidates = torch.randn(5, *weight.shape, generator=generator)
    gaps = [direct(new) - objective.error(new) for new in candidates]
    assert max(gaps) - min(gaps) < 1e-6 * max(direct(new) for new in candidates)  # W* is stored in float32
    same = LayerObjective.reproducing(weight, x_d.T @ x_d / len(x_d), x_d.T @ x_d / len(x_d))
    torch.testing.assert_close(same.weight, weight, rtol=0, atol=1e-5)


def two_layer_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 16), torch.nn.ReLU(), torch.nn.Linear(16, 6)).eval()
    return model, torch.randn(300, 10) @ (torch.eye(10) + 0.3 * torch.randn(10, 10))


@pytest.mark.parametrize("method", ["sparsegpt", "admm"])
def test_target_dense_prunes_each_layer_towards_the_dense_output_from_the_pruned_inputs(method):
    """Rebuilt by hand: layer 0 sees the calibration inputs, layer 2 the outputs of the pruned layer 0 and
    reproduces the dense model's layer-2 output; the masks match the driver's, the weights to float32 rounding."""
    model, inputs = two_layer_mlp()
    result = prune_layerwise(model, inputs, 0.6, method, target="dense", batch_size=300, progress=False)
    assert result.settings["target"] == "dense"
    first = LayerObjective.reproducing(model[0].weight, *(inputs.T.double() @ inputs.double() / 300,) * 2)
    pruned_first, new_first = LAYER_METHODS[method]().prune(first, Budget.parse("layer", 0.6))
    assert torch.equal(~result.masks["0.weight"], pruned_first)
    torch.testing.assert_close(result.weights["0.weight"], new_first, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        x_d = torch.relu(model[0](inputs)).double()
        x_p = torch.relu(inputs @ new_first.T + model[0].bias).double()
    second = LayerObjective.reproducing(model[2].weight, x_p.T @ x_p / 300, x_p.T @ x_d / 300)
    pruned_second, new_second = LAYER_METHODS[method]().prune(second, Budget.parse("layer", 0.6))
    assert torch.equal(~result.masks["2.weight"], pruned_second)
    torch.testing.assert_close(result.weights["2.weight"], new_second, rtol=1e-5, atol=1e-6)
    assert torch.equal(model[0].weight, two_layer_mlp()[0][0].weight)  # handed back unchanged


def test_target_dense_lowers_the_output_error_of_a_deep_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[module for _ in range(4) for module in (torch.nn.Linear(24, 24), torch.nn.Tanh())])
    inputs = torch.randn(400, 24)
    errors = {}
    for target in ("layer", "dense"):
        pruned = copy.deepcopy(model)
        prune_layerwise(model, inputs, 0.7, "admm", target=target, batch_size=400, progress=False).apply(pruned)
        with torch.no_grad():
            errors[target] = float((pruned(inputs) - model(inputs)).pow(2).mean())
    assert errors["dense"] < errors["layer"]


def test_per_layer_sparsities_are_exact_and_checked():
    model, inputs = two_layer_mlp()
    result = prune_layerwise(model, inputs, {"0": 0.25, "2": 0.75}, "sparsegpt", progress=False)
    assert int((~result.masks["0.weight"]).sum()) == 40 and int((~result.masks["2.weight"]).sum()) == 72
    assert result.settings["layer_sparsities"] == {"0": 0.25, "2": 0.75}
    assert result.settings["sparsity"] == pytest.approx(112 / 256) and result.settings["pattern"] == "layer (per layer)"
    for bad, message in (({"0": 0.5}, "no sparsity for 2"), ({"0": 0.5, "2": 0.5, "9": 0.5}, "not pruned"),
                         ({"0": 0.5, "2": float("nan")}, "sparsity of 2")):
        with pytest.raises(BrainSurgeonError, match=message):
            prune_layerwise(model, inputs, bad, "sparsegpt", progress=False)
    with pytest.raises(BrainSurgeonError, match="N:M"):
        prune_layerwise(model, inputs, {"0": 0.5, "2": 0.5}, "sparsegpt", pattern="2:4", progress=False)
    with pytest.raises(BrainSurgeonError, match="target"):
        prune_layerwise(model, inputs, 0.5, "sparsegpt", target="teacher", progress=False)


def test_layers_fed_one_tensor_are_grouped_so_the_dense_target_records_their_products_once():
    model = tiny_llama()
    block = model.model.layers[0]
    names = [name for name, module in block.named_modules() if isinstance(module, torch.nn.Linear)]
    call = capture_block_inputs(model, block, model_calls(model, torch.randint(0, 96, (2, 8)), 2))[0]
    groups = input_groups(block, names, call)
    assert groups == {"self_attn.q_proj": "self_attn.q_proj", "self_attn.k_proj": "self_attn.q_proj",
                      "self_attn.v_proj": "self_attn.q_proj", "self_attn.o_proj": "self_attn.o_proj",
                      "mlp.gate_proj": "mlp.gate_proj", "mlp.up_proj": "mlp.gate_proj", "mlp.down_proj": "mlp.down_proj"}
