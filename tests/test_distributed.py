"""torch.distributed under torchrun (issue 25): shards partition the calls, the layer solves are balanced as
longest-processing-time-first promises, two gloo ranks prune a tiny Llama as one process does, a dead rank ends the
run on the other with its name, ranks given other data are refused, and the command line writes once."""
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import lm_folder, tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from brainsurgeon import prune
from brainsurgeon.cli import main
from brainsurgeon.distributed import World
from brainsurgeon.drivers.sequential import prune_layerwise
from brainsurgeon.drivers.shared_solves import longest_first

HERE = Path(__file__).parent
RANK_SCRIPT = HERE / "ranks" / "prune_tiny_llama.py"
FISHER_SCRIPT = HERE / "ranks" / "prune_tiny_mlp.py"
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@given(items=st.integers(0, 40), size=st.integers(1, 8))
def test_shards_partition_the_calls_in_order(items, size):
    shards = [World(rank, size).shard(list(range(items))) for rank in range(size)]
    assert list(itertools.chain(*shards)) == list(range(items))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


@settings(max_examples=60, deadline=None)
@given(costs=st.lists(st.floats(0.01, 100), min_size=1, max_size=7), ranks=st.integers(1, 3))
def test_longest_first_is_within_its_bound_of_the_best_split(costs, ranks):
    owners = longest_first(costs, ranks)
    assert all(0 <= owner < ranks for owner in owners)
    makespan = max(sum(c for c, o in zip(costs, owners) if o == rank) for rank in range(ranks))
    best = min(max(sum(c for c, o in zip(costs, split) if o == rank) for rank in range(ranks))
               for split in itertools.product(range(ranks), repeat=len(costs)))
    assert makespan <= (4 / 3 - 1 / (3 * ranks)) * best + 1e-9  # Graham's bound


def torchrun(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *map(str, args)], env=ONE_THREAD, capture_output=True, text=True, timeout=timeout)


def assert_same_result(first: dict, second: dict) -> None:
    for name, mask in first["masks"].items():
        assert torch.equal(second["masks"][name], mask) and torch.equal(second["weights"][name], first["weights"][name])


def one_process(method, pattern, target="layer", reconstruct="none"):
    sys.path.insert(0, str(RANK_SCRIPT.parent))
    try:
        from prune_tiny_llama import calibration_of
    finally:
        sys.path.pop(0)
    return prune_layerwise(tiny_llama(layers=4, hidden=64), calibration_of(), 0.5, method, pattern=pattern,
                           target=target, reconstruct=reconstruct, batch_size=2, progress=False)


def test_two_ranks_prune_as_one_process_does(tmp_path):
    out = tmp_path / "ranks.pt"
    done = torchrun(RANK_SCRIPT, out, "--method", "sparsegpt", "--pattern", "2:4")
    assert done.returncode == 0, done.stderr[-2000:]
    shared, alone = torch.load(out, weights_only=True), one_process("sparsegpt", "2:4")
    assert shared["ranks"] == 2
    assert_same_result(shared, torch.load(f"{out}.rank1", weights_only=True))  # every rank holds the same result
    agreeing = sum(int((shared["masks"][name] == mask).sum()) for name, mask in alone.masks.items())
    assert agreeing >= 0.9999 * sum(mask.numel() for mask in alone.masks.values())
    for name, weight in alone.weights.items():  # the H differ by the order of the ranks' float64 sums only
        torch.testing.assert_close(shared["weights"][name], weight, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_two_ranks_prune_to_the_dense_target_as_one_process_does(tmp_path):
    out = tmp_path / "ranks.pt"
    done = torchrun(RANK_SCRIPT, out, "--method", "admm", "--pattern", "2:4", "--target", "dense")
    assert done.returncode == 0, done.stderr[-2000:]
    shared, alone = torch.load(out, weights_only=True), one_process("admm", "2:4", "dense")
    for name, mask in alone.masks.items():
        assert float((shared["masks"][name] == mask).float().mean()) >= 0.9999, name


@pytest.mark.slow
def test_block_reconstruction_on_two_ranks_takes_the_steps_of_one_process(tmp_path):
    out = tmp_path / "ranks.pt"
    done = torchrun(RANK_SCRIPT, out, "--method", "sparsegpt", "--pattern", "2:4", "--reconstruct", "block")
    assert done.returncode == 0, done.stderr[-2000:]
    shared = torch.load(out, weights_only=True)
    assert_same_result(shared, torch.load(f"{out}.rank1", weights_only=True))  # every rank takes the same steps
    alone = one_process("sparsegpt", "2:4", reconstruct="block")
    for name, mask in alone.masks.items():  # one process's pieces, steps and held-out judgements
        assert torch.equal(shared["masks"][name], mask), name
        torch.testing.assert_close(shared["weights"][name], alone.weights[name], atol=1e-5, rtol=1e-4)
    for block, figures in shared["reconstruction"].items():
        assert figures["held_out_after"] <= figures["held_out_before"]
        expected = alone.stats["reconstruction"][block]
        assert figures["epochs"] == expected["epochs"] and figures["held_out_calls"] == expected["held_out_calls"]
        assert figures["held_out_after"] == pytest.approx(expected["held_out_after"], rel=1e-4)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_dead_rank_ends_the_run_on_the_other_naming_it(tmp_path):
    out, port, timeout = tmp_path / "ranks.pt", free_port(), 20
    ranks = [subprocess.Popen([sys.executable, str(RANK_SCRIPT), str(out), "--die-at-block", "2", "--timeout",
                               str(timeout)],
                              env={**ONE_THREAD, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                                   "WORLD_SIZE": "2", "RANK": str(rank), "LOCAL_RANK": str(rank)},
                              stderr=subprocess.PIPE, text=True) for rank in range(2)]
    started = time.monotonic()
    codes = [rank.wait(timeout=120) for rank in ranks]
    survivor = ranks[0].stderr.read()
    assert codes[1] == 9 and codes[0] != 0
    assert time.monotonic() - started < 60 + timeout
    assert "rank 1 stopped answering" in survivor and len(survivor.strip().splitlines()) == 1, survivor
    assert not out.exists()


@pytest.mark.slow
def test_ranks_given_other_calibration_data_are_refused(tmp_path):
    done = torchrun(RANK_SCRIPT, tmp_path / "ranks.pt", "--differ")
    assert done.returncode != 0
    assert "rank 1 was given other arguments or calibration data than rank 0" in done.stderr
    assert not (tmp_path / "ranks.pt").exists()


@pytest.mark.slow
def test_the_command_line_under_torchrun_writes_once_what_one_process_writes(tmp_path):
    folder, text = lm_folder(tmp_path, tiny_llama(layers=4, hidden=64))
    flags = ["prune", "--hf-model", folder, "--text", text, "--calib-seqs", "16", "--seq-len", "16",
             "--eval-windows", "4", "--method", "sparsegpt", "--pattern", "2:4", "--quiet"]
    done = torchrun("-m", "brainsurgeon", *flags, "--out", tmp_path / "shared", "--report", tmp_path / "shared.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("wrote") == 1
    assert main([*map(str, flags), "--out", str(tmp_path / "alone"), "--report", str(tmp_path / "alone.json")]) == 0
    shared, alone = (json.loads((tmp_path / name).read_text()) for name in ("shared.json", "alone.json"))
    assert shared["settings"]["ranks"] == 2 and alone["settings"]["ranks"] == 1
    assert shared["perplexity"] == pytest.approx(alone["perplexity"], rel=1e-3)


@pytest.mark.parametrize("method", [pytest.param("cbs", marks=pytest.mark.slow), "max"])  # max: cbs and more
def test_two_ranks_share_the_per_sample_gradients_and_prune_as_one_process_does(tmp_path, method):
    out = tmp_path / "ranks.pt"
    done = torchrun(FISHER_SCRIPT, out, "--method", method)
    assert done.returncode == 0, done.stderr[-2000:]
    sys.path.insert(0, str(FISHER_SCRIPT.parent))
    try:
        from prune_tiny_mlp import calibration_of, tiny_mlp
    finally:
        sys.path.pop(0)
    alone = prune(tiny_mlp(), calibration_of(), 0.6, method, num_samples=200, chunk_size=32, progress=False)
    shared = torch.load(out, weights_only=True)
    assert_same_result(shared, torch.load(f"{out}.rank1", weights_only=True))  # every rank holds the same result
    for name, mask in alone.masks.items():  # the chunks are the ones one process computes, on other ranks
        assert torch.equal(shared["masks"][name], mask)
        assert torch.allclose(shared["weights"][name], alone.weights[name], atol=1e-6)


def test_rank_timeout_without_torchrun_is_refused(capsys):
    assert main(["prune", "--hf-model", "x", "--sparsity", "0.5", "--out", "y", "--rank-timeout", "5"]) == 2
    assert "--rank-timeout applies under torchrun" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["prune", "--hf-model", "x", "--pattern", "heads", "--sparsity", "0.3"],
                                  ["prune", "--model", "mlpnet", "--checkpoint", "x.pt", "--pattern", "channels",
                                   "--sparsity", "0.5"],
                                  ["table", "x.json"]])
def test_commands_that_do_not_share_their_work_are_refused_under_torchrun(argv, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: refused before joining any rank
    out = [] if argv[0] == "table" else ["--out", str(tmp_path / "out")]
    assert main([*argv, *out]) == 2
    assert "under torchrun, brainsurgeon runs prune and bench, pruning weights" in capsys.readouterr().err


@pytest.mark.slow
def test_sigterm_to_the_launcher_leaves_no_scratch(tmp_path):
    folder, text = lm_folder(tmp_path, tiny_llama(layers=8, hidden=256))
    runs = tmp_path / "runs"
    runs.mkdir()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "brainsurgeon", "prune", "--hf-model", str(folder), "--text", str(text), "--calib-seqs", "32",
               "--seq-len", "64", "--eval-windows", "4", "--method", "admm", "--sparsity", "0.5", "--target", "dense",
               "--quiet", "--out", str(runs / "pruned"), "--report", str(runs / "report.json")]
    launcher = subprocess.Popen(command, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 90
        while not list(runs.iterdir()) and time.monotonic() < deadline and launcher.poll() is None:
            time.sleep(0.05)
        assert list(runs.iterdir()), "rank 0 never staged its outputs"
        time.sleep(1.0)  # into the prune
        assert launcher.poll() is None, "the run ended before it could be stopped"
        launcher.send_signal(signal.SIGTERM)
        launcher.communicate(timeout=60)
    finally:
        launcher.kill()
        launcher.wait()
    assert launcher.returncode != 0
    assert list(runs.iterdir()) == []
