"""Hostile inputs and faults, one group per principle of safe use: loading never runs code; every value is
checked where it enters; every prunable weight is accounted for; the model comes back as handed over; outputs
are whole regular files or nothing; bad input is one line and exit code 2 on the command line."""
import gzip
import json
import math
import os
import pickle
import signal
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from helpers import lm_folder, tiny_llama, tiny_problem
from torch import nn
from torch.nn.utils import parametrizations
from torch.nn.utils import prune as torch_prune

import brainsurgeon
from brainsurgeon import BrainSurgeonError, validation
from brainsurgeon.cli import main
from brainsurgeon.datasets.vision import load_cifar10, load_mnist
from brainsurgeon.errors import FewSamplesWarning
from brainsurgeon.models.hf import GGUF_MAGIC, save_pruned
from brainsurgeon.models.vision import MLPNet, ResNet20, load_checkpoint


def run(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse's own errors, as a shell would see them
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(code, err, *needles):
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


def prune_args(data, checkpoint, out, *extra):
    return ("prune", "--checkpoint", checkpoint, "--data-dir", data, "--calib-samples", "100", "--sparsity", "0.5",
            "--method", "mp", "--out", out, "--quiet", *extra)


def small_mlp(seed=0):
    return tiny_problem(seed, n=64, sizes=((8, 16), (16, 12), (12, 5)))


# 1. Loading never executes code ----------------------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _evil_checkpoint(path, marker, legacy):
    state = {f"module.{k}": v for k, v in MLPNet().state_dict().items()}
    torch.save({"state_dict": state, "config": Payload(marker)}, path, _use_new_zipfile_serialization=not legacy)


@pytest.mark.parametrize("kind", ["zip", "legacy", "plain-pickle"])
def test_a_malicious_checkpoint_is_refused_without_running_it(capsys, mnist_like, tmp_path, kind):
    data, _ = mnist_like
    marker, evil = tmp_path / "marker", tmp_path / f"evil-{kind}.ckpt"
    if kind == "plain-pickle":
        evil.write_bytes(pickle.dumps({"state_dict": {}, "x": Payload(marker)}, protocol=2))
    else:
        _evil_checkpoint(evil, marker, legacy=kind == "legacy")
    code, _, err = run(capsys, *prune_args(data, evil, tmp_path / "o.safetensors"))
    assert code == 2 and not marker.exists(), err
    assert err.count("\n") == 1
    if kind != "plain-pickle":
        assert "--trust-pickle" in err and ("posix.system" in err or "os.system" in err)
    assert not (tmp_path / "o.safetensors").exists()


def test_trust_pickle_is_the_explicit_opt_in(tmp_path):
    marker, evil = tmp_path / "marker", tmp_path / "evil.ckpt"
    _evil_checkpoint(evil, marker, legacy=False)
    with pytest.raises(BrainSurgeonError, match="trust_pickle=True"):
        load_checkpoint(MLPNet(), evil)
    assert not marker.exists()
    load_checkpoint(MLPNet(), evil, trust_pickle=True)
    assert marker.exists()  # what the flag's help says it does


def _cifar_folder(root, test_batch_payload=None):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, count in (("data_batch_1", 50), ("test_batch", 20)):
        batch = {b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 b"labels": rng.integers(0, 10, count).tolist(), b"batch_label": name.encode()}
        if name == "test_batch" and test_batch_payload is not None:
            batch[b"filenames"] = test_batch_payload
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_a_crafted_cifar_batch_is_refused_and_a_plain_one_reads(tmp_path):
    marker = tmp_path / "marker"
    _cifar_folder(tmp_path / "good")
    dataset = load_cifar10(tmp_path / "good")
    assert dataset.num_train == 50 and len(dataset.test_x) == 20
    _cifar_folder(tmp_path / "evil", Payload(marker))
    with pytest.raises(BrainSurgeonError, match="--trust-pickle"):
        load_cifar10(tmp_path / "evil")
    assert not marker.exists()
    object_array = np.array([Payload(marker)], dtype=object)
    _cifar_folder(tmp_path / "objects", object_array)
    with pytest.raises(BrainSurgeonError, match="trust"):
        load_cifar10(tmp_path / "objects")
    assert not marker.exists()


def test_the_papers_checkpoints_load_without_trusting_pickle_and_lose_nothing(shared_data):
    for network, name in ((MLPNet, "mnist_25_epoch_93.97.ckpt"), (ResNet20, "resnet20_cifar10.pth.tar")):
        path = shared_data / "checkpoints" / name
        safe, trusted = load_checkpoint(network(), path), load_checkpoint(network(), path, trust_pickle=True)
        for key, value in safe.state_dict().items():  # the shared data are trusted: full unpickling as a reference
            assert torch.equal(value, trusted.state_dict()[key]), key


# 2. Every value is validated where it enters ---------------------------------------------------------------

BAD_NUMBERS = [math.nan, math.inf, -math.inf, -1, "0.5", True, None]
# option -> values that are valid, to pin down where the range starts; every option refuses BAD_NUMBERS.
OPTIONS = {
    "damping": [1e-3], "max_memory": [2**30], "chunk_size": [8], "num_samples": [32], "stages": [2],
    "refine": [0, 1], "later_damping": [1e-2], "epsilon": [0.0], "rho": [1], "tau": [1], "max_passes": [0],
    "init_trials": [0], "selection_damping": [0.0], "iht_rounds": [0], "max_swaps": [0], "swap_candidates": [1],
    "max_kept": [1], "seed": [0],
}
ZERO_REFUSED = {"damping", "max_memory", "chunk_size", "num_samples", "stages", "later_damping", "rho", "tau",
                "swap_candidates", "max_kept"}


def _method_for(option):
    if option in ("iht_rounds", "max_swaps", "swap_candidates", "max_kept"):
        return "swaps"
    return "cbs"


@pytest.mark.parametrize("option", sorted(OPTIONS))
def test_every_numeric_option_refuses_nan_inf_negative_and_wrong_types(option):
    model, x, y = small_mlp()
    bad = [v for v in BAD_NUMBERS if not (v is None and option in ("num_samples", "chunk_size", "damping",
                                                                      "stages", "refine", "later_damping",
                                                                      "max_memory"))]  # None: the default
    bad += [0] if option in ZERO_REFUSED else []
    for value in bad:
        with pytest.raises(BrainSurgeonError, match=option.split("_")[0]):
            brainsurgeon.drivers.plan.plan_run(model, 0.5, _method_for(option), **{option: value})
    for value in OPTIONS[option]:
        brainsurgeon.drivers.plan.plan_run(model, 0.5, _method_for(option), **{option: value})


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1, 1.0, "0.5", None])
def test_sparsity_refuses_bad_values(value):
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match=r"sparsity must be in \[0, 1\)"):
        brainsurgeon.prune(model, (x, y), value, "mp", progress=False)
    with pytest.raises(BrainSurgeonError, match="schedule"):
        brainsurgeon.prune(model, (x, y), 0.5, "mp", schedule=[value, 0.5], progress=False)


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.1, 0, "0.5", None, []])
def test_damping_grid_refuses_bad_values(value):
    model, x, y = small_mlp()
    grid = value if value == [] else [1.0, value]
    with pytest.raises(BrainSurgeonError, match="damping_grid"):
        brainsurgeon.prune(model, (x, y), 0.5, "mp+cbsu", progress=False, damping_grid=grid)


def test_a_sparsity_that_would_prune_everything_is_refused(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    code, _, err = run(capsys, *prune_args(data, checkpoint, tmp_path / "o.safetensors")[:-5], "--sparsity",
                       "0.99999", "--out", tmp_path / "o.safetensors", "--quiet")
    one_line_error(code, err, "all 32360 prunable weights")
    assert not (tmp_path / "o.safetensors").exists()
    model, x, y = small_mlp()
    with pytest.raises(BrainSurgeonError, match="leaving nothing"):
        brainsurgeon.prune(model, (x, y), 0.995, "mp", pattern="layer", progress=False)  # 12 x 5 -> all 60


@pytest.mark.parametrize("flag, value, needle", [
    ("--calib-samples", "0", "calibration samples must be an integer >= 1"),
    ("--calib-samples", "-5", "calibration samples must be an integer >= 1"),
    ("--max-memory-gb", "nan", "max_memory"),
    ("--damp", "inf", "damping"),
    ("--damp=-1e-3", None, "damping"),
    ("--sparsity", "nan", "sparsity"),
    ("--sparsity", "abc", "invalid float value"),
    ("--include", "fc[", "not a valid regular expression"),
    ("--seed", "-1", "seed"),
])
def test_cli_values_are_checked_before_any_work(capsys, mnist_like, tmp_path, flag, value, needle):
    data, checkpoint = mnist_like
    code, _, err = run(capsys, *prune_args(data, checkpoint, tmp_path / "o.safetensors"), flag,
                       *([] if value is None else [value]))
    one_line_error(code, err, needle)
    assert not list(tmp_path.glob("*.safetensors*")) and not list(tmp_path.glob(".o.safetensors*"))


def test_one_string_is_one_pattern():
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "mp", include="^0$", progress=False)
    assert list(result.masks) == ["0.weight"]
    assert set(result.dense_layers) == {"2", "3"}


def test_an_integer_checkpoint_is_refused(tmp_path):
    path = tmp_path / "int.pt"
    torch.save({k: (v * 100).long() for k, v in MLPNet().state_dict().items()}, path)
    with pytest.raises(BrainSurgeonError, match="dtype torch.int64"):
        load_checkpoint(MLPNet(), path)


@pytest.mark.parametrize("inputs, targets, needle", [
    (torch.randn(0, 8), torch.zeros(0, dtype=torch.long), "empty"),
    (torch.randint(0, 5, (64, 8)), torch.zeros(64, dtype=torch.long), "cannot run on the calibration inputs"),
    (torch.randn(64, 7), torch.zeros(64, dtype=torch.long), "cannot run on the calibration inputs"),
    (torch.randn(64, 8), torch.full((64,), -100), "calibration loss is nan"),
    (torch.randn(64, 8), torch.full((64,), 7), "cannot use the calibration targets"),
    (torch.randn(64, 8), torch.zeros(63, dtype=torch.long), "differ in length"),
    (torch.full((64, 8), math.nan), torch.zeros(64, dtype=torch.long), "NaN"),
])
def test_unusable_calibration_data_is_refused(inputs, targets, needle):
    model, _, _ = small_mlp()
    for method in ("mp", "cbs"):
        with pytest.raises(BrainSurgeonError, match=needle):
            brainsurgeon.prune(model, (inputs, targets), 0.5, method, progress=False)


def test_too_few_samples_for_a_fisher_method_warn():
    model, x, y = small_mlp()
    with pytest.warns(FewSamplesWarning, match="only 8 calibration samples"):
        brainsurgeon.prune(model, (x[:8], y[:8]), 0.5, "wf", progress=False)


@pytest.mark.parametrize("flag, value", [("--sparsities", "0.5,x"), ("--seeds", "0,1.5"), ("--schedule", "0.5,,a")])
def test_bad_lists_are_argparse_errors(capsys, mnist_like, flag, value):
    data, checkpoint = mnist_like
    code, _, err = run(capsys, "bench", "--checkpoint", checkpoint, "--data-dir", data, flag, value)
    one_line_error(code, err, "comma-separated")


def test_bench_checks_every_sparsity_before_the_first_run(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    code, _, err = run(capsys, "bench", "--checkpoint", checkpoint, "--data-dir", data, "--methods", "mp,cbs",
                       "--sparsities", "0.5,0.9,1.5", "--calib-samples", "100", "--json", tmp_path / "b.json",
                       "--quiet")
    one_line_error(code, err, "sparsity must be in [0, 1), got 1.5")
    assert not (tmp_path / "b.json").exists()


# 3. Every prunable weight is pruned or reported --------------------------------------------------------------

def test_parametrized_weight_norm_and_plain_tensor_weights_are_reported():
    model, x, y = small_mlp()
    parametrizations.weight_norm(model[0])
    with pytest.warns(FutureWarning):
        torch.nn.utils.weight_norm(model[2])
    result = brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, init_trials=2)
    assert list(result.masks) == ["3.weight"]
    assert "parametrization" in result.dense_layers["0"] and "weight_norm" in result.dense_layers["2"]
    plain = nn.Linear(8, 16, bias=False)
    del plain.weight
    plain.weight = torch.randn(16, 8) * 2  # computed, not a Parameter
    model, x, y = small_mlp()
    model[0] = plain
    result = brainsurgeon.prune(model, (x, y), 0.5, "mp", progress=False)
    assert "not an nn.Parameter" in result.dense_layers["0"]
    assert result.report()["num_weights"] == 16 * 12 + 12 * 5


@pytest.mark.parametrize("method", ["mp", "wf", "cbs", "swaps", "max"])
def test_a_model_already_pruned_with_torch_prune_is_pruned_further(method):
    model, x, y = small_mlp()
    torch_prune.l1_unstructured(model[0], "weight", amount=0.5)
    old_mask = model[0].weight_mask.bool().clone()
    options = brainsurgeon.drivers.registry.options_for(method, {"init_trials": 2})
    result = brainsurgeon.prune(model, (x, y), 0.7, method, progress=False, **options)
    assert result.num_pruned == int(0.7 * (8 * 16 + 16 * 12 + 12 * 5) + 0.5)
    assert not (result.masks["0.weight"] & ~old_mask).any()  # what was pruned stays pruned
    pruned = result.apply_masks(brainsurgeon.drivers.layers.copy_model(model))
    assert torch.equal(pruned[0].weight_mask.bool(), result.masks["0.weight"])
    assert torch.equal(pruned[0].weight, result.weights["0.weight"])
    with pytest.raises(BrainSurgeonError, match="already prune more"):
        brainsurgeon.prune(model, (x, y), 0.3, method, pattern="layer", progress=False, **options)


def test_tied_weights_are_one_parameter():
    model, x, y = tiny_problem(0, n=64, sizes=((6, 6), (6, 6), (6, 4)))
    model[2].weight = model[0].weight
    result = brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, init_trials=2)
    assert set(result.masks) == {"0.weight", "3.weight"} and "tied" in result.dense_layers["2"]
    assert result.num_weights == 36 + 24
    result.apply(model)
    assert model[2].weight is model[0].weight and torch.equal(model[0].weight, result.weights["0.weight"])


# 4. The model comes back as it was handed over ---------------------------------------------------------------

def test_each_modules_mode_is_restored():
    model, x, y = small_mlp()
    model.train()
    model[1].eval()
    modes = [m.training for m in model.modules()]
    for method in ("mp", "cbs", "max"):
        brainsurgeon.prune(model, (x, y), 0.5, method, progress=False,
                           **brainsurgeon.drivers.registry.options_for(method, {"init_trials": 2}))
        assert [m.training for m in model.modules()] == modes


# 5. Outputs are written whole or not at all, and only as regular files --------------------------------------

def _special_files(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "target.txt").write_text("keep me")
    os.symlink(tmp_path / "target.txt", tmp_path / "link")
    special = {"fifo": fifo, "directory": tmp_path, "link": tmp_path / "link"}
    if os.geteuid() == 0:  # a character device like /dev/null, made here so no real device is at risk
        os.mknod(tmp_path / "device", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        special["device"] = tmp_path / "device"
    return special


def test_outputs_that_are_not_regular_files_are_refused(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    for kind, path in _special_files(tmp_path).items():
        before = os.lstat(path)
        code, _, err = run(capsys, *prune_args(data, checkpoint, path))
        one_line_error(code, err, "cannot write")
        after = os.lstat(path)
        assert (before.st_mode, before.st_ino) == (after.st_mode, after.st_ino), kind
    assert (tmp_path / "target.txt").read_text() == "keep me"


def test_two_outputs_on_one_path_are_refused(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    out = tmp_path / "same"
    code, _, err = run(capsys, *prune_args(data, checkpoint, out), "--report", out)
    one_line_error(code, err, "same path")
    assert not out.exists()
    code, _, err = run(capsys, "demo", "--json", out, "--plot", tmp_path / "." / "same", "--quiet")
    one_line_error(code, err, "same path")


def test_outputs_get_the_usual_permissions(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    old = os.umask(0o027)
    try:
        code, _, err = run(capsys, *prune_args(data, checkpoint, tmp_path / "o.safetensors"),
                           "--report", tmp_path / "r.json")
    finally:
        os.umask(old)
    assert code == 0, err
    for name in ("o.safetensors", "r.json"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o640


def test_a_full_disk_is_one_error_and_leaves_nothing(monkeypatch, tmp_path):
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "mp", progress=False)

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(brainsurgeon.drivers.result, "save_file", disk_full)
    with pytest.raises(BrainSurgeonError, match="No space left"):
        result.save(tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_sigterm_during_a_streamed_prune_leaves_no_file(mnist_like, tmp_path):
    data, checkpoint = mnist_like
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out = tmp_path / "o.safetensors"
    command = [sys.executable, "-m", "brainsurgeon.cli", *map(str, prune_args(data, checkpoint, out)),
               "--method", "cbs", "--gradients", "disk", "--structure", "layer", "--init-trials", "100000"]
    process = subprocess.Popen(command, env={**os.environ, "TMPDIR": str(scratch)}, stderr=subprocess.PIPE,
                               text=True)
    try:
        deadline = time.monotonic() + 60
        while not list(scratch.glob("brainsurgeon-*/*")) and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.01)
        assert list(scratch.glob("brainsurgeon-*/*")), "the streamed gradients never appeared"
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:  # a timed-out run must not outlive the test
        process.kill()
        process.wait()
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "terminated" in err and "Traceback" not in err
    assert list(scratch.iterdir()) == [] and not out.exists() and not list(tmp_path.glob(".o.safetensors*"))


# 6. No raw tracebacks for bad input --------------------------------------------------------------------------

def _rewrite(path, transform):
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(transform(gzip.compress(raw), raw))


@pytest.mark.parametrize("fault, needle", [
    ("truncated-gz", "corrupt or truncated"),
    ("not-gz", "corrupt or truncated"),
    ("label-count", "images but"),
    ("header", "truncated"),
])
def test_broken_dataset_files_are_one_line(capsys, mnist_like, tmp_path, fault, needle):
    data, checkpoint = mnist_like
    images, labels = data / "train-images-idx3-ubyte.gz", data / "train-labels-idx1-ubyte.gz"
    if fault == "truncated-gz":
        _rewrite(images, lambda packed, raw: packed[: len(packed) // 2])
    elif fault == "not-gz":
        images.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    elif fault == "label-count":
        _rewrite(labels, lambda packed, raw: gzip.compress(raw[:4] + (299).to_bytes(4, "big") + raw[8:-1]))
    else:
        _rewrite(images, lambda packed, raw: gzip.compress(raw[:-100]))
    code, _, err = run(capsys, *prune_args(data, checkpoint, tmp_path / "o.safetensors"))
    one_line_error(code, err, needle)
    with pytest.raises(BrainSurgeonError, match=needle):
        load_mnist(data)


def test_a_dataset_that_does_not_fit_the_model_is_one_line(capsys, mnist_like, tmp_path):
    data, _ = mnist_like
    checkpoint = tmp_path / "resnet.pt"
    torch.save(ResNet20().state_dict(), checkpoint)
    code, _, err = run(capsys, *prune_args(data, checkpoint, tmp_path / "o.safetensors"), "--model", "resnet20")
    one_line_error(code, err, "cannot run on the calibration inputs")


def test_no_network_for_download_is_one_line(capsys, tmp_path):
    code, _, err = run(capsys, "download-mnist", tmp_path / "mnist", "--mirror", "http://127.0.0.1:9/")
    one_line_error(code, err, "cannot download")
    assert list((tmp_path / "mnist").iterdir()) == []


def test_an_unreadable_checkpoint_is_one_line(capsys, mnist_like, tmp_path):
    data, _ = mnist_like
    for content in (b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"):
        bad = tmp_path / "bad.pt"
        bad.write_bytes(content)
        code, _, err = run(capsys, *prune_args(data, bad, tmp_path / "o.safetensors"))
        one_line_error(code, err, "cannot read checkpoint")


# 7. Outputs never replace what the user has -------------------------------------------------------------------

def _tree(root):
    """Every path under `root` with its bytes (folders as None) and mode: what must survive untouched."""
    return {str(path.relative_to(root)): (None if path.is_dir() else path.read_bytes(), path.stat().st_mode)
            for path in sorted(root.rglob("*"))}


@pytest.fixture
def user_files(tmp_path):
    """A folder of a user's files, and a file of theirs beside it."""
    folder = tmp_path / "mine"
    (folder / "sub").mkdir(parents=True)
    (folder / "thesis.tex").write_text("\\section{years of work}")
    (folder / "sub" / "data.bin").write_bytes(bytes(range(256)))
    (tmp_path / "notes.txt").write_text("keep me")
    return folder, tmp_path / "notes.txt"


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory):
    return lm_folder(tmp_path_factory.mktemp("lm"), tiny_llama(layers=2))


def _fake_gguf(path):
    path.write_bytes(GGUF_MAGIC + bytes(64))
    return path


LM_SIZES = ("--calib-seqs", "4", "--seq-len", "16", "--eval-windows", "2", "--quiet")


def _output_commands(mnist, checkpoint, llama, text, gguf, folder, file):
    """(name, argv) of every command that writes, pointed at the user's folder or file."""
    lm = ("--hf-model", llama, "--text", text, *LM_SIZES)
    bench = ("bench", "--checkpoint", checkpoint, "--data-dir", mnist, "--methods", "mp", "--sparsities", "0.5",
             "--calib-samples", "50", "--quiet")
    return [
        ("prune --out file", prune_args(mnist, checkpoint, file)),
        ("prune --out folder", prune_args(mnist, checkpoint, folder)),
        ("prune --report", prune_args(mnist, checkpoint, folder.parent / "new.safetensors", "--report", file)),
        ("prune --hf-model --out folder", ("prune", *lm, "--sparsity", "0.5", "--out", folder)),
        ("prune --hf-model --out folder --overwrite", ("prune", *lm, "--sparsity", "0.5", "--out", folder,
                                                       "--overwrite")),
        ("prune --hf-model --out file", ("prune", *lm, "--sparsity", "0.5", "--out", file)),
        ("prune --hf-model --report", ("prune", *lm, "--sparsity", "0.5", "--out", folder.parent / "new",
                                       "--report", file)),
        ("bench --json", (*bench, "--json", file)),
        ("bench --plot", (*bench, "--plot", file)),
        ("bench --hf-model --json", ("bench", *lm, "--methods", "mp", "--sparsities", "0.5", "--json", file)),
        ("demo --json", ("demo", "--json", file, "--quiet")),
        ("demo --plot", ("demo", "--plot", file, "--quiet")),
        ("convert-gguf", ("convert-gguf", gguf, folder)),
        ("convert-gguf --overwrite", ("convert-gguf", gguf, folder, "--overwrite")),
        ("convert-gguf onto a file", ("convert-gguf", gguf, file)),
        ("download-mnist", ("download-mnist", folder, "--mirror", "http://127.0.0.1:9/")),
    ]


def test_no_command_replaces_or_deletes_a_users_files(capsys, mnist_like, llama_folder, user_files, tmp_path):
    data, checkpoint = mnist_like
    folder, file = user_files
    (folder / "train-images-idx3-ubyte.gz").write_bytes(b"the user's own, not the canonical file")
    gguf = _fake_gguf(tmp_path / "model.gguf")
    before = _tree(tmp_path)
    for name, argv in _output_commands(data, checkpoint, *llama_folder, gguf, folder, file):
        code, _, err = run(capsys, *argv)
        one_line_error(code, err)
        assert any(word in err for word in ("exists", "not the canonical", "did not write", "not a folder",
                                            "is a directory", "a file of that name")), (name, err)
        assert _tree(tmp_path) == before, name


def test_a_folder_output_never_overlaps_an_input_or_the_working_directory(capsys, llama_folder, tmp_path,
                                                                          monkeypatch):
    llama, text = llama_folder
    source = tmp_path / "d"
    source.mkdir()
    gguf = _fake_gguf(source / "model.gguf")
    (source / "thesis.tex").write_text("x")
    before = _tree(tmp_path)
    for argv in [("convert-gguf", gguf, source), ("convert-gguf", gguf, source, "--overwrite"),
                 ("prune", "--hf-model", llama, "--text", text, *LM_SIZES, "--sparsity", "0.5", "--out", llama,
                  "--overwrite"),
                 ("prune", "--hf-model", llama, "--text", text, *LM_SIZES, "--sparsity", "0.5", "--out",
                  llama / "pruned")]:
        code, _, err = run(capsys, *argv)
        one_line_error(code, err)
    monkeypatch.chdir(source)
    code, _, err = run(capsys, "convert-gguf", "model.gguf", ".", "--overwrite")
    one_line_error(code, err, "overlaps")
    assert _tree(tmp_path) == before


def test_overwrite_replaces_only_a_folder_brainsurgeon_wrote_whole(capsys, llama_folder, tmp_path):
    llama, text = llama_folder
    out = tmp_path / "pruned"
    argv = ("prune", "--hf-model", llama, "--text", text, *LM_SIZES, "--sparsity", "0.5", "--out", out)
    assert run(capsys, *argv)[0] == 0
    assert run(capsys, *argv, "--method", "mp", "--overwrite")[0] == 0
    assert json.loads((out / "brainsurgeon_report.json").read_text())["settings"]["method"] == "mp"
    (out / "my-notes.txt").write_text("mine now")
    before = _tree(tmp_path)
    code, _, err = run(capsys, *argv, "--overwrite")
    one_line_error(code, err, "my-notes.txt")
    assert _tree(tmp_path) == before and not list(tmp_path.glob(".pruned*"))


def test_no_output_lies_inside_an_output_folder(capsys, llama_folder, tmp_path):
    llama, text = llama_folder
    out = tmp_path / "pruned"
    argv = ("prune", "--hf-model", llama, "--text", text, *LM_SIZES, "--sparsity", "0.5", "--out", out)
    assert run(capsys, *argv)[0] == 0
    before = _tree(tmp_path)
    code, _, err = run(capsys, *argv, "--overwrite", "--report", out / "report.json")
    one_line_error(code, err, "lies inside the output folder")
    assert _tree(tmp_path) == before


def test_outputs_are_checked_before_the_inputs_are_read(capsys, tmp_path, user_files):
    folder, file = user_files
    code, _, err = run(capsys, "prune", "--hf-model", tmp_path / "no-such-model", "--sparsity", "0.5", "--out", file)
    one_line_error(code, err, f"cannot write folder {file}")
    code, _, err = run(capsys, "convert-gguf", _fake_gguf(tmp_path / "m.gguf"), folder)  # a GGUF only in name
    one_line_error(code, err, "exists")


def test_the_api_refuses_an_existing_folder_and_file(llama_folder, user_files):
    folder, file = user_files
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "mp", progress=False)
    before = _tree(folder.parent)
    with pytest.raises(BrainSurgeonError, match="exists"):
        save_pruned(model, None, result, folder, {})
    with pytest.raises(BrainSurgeonError, match="exists"):
        result.save(file)
    assert _tree(folder.parent) == before
    result.save(file, overwrite=True)
    assert brainsurgeon.PruneResult.load(file).num_pruned == result.num_pruned


def _small_tmpfs(path, size="120k"):
    """A tmpfs of `size` at `path` (root only), or skip with the reason."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip() or 'not root'}")
    return path


@pytest.fixture
def full_disk(tmp_path):
    disk = _small_tmpfs(tmp_path / "disk")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_a_full_disk_is_one_line_and_leaves_only_the_users_files(capsys, mnist_like, llama_folder, full_disk,
                                                                 tmp_path):
    data, checkpoint = mnist_like
    llama, text = llama_folder
    (full_disk / "user.txt").write_text("keep me")
    lm = ("prune", "--hf-model", llama, "--text", text, *LM_SIZES, "--sparsity", "0.5")
    for argv in [prune_args(data, checkpoint, full_disk / "o.safetensors"), (*lm, "--out", full_disk / "pruned")]:
        code, _, err = run(capsys, *argv)
        one_line_error(code, err, "No space left on device")
        assert sorted(p.name for p in full_disk.iterdir()) == ["user.txt"]
    # The report does not fit: the model folder, written fine elsewhere, is not published either.
    (full_disk / "filler").write_bytes(bytes(118_000))
    code, _, err = run(capsys, *lm, "--out", tmp_path / "pruned", "--report", full_disk / "r.json")
    one_line_error(code, err, "No space left on device")
    assert not (tmp_path / "pruned").exists() and not list(tmp_path.glob(".pruned*"))
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "user.txt"]


def test_folders_follow_the_umask(capsys, llama_folder, tmp_path):
    llama, text = llama_folder
    old = os.umask(0o027)
    try:
        code, _, err = run(capsys, "prune", "--hf-model", llama, "--text", text, *LM_SIZES, "--sparsity", "0.5",
                           "--out", tmp_path / "pruned")
    finally:
        os.umask(old)
    assert code == 0, err
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in [tmp_path / "pruned",
                                                                      *(tmp_path / "pruned").rglob("*")]}
    assert modes.pop("pruned") == 0o750 and set(modes.values()) == {0o640}, modes


# 8. One error type at the boundary: every command against a directory of broken files ----------------------

@pytest.fixture
def broken_files(tmp_path):
    """Files no command can use, one per way of being broken; `marker` appears if any of them ran code."""
    folder, marker = tmp_path / "broken", tmp_path / "marker"
    folder.mkdir()
    rng = np.random.default_rng(0)
    good = tmp_path / "good.safetensors"
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(64, 64)}, str(good))
    files = {
        "empty": b"",
        "random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "truncated-safetensors": good.read_bytes()[:300],
        "gguf-header-then-junk": GGUF_MAGIC + rng.integers(0, 256, 512, dtype=np.uint8).tobytes(),
        "json": b'{"not": "what was asked for"',
        "json-of-another-shape": b'{"results": 3, "settings": []}',
        "latin1-text": "caf\xe9 cr\xe8me".encode("latin-1"),
        "malicious-pickle": pickle.dumps({"x": Payload(marker)}),
    }
    for name, content in files.items():
        (folder / name).write_bytes(content)
    torch.save(MLPNet().state_dict(), folder / "torch-checkpoint")
    torch.save({"x": Payload(marker)}, folder / "malicious-torch")
    return folder, marker


def _model_folder_with(root, llama, weights, name):
    folder = root / f"model-{weights.name}-{name}"
    folder.mkdir()
    for part in llama.glob("*.json"):
        (folder / part.name).write_bytes(part.read_bytes())
    (folder / name).write_bytes(weights.read_bytes())
    return folder


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_every_command_refuses_every_broken_file_in_one_line(capsys, mnist_like, llama_folder, broken_files,
                                                             tmp_path):
    data, _ = mnist_like
    llama, text = llama_folder
    folder, marker = broken_files
    for bad in sorted(folder.iterdir()):
        models = [_model_folder_with(tmp_path, llama, bad, name)
                  for name in ("model.safetensors", "pytorch_model.bin")]
        commands = [
            prune_args(data, bad, tmp_path / "o.safetensors"),
            ("convert-gguf", bad, tmp_path / "converted"),
            ("table", bad),
            ("prune", "--hf-model", llama, "--text", bad, *LM_SIZES, "--sparsity", "0.5", "--out", tmp_path / "p"),
            *[("prune", "--hf-model", model, "--text", text, *LM_SIZES, "--sparsity", "0.5", "--out",
               tmp_path / "p") for model in models],
        ]
        for argv in commands:
            code, _, err = run(capsys, *argv)
            if bad.name == "torch-checkpoint" and argv[0] == "prune" and "--checkpoint" in argv:
                assert code == 0, err  # the one file here that is what it claims to be
                (tmp_path / "o.safetensors").unlink()
                continue
            one_line_error(code, err)
            assert not marker.exists(), (bad.name, argv)
        with pytest.raises(BrainSurgeonError, match="pruning result"):
            brainsurgeon.PruneResult.load(bad)
    assert not (tmp_path / "converted").exists() and not (tmp_path / "p").exists()


def test_a_model_that_is_not_causal_is_refused(capsys, tmp_path):
    import transformers

    config = transformers.BertConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    bert, text = lm_folder(tmp_path, transformers.BertForMaskedLM(config), "bert")
    code, _, err = run(capsys, "prune", "--hf-model", bert, "--text", text, *LM_SIZES, "--sparsity", "0.5",
                       "--out", tmp_path / "p")
    one_line_error(code, err, "not a causal language model")


# 9. Inputs are bounded and checked the same way on both objectives ----------------------------------------

def test_text_must_be_a_bounded_regular_file(capsys, llama_folder, tmp_path):
    llama, _ = llama_folder
    huge = tmp_path / "huge.txt"
    with open(huge, "wb") as handle:  # sparse: no disk used
        handle.truncate(validation.MAX_TEXT_BYTES + 1)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "texts").mkdir()
    for text, needle in (("/dev/zero", "not a regular file"), (tmp_path / "texts", "is a directory"),
                         (fifo, "not a regular file"), (huge, "above the cap")):
        code, _, err = run(capsys, "prune", "--hf-model", llama, "--text", text, *LM_SIZES, "--sparsity", "0.5",
                           "--out", tmp_path / "p")
        one_line_error(code, err, needle)


def _relu_mlp(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 5)).eval()
    return model, torch.randn(64, 8), torch.randint(0, 5, (64,))


@pytest.mark.parametrize("objective, method", [("fisher", "wf"), ("fisher", "cbs"), ("fisher", "swaps"),
                                               ("layer", "sparsegpt"), ("layer", "admm")])
def test_non_finite_weights_inputs_and_curvature_are_one_line_on_both_objectives(objective, method):
    model, x, y = _relu_mlp()
    options = {"init_trials": 2} if method == "cbs" else {}

    def attempt(model, inputs, needle):
        with pytest.raises(BrainSurgeonError, match=needle):
            brainsurgeon.prune(model, (inputs, y), 0.5, method, objective=objective, progress=False, **options)

    attempt(model, x * math.nan, "NaN")
    attempt(model, x * 1e30, "overflow")
    broken = brainsurgeon.drivers.layers.copy_model(model)
    with torch.no_grad():
        broken[0].weight[0, 0] = math.inf
    attempt(broken, x, "NaN or Inf")


def test_numpy_pairs_are_accepted_and_python_lists_refused_on_both_objectives():
    model, x, y = _relu_mlp()
    for objective, method in (("fisher", "wf"), ("layer", "sparsegpt")):
        from_tensors = brainsurgeon.prune(model, (x, y), 0.5, method, objective=objective, progress=False)
        from_numpy = brainsurgeon.prune(model, (x.numpy(), y.numpy()), 0.5, method, objective=objective,
                                        progress=False)
        for name, mask in from_tensors.masks.items():
            assert torch.equal(mask, from_numpy.masks[name])
            assert torch.allclose(from_tensors.weights[name], from_numpy.weights[name])
        with pytest.raises(BrainSurgeonError, match="torch.tensor"):
            brainsurgeon.prune(model, (x.tolist(), y.tolist()), 0.5, method, objective=objective, progress=False)


@pytest.mark.parametrize("option, value, needle", [
    ("stages", 10**6, "a stage would prune none"),
    ("init_trials", validation.MAX_INIT_TRIALS + 1, "init_trials"),
    ("seed", 2**64, "seed"),
    ("refine", validation.MAX_REFINE + 1, "refine"),
    ("max_passes", validation.MAX_COUNT + 1, "max_passes"),
])
def test_every_count_has_an_upper_bound(option, value, needle):
    model, x, y = small_mlp()
    options = {option: value, **({"stages": 2} if option == "refine" else {})}
    with pytest.raises(BrainSurgeonError, match=needle):
        brainsurgeon.prune(model, (x, y), 0.5, "cbs", progress=False, **options)


def test_windows_are_bounded_by_the_models_positions(capsys, llama_folder, tmp_path):
    llama, text = llama_folder
    code, _, err = run(capsys, "prune", "--hf-model", llama, "--text", text, "--calib-seqs", "2", "--seq-len",
                       "4096", "--quiet", "--sparsity", "0.5", "--out", tmp_path / "p")
    one_line_error(code, err, "longer than the model's 128 positions")


# 10. A saved result belongs to one model -------------------------------------------------------------------

def test_a_result_is_saved_only_with_its_own_model(tmp_path):
    model, x, y = small_mlp()
    result = brainsurgeon.prune(model, (x, y), 0.5, "mp", progress=False)
    other, _, _ = tiny_problem(1, n=4, sizes=((8, 4), (4, 5)))
    with pytest.raises(BrainSurgeonError, match="save the result with the model it came from"):
        result.save(tmp_path / "mixed.safetensors", other)
    assert list(tmp_path.iterdir()) == []
    result.save(tmp_path / "own.safetensors", model)
    loaded = brainsurgeon.PruneResult.load(tmp_path / "own.safetensors")
    assert all(torch.equal(loaded.masks[name], mask) for name, mask in result.masks.items())


def test_load_refuses_a_file_it_did_not_write(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other-metadata.safetensors"), metadata={"brainsurgeon": "{"})
    for path, needle in ((tmp_path / "foreign.safetensors", "lacks 'brainsurgeon'"),
                         (tmp_path / "other-metadata.safetensors", "not written by PruneResult.save"),
                         (tmp_path / "missing", "not found"), (tmp_path, "is a directory"),
                         ("/dev/zero", "not a regular file")):
        with pytest.raises(BrainSurgeonError, match=needle):
            brainsurgeon.PruneResult.load(path)


# 11. Quiet means quiet, for the libraries we call too -------------------------------------------------------

def test_quiet_silences_the_language_model_path_even_on_a_terminal(llama_folder, tmp_path):
    import pty

    llama, text = llama_folder
    main_side, terminal = pty.openpty()
    process = subprocess.run([sys.executable, "-m", "brainsurgeon.cli", "prune", "--hf-model", str(llama), "--text",
                              str(text), *LM_SIZES, "--sparsity", "0.5", "--out", str(tmp_path / "p")],
                             stderr=terminal, stdout=subprocess.PIPE, timeout=120)
    os.close(terminal)
    written = b""
    try:
        while chunk := os.read(main_side, 4096):
            written += chunk
    except OSError:  # the terminal's other side is closed: everything was read
        pass
    os.close(main_side)
    assert process.returncode == 0 and written == b"", written


def test_a_failed_read_inside_a_run_is_not_reported_as_a_failed_write(tmp_path):
    from brainsurgeon.atomic import outputs

    with pytest.raises(FileNotFoundError):
        with outputs() as staged:
            staged.file(tmp_path / "o.safetensors").write_text("partial")
            raise FileNotFoundError(2, "No such file or directory", str(tmp_path / "some-input"))
    with pytest.raises(BrainSurgeonError, match="cannot write .*o.safetensors: No space left on device"):
        with outputs() as staged:
            staged.file(tmp_path / "o.safetensors")
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_appears_at_an_output_during_the_run_is_the_users_and_survives(tmp_path):
    from brainsurgeon.atomic import outputs

    for make in (lambda path: path.write_text("the user's"), lambda path: path.mkdir()):
        target = tmp_path / "out"
        with pytest.raises(BrainSurgeonError, match="exists"):
            with outputs() as staged:
                staged.file(tmp_path / "report.json").write_text("{}")
                staged.folder(target)
                make(target)  # written by someone else while the run worked
        assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
        assert target.is_dir() or target.read_text() == "the user's"
        _remove_user_path(target)


def _remove_user_path(path):
    if path.is_dir():
        path.rmdir()
    else:
        path.unlink()
