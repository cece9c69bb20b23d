"""Options are declared once per method, checked once, and never silently dropped: by the API, the CLI and bench."""
import re
from dataclasses import dataclass

import pytest
import torch
from helpers import assert_same_result, lm_folder, tiny_llama, tiny_problem
from hypothesis import given, settings
from hypothesis import strategies as st

import brainsurgeon
from brainsurgeon import BrainSurgeonError
from brainsurgeon.cli import build_parser, main
from brainsurgeon.cli_options import declared_options
from brainsurgeon.drivers.registry import SELECTIONS
from brainsurgeon.methods.budget import lowest
from brainsurgeon.methods.catalog import LAYER_METHODS
from brainsurgeon.methods.options import MethodOptions, option
from brainsurgeon.methods.selection import Selection
from brainsurgeon.methods.update import UPDATES


def mlp():
    return tiny_problem(0, n=64, sizes=((8, 16), (16, 12), (12, 5)))


def one_line(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# The five cases that used to be accepted and then ignored ------------------------------------------------------

def test_a_pattern_on_the_fisher_objective_is_honoured():
    """The first silent case: 2:4 asked of a Fisher method is now 2:4 (one budget type for both objectives)."""
    model, x, y = mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "cbs", pattern="2:4", progress=False)
    for name, mask in result.masks.items():
        groups = (~mask).reshape(mask.shape[0], -1, 4).sum(-1)
        assert bool((groups == 2).all()), name
    assert result.settings["pattern"] == "2:4"


def test_the_seed_reaches_a_layer_wise_method_that_declares_one_and_is_refused_by_one_that_does_not():
    model, x, y = mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "cbs", objective="layer", seed=5, progress=False)
    assert result.settings["seed"] == 5
    with pytest.raises(BrainSurgeonError, match="method 'sparsegpt' takes no option 'seed'; its options are: "
                                                "block_size"):
        brainsurgeon.prune(model, (x, y), 0.5, "sparsegpt", objective="layer", seed=5, progress=False)


@pytest.mark.parametrize("setting, value", [("stages", 2), ("damping", 1e-3), ("structure", "layer"),
                                            ("num_samples", 32), ("gradients", "disk"), ("max_memory", 2**30),
                                            ("schedule", [0.5]), ("refine", 1)])
def test_the_fisher_objectives_settings_are_refused_on_the_layer_objective(setting, value):
    model, x, y = mlp()
    with pytest.raises(BrainSurgeonError, match=f"objective='layer' does not use {setting}"):
        brainsurgeon.prune(model, (x, y), 0.5, "sparsegpt", objective="layer", progress=False, **{setting: value})


def test_bench_refuses_an_option_no_method_of_the_sweep_takes(capsys, mnist_like):
    data, checkpoint = mnist_like
    err = one_line(capsys, "bench", "--checkpoint", checkpoint, "--data-dir", data, "--methods", "mp,cbs",
                   "--sparsities", "0.5", "--calib-samples", "50", "--iht-rounds", "3", "--quiet")
    assert "no method of ['mp', 'cbs'] takes option 'iht_rounds'" in err
    from brainsurgeon.bench import run_lm_benchmark

    ids = torch.randint(0, 96, (4, 16))
    with pytest.raises(BrainSurgeonError, match="no method of \\['sparsegpt'\\] takes option 'rhoo'"):
        run_lm_benchmark(tiny_llama(layers=1), ids, ids, ["sparsegpt"], [0.5], progress=False, rhoo=3)


def test_language_model_options_reach_the_method_or_are_refused(capsys, tmp_path):
    folder, text = lm_folder(tmp_path, tiny_llama(layers=1))
    capsys.readouterr()  # what saving the model printed
    common = ("prune", "--hf-model", folder, "--text", text, "--calib-seqs", "4", "--seq-len", "16",
              "--eval-windows", "2", "--sparsity", "0.5", "--quiet")
    for flag in ("--iht-rounds", "--max-swaps", "--init-trials"):
        err = one_line(capsys, *common, "--method", "admm", flag, "3", "--out", tmp_path / "p")
        assert f"no method of ['admm'] takes option '{flag[2:].replace('-', '_')}'" in err
    for flag in ("--structure", "--calib-samples", "--dataset"):
        assert "does not apply with --hf-model" in one_line(capsys, *common, flag, "layer" if flag == "--structure"
                                                            else "mnist" if flag == "--dataset" else "5",
                                                            "--out", tmp_path / "p")
    assert main([str(a) for a in (*common, "--method", "swaps", "--iht-rounds", "0", "--max-swaps", "1", "--out",
                                  tmp_path / "p", "--report", tmp_path / "r.json")]) == 0
    assert '"iht_rounds": 0' in (tmp_path / "r.json").read_text()


def test_language_model_flags_are_refused_without_a_language_model(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    err = one_line(capsys, "prune", "--checkpoint", checkpoint, "--data-dir", data, "--sparsity", "0.5",
                   "--target", "dense", "--out", tmp_path / "o.safetensors", "--quiet")
    assert "--target does not apply without --hf-model" in err


# Any undeclared option is refused ------------------------------------------------------------------------------

FISHER_METHODS = ["mp", "random", "wf", "cbs", "swaps", "mp+cbsu", "wf+obs", "max"]
ALL_DECLARED = set(declared_options()) | {"seed"}


@settings(max_examples=40, deadline=None)
@given(name=st.from_regex(r"[a-z][a-z_]{0,14}", fullmatch=True).filter(lambda n: n not in ALL_DECLARED),
       fisher=st.sampled_from(FISHER_METHODS), layer=st.sampled_from(sorted(LAYER_METHODS)))
def test_any_undeclared_option_is_refused_naming_the_declared_ones(name, fisher, layer):
    model, x, y = mlp()
    with pytest.raises(BrainSurgeonError, match=f"takes no option '{name}'"):
        brainsurgeon.drivers.plan.plan_run(model, 0.5, fisher, **{name: 1})
    with pytest.raises(BrainSurgeonError, match=f"takes no option '{name}'; its options are"):
        brainsurgeon.prune(model, (x, y), 0.5, layer, objective="layer", progress=False, **{name: 1})


@pytest.mark.parametrize("method", sorted(LAYER_METHODS))
def test_a_layer_method_takes_exactly_its_declared_options(method):
    model, x, y = mlp()
    declared = LAYER_METHODS[method].Options.names()
    for fisher_only in set(SELECTIONS["cbs"].Options.names()) - set(declared):
        with pytest.raises(BrainSurgeonError, match=f"takes no option '{fisher_only}'"):
            brainsurgeon.prune_layerwise(model, x, 0.5, method, progress=False, **{fisher_only: 1})


# One declaration: the CLI, bench and the README follow it ------------------------------------------------------

def test_every_declared_option_is_a_flag_with_its_owners_in_the_help():
    text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    for name, (_, _, owners) in declared_options().items():
        if name == "seed":
            continue  # the command line's own --seed
        assert "--" + name.replace("_", "-") in text
    assert "cbs: default 50; cbs (layer-wise): default 10" in re.sub(r"\s+", " ", text)


@dataclass(frozen=True)
class LargestOptions(MethodOptions):
    keep_signs: bool = option(False, "test-only: a flag that shows up on the command line")


class Largest(Selection):
    """A test-only selection: prune the largest weights."""

    name = "largest"
    Options = LargestOptions

    def select(self, problem):
        return lowest(-problem.weights.abs(), problem.segments)


def test_a_new_method_is_one_class_and_one_registry_line(monkeypatch):
    monkeypatch.setitem(SELECTIONS, Largest.name, Largest)  # the registry line
    model, x, y = mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "largest", progress=False, keep_signs=True)
    assert result.settings["method"] == "largest+none" and result.settings["keep_signs"] is True
    weights = torch.cat([p.detach().abs().flatten() for p in model.parameters()])
    assert float(torch.cat([w.abs().flatten() for w in result.weights.values()]).max()) < float(weights.max())
    assert "--keep-signs" in build_parser()._subparsers._group_actions[0].choices["bench"].format_help()
    with pytest.raises(BrainSurgeonError, match="takes no option 'rho'"):
        brainsurgeon.prune(model, (x, y), 0.5, "largest", progress=False, rho=3)


def test_the_readme_tables_name_every_method_update_and_option():
    readme = open(__file__.replace("tests/test_options.py", "README.md")).read()
    rows = [line for line in readme.splitlines() if line.startswith("| `")]

    def rows_of(name):
        return " ".join(line for line in rows if line.split("|")[1].strip().startswith(f"`{name}`"))

    for name in [*SELECTIONS, *UPDATES, *LAYER_METHODS]:
        assert rows_of(name)
    for name, cls in SELECTIONS.items():
        for declared in cls.Options.names():
            assert f"`{declared}`" in rows_of(name), (name, declared)


# One vocabulary: a name is one algorithm on whichever objective runs it ------------------------------------------

def test_the_old_name_joint_warns_and_runs_swaps_or_admm_per_objective():
    model, x, y = tiny_problem(n=24, sizes=((8, 8), (8, 3)))
    with pytest.warns(FutureWarning, match="'joint' is deprecated.*running 'swaps'"):
        old = brainsurgeon.prune(model, (x, y), 0.5, "joint", progress=False)
    assert_same_result(old, brainsurgeon.prune(model, (x, y), 0.5, "swaps", progress=False))
    assert old.settings["selection"] == "swaps"
    with pytest.warns(FutureWarning, match="running 'admm'"):
        old = brainsurgeon.prune_layerwise(model, x, 0.5, "joint", progress=False)
    assert_same_result(old, brainsurgeon.prune_layerwise(model, x, 0.5, "admm", progress=False))
    assert old.settings["method"] == "admm"


def test_no_name_means_two_algorithms():
    from brainsurgeon.methods.catalog import FISHER_SELECTIONS, RENAMED

    shared = set(FISHER_SELECTIONS) & set(LAYER_METHODS)
    assert shared == {"mp", "wf", "cbs", "swaps"}
    for name, layer in LAYER_METHODS.items():  # a layer method runs the Fisher selection of its own name, or none
        counterpart = layer.fisher_counterpart
        assert (counterpart is None and name not in FISHER_SELECTIONS) or counterpart is FISHER_SELECTIONS[name]
    assert not set(RENAMED) & (set(FISHER_SELECTIONS) | set(LAYER_METHODS))


def test_the_readme_method_table_is_the_registrys():
    readme = open(__file__.replace("tests/test_options.py", "README.md")).read()
    assert brainsurgeon.method_table() in readme, \
        "paste python -c 'import brainsurgeon; print(brainsurgeon.method_table())' into it"


# prune's settings come in typed groups, as objects or as their fields --------------------------------------------

def test_a_settings_group_as_an_object_is_the_same_run_as_its_fields_as_keywords():
    from brainsurgeon import FisherSettings, LayerSettings, StageOptions

    model, x, y = tiny_problem(n=24, sizes=((8, 8), (8, 3)))
    grouped = brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, rho=2,
                                 fisher=FisherSettings(num_samples=20, damping=1e-2, structure="layer"),
                                 staging=StageOptions(stages=2))
    flat = brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, rho=2, num_samples=20, damping=1e-2,
                              structure="layer", stages=2)
    assert_same_result(grouped, flat)
    assert grouped.settings["stages"] == 2 and grouped.settings["damping"] == 1e-2
    layered = brainsurgeon.prune(model, x, 0.5, "sparsegpt", objective="layer", progress=False, pattern="row",
                                 layer=LayerSettings(relative_damping=0.1))
    assert_same_result(layered, brainsurgeon.prune_layerwise(model, x, 0.5, "sparsegpt", pattern="row",
                                                             relative_damping=0.1, progress=False))
    assert layered.settings["relative_damping"] == 0.1


@pytest.mark.parametrize("call, message", [
    (dict(fisher=dict(num_samples=8)), "fisher must be a FisherSettings"),
    (dict(num_samples=4, fisher="FisherSettings"), "fisher must be a FisherSettings"),
    (dict(num_sample=4), "takes no option 'num_sample'.*the run's settings: .*num_samples"),
    (dict(objective="layer", damping=0.1), "does not use damping .*its damping is relative_damping"),
    (dict(objective="layer", structure="layer", stages=2), "does not use structure, stages"),
    (dict(relative_damping=0.1), "objective='fisher' does not use relative_damping"),
])
def test_a_setting_given_wrong_is_one_line_naming_the_fix(call, message):
    model, x, y = tiny_problem()
    with pytest.raises(BrainSurgeonError, match=message):
        brainsurgeon.prune(model, (x, y), 0.5, "cbs" if call.get("objective") != "layer" else "sparsegpt",
                           progress=False, **call)


def test_a_setting_given_twice_is_refused():
    from brainsurgeon import FisherSettings

    model, x, y = tiny_problem()
    with pytest.raises(BrainSurgeonError, match="num_samples given both as a keyword and in fisher="):
        brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, num_samples=4,
                           fisher=FisherSettings(num_samples=8))
    with pytest.raises(BrainSurgeonError, match="relative_damping .*not damping"):
        brainsurgeon.prune_layerwise(model, x, 0.5, "sparsegpt", damping=0.1, progress=False)


def test_the_command_line_has_one_damping_per_objective(tmp_path, capsys):
    folder, text = lm_folder(tmp_path, tiny_llama())
    err = one_line(capsys, "prune", "--hf-model", folder, "--text", text, "--damp", "0.1", "--out", tmp_path / "p")
    assert "--damp does not apply with --hf-model" in err
    err = one_line(capsys, "prune", "--model", "mlpnet", "--relative-damp", "0.1", "--out", tmp_path / "p.st")
    assert "--relative-damp does not apply without --hf-model" in err
