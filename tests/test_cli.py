"""The command line: the demo runs, and every bad input exits non-zero with one line naming the problem."""
import json

import pytest
import torch

from brainsurgeon.bench_plot import paths_not_taken, staged_runs
from brainsurgeon.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prune_writes_weights_masks_and_report(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    out, report = tmp_path / "pruned.safetensors", tmp_path / "report.json"
    code, stdout, _ = run(capsys, "prune", "--checkpoint", str(checkpoint), "--data-dir", str(data),
                          "--sparsity", "0.9", "--method", "cbs", "--calib-samples", "200", "--init-trials", "2",
                          "--out", str(out), "--report", str(report), "--quiet")
    assert code == 0, stdout
    figures = json.loads(report.read_text())
    assert figures["num_pruned"] == int(0.9 * 32360 + 0.5)
    assert figures["settings"]["method"] == "cbs+cbsu"
    assert "not make the model smaller or faster" in stdout
    assert out.stat().st_size > 0


def test_bench_writes_the_documented_json_shape(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    out = tmp_path / "bench.json"
    code, stdout, _ = run(capsys, "bench", "--checkpoint", str(checkpoint), "--data-dir", str(data),
                          "--methods", "mp,wf", "--sparsities", "0.5,0.9", "--seeds", "0,1", "--calib-samples", "100",
                          "--json", str(out), "--plot", str(tmp_path / "plot.png"), "--quiet")
    assert code == 0
    report = json.loads(out.read_text())
    assert {"model", "dataset", "dense_accuracy", "settings", "results"} <= set(report)
    assert len(report["results"]) == 8 and report["complete"] is True
    assert {"method", "sparsity", "seed", "accuracy", "seconds", "achieved_sparsity", "peak_rss_bytes"} <= set(report["results"][0])
    assert "±" in stdout and (tmp_path / "plot.png").stat().st_size > 0


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "1.2"], "sparsity must be in [0, 1)"),
    (["--sparsity", "0.5", "--method", "foo"], "unknown selection 'foo'"),
    (["--sparsity", "0.5", "--calib-samples", "100000", "--method", "wf"], "not enough training samples"),
    (["--sparsity", "0.5", "--method", "wf", "--max-memory-gb", "0.0001"], "max_memory"),
])
def test_bad_arguments_exit_nonzero_with_one_line(capsys, mnist_like, tmp_path, extra, message):
    data, checkpoint = mnist_like
    code, _, err = run(capsys, "prune", "--checkpoint", str(checkpoint), "--data-dir", str(data),
                       "--out", str(tmp_path / "o.safetensors"), "--quiet", *extra)
    assert code == 2
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "o.safetensors").exists()


def test_checkpoint_of_another_model_is_refused(capsys, mnist_like, tmp_path):
    data, _ = mnist_like
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc1.weight": torch.zeros(3, 3)}, wrong)
    code, _, err = run(capsys, "prune", "--checkpoint", str(wrong), "--data-dir", str(data), "--sparsity", "0.5",
                       "--out", str(tmp_path / "o.safetensors"))
    assert code == 2 and "does not match MLPNet" in err
    code, _, err = run(capsys, "prune", "--checkpoint", str(tmp_path / "none.pt"), "--data-dir", str(data),
                       "--sparsity", "0.5", "--out", str(tmp_path / "o.safetensors"))
    assert code == 2 and "not found" in err


def test_unwritable_output_fails_before_any_work(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    code, _, err = run(capsys, "prune", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--sparsity", "0.5",
                       "--out", str(tmp_path / "missing" / "o.safetensors"))
    assert code == 2 and "does not exist" in err


def test_missing_data_dir_names_the_fix(capsys, mnist_like, tmp_path, monkeypatch):
    _, checkpoint = mnist_like
    monkeypatch.delenv("BRAINSURGEON_DATA", raising=False)
    code, _, err = run(capsys, "prune", "--checkpoint", str(checkpoint), "--sparsity", "0.5",
                       "--out", str(tmp_path / "o.safetensors"))
    assert code == 2 and "--data-dir" in err


def test_demo_runs_on_embedded_data(capsys, tmp_path):
    out = tmp_path / "demo.json"
    code, stdout, _ = run(capsys, "demo", "--sparsities", "0.5", "--methods", "mp,cbs", "--quiet", "--json", str(out))
    assert code == 0
    report = json.loads(out.read_text())
    assert report["dense_accuracy"] > 90
    assert "digits" in stdout


def test_bench_honours_the_memory_budget(capsys, mnist_like):
    data, checkpoint = mnist_like
    code, _, err = run(capsys, "bench", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--methods", "wf",
                       "--sparsities", "0.5", "--calib-samples", "100", "--max-memory-gb", "0.0001", "--quiet")
    assert code == 2 and "max_memory" in err


def test_a_stopped_bench_keeps_the_runs_it_finished(monkeypatch, tmp_path):
    from brainsurgeon import bench
    from brainsurgeon.demo import demo_setup

    model, dataset = demo_setup()
    calls, real_prune = [], bench.prune

    def stop_on_the_second_run(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_prune(*args, **kwargs)

    monkeypatch.setattr(bench, "prune", stop_on_the_second_run)
    with pytest.raises(KeyboardInterrupt):
        bench.run_benchmark(model, dataset, ["mp"], [0.5, 0.9], calib_samples=100, progress=False,
                            json_path=tmp_path / "partial.json")
    partial = json.loads((tmp_path / "partial.json").read_text())
    assert partial["complete"] is False and [row["sparsity"] for row in partial["results"]] == [0.5]


def test_bench_plot_draws_the_stage_trace_of_staged_runs(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    out, picture = tmp_path / "bench.json", tmp_path / "plot.png"
    code, _, _ = run(capsys, "bench", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--methods", "mp,wf",
                     "--sparsities", "0.9", "--stages", "3", "--calib-samples", "100", "--json", str(out),
                     "--plot", str(picture), "--quiet")
    assert code == 0
    report = json.loads(out.read_text())
    runs = staged_runs(report)
    assert [(method, len(trace)) for method, _, _, trace in runs] == [("mp", 3), ("wf", 3)]
    assert [sparsity for sparsity, _ in runs[1][3]] == pytest.approx([1 - 0.1 ** (1 / 3), 1 - 0.1 ** (2 / 3), 0.9])
    assert all(loss > 0 for _, _, _, trace in runs for _, loss in trace)
    import matplotlib.image
    assert matplotlib.image.imread(picture).shape[1] > 1200  # two panels side by side


def test_bench_with_fresh_samples_traces_the_held_out_loss(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    out = tmp_path / "bench.json"
    code, _, _ = run(capsys, "bench", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--methods", "wf",
                     "--sparsities", "0.9", "--stages", "3", "--calib-samples", "100", "--fresh-samples",
                     "--json", str(out), "--quiet")
    assert code == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["settings"]["held_out_samples"] == 100 and row["settings"]["pool_samples"] == 300
    (_, _, _, trace), = staged_runs({"results": [row]})
    assert [loss for _, loss in trace] == [stage["held_out_loss"] for stage in row["stats"]["stages"]]


def test_the_stage_panel_has_a_single_stage_path_taken_and_the_path_not_taken():
    stage = lambda sparsity, loss: dict(sparsity=sparsity, held_out_loss=loss, calibration_loss=loss / 2)  # noqa: E731
    row = dict(method="max", sparsity=0.9, seed=0, stats=dict(stages=[stage(0.9, 0.5)],
                                                              other_path_stages={"fisher": [stage(0.3, 0.1),
                                                                                            stage(0.6, 0.7)]}))
    assert staged_runs({"results": [row]}) == [("max", 0.9, 0, [(0.9, 0.5)])]
    assert paths_not_taken({"results": [row]}) == [("max", 0.9, 0, [(0.3, 0.1), (0.6, 0.7)])]


def test_max_can_run_without_its_layer_start(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    report = tmp_path / "report.json"
    code, _, _ = run(capsys, "prune", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--method", "max",
                     "--sparsity", "0.6", "--no-layer-start", "--init-trials", "2", "--calib-samples", "100",
                     "--out", str(tmp_path / "pruned.pt"), "--report", str(report), "--quiet")
    assert code == 0
    settings = json.loads(report.read_text())["settings"]
    assert settings["layer_start"] is False and settings["method"] == "cbs+cbsu"


def test_n_m_patterns_run_on_the_fisher_objective_from_the_command_line(capsys, mnist_like, tmp_path):
    data, checkpoint = mnist_like
    out, report = tmp_path / "nm.safetensors", tmp_path / "nm.json"
    code, stdout, _ = run(capsys, "prune", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--method", "wf",
                          "--pattern", "2:4", "--calib-samples", "64", "--out", str(out), "--report", str(report),
                          "--quiet")
    assert code == 0, stdout
    figures = json.loads(report.read_text())
    assert figures["settings"]["pattern"] == "2:4" and figures["num_pruned"] == figures["num_weights"] // 2
    code, _, _ = run(capsys, "bench", "--checkpoint", str(checkpoint), "--data-dir", str(data), "--methods", "mp",
                     "--sparsities", "0.5,2:4", "--calib-samples", "64", "--json", str(tmp_path / "b.json"), "--quiet")
    results = json.loads((tmp_path / "b.json").read_text())["results"]
    assert code == 0 and [row["sparsity"] for row in results] == [0.5, "2:4"]
