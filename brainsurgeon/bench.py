"""Benchmark: accuracy of each method at each sparsity and seed, as a table, JSON and an optional plot."""
import json
import resource
import statistics
import sys
import time
from pathlib import Path

from .atomic import atomic_path, write_text
from .datasets import Dataset, accuracy
from . import validation
from .errors import BrainSurgeonError
from .layers import copy_model
from .pruning import GIB, accepted_options, plan_run, prune

UNSTRUCTURED_NOTE = ("Unstructured sparsity alone does not make the model smaller or faster: "
                     "the zeros need sparse storage or sparse kernels to pay off.")


def reset_peak_memory() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM); elsewhere a no-op."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_memory_bytes() -> int:
    """Peak resident memory since the last reset (VmHWM), or of the whole process where that is unknown."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


DEFAULT_CALIB_SAMPLES = 10000


def run_benchmark(model, dataset: Dataset, methods, sparsities, seeds=(0,), calib_samples=DEFAULT_CALIB_SAMPLES,
                  damping=None, model_name="model", progress=True, max_memory=8 * GIB, structure="full",
                  gradients="auto", **options) -> dict:
    """Prune `model` with every method x sparsity x seed; each run starts from the dense model.

    `seconds` is the wall time of the prune call, per-sample gradients included; `peak_rss_bytes` its peak
    resident memory (the process's, data and model included).
    """
    if not (len(methods) and len(sparsities) and len(seeds)):
        raise BrainSurgeonError("bench needs at least one method, one sparsity and one seed")
    for seed in seeds:  # every run is checked before the first one starts
        for sparsity in sparsities:
            for method in methods:
                plan_run(model, sparsity, method, damping=damping, seed=seed, max_memory=max_memory,
                         structure=structure, gradients=gradients, **accepted_options(method, options))
    calib_samples = validation.count("calibration samples", calib_samples)
    results = []
    total = len(methods) * len(sparsities) * len(seeds)
    for seed in seeds:
        calibration = dataset.calibration(calib_samples, seed)
        for sparsity in sparsities:
            for method in methods:
                reset_peak_memory()
                start = time.perf_counter()
                result = prune(model, calibration, sparsity, method, damping=damping, seed=seed, progress=progress,
                               max_memory=max_memory, structure=structure, gradients=gradients,
                               **accepted_options(method, options))
                seconds = time.perf_counter() - start
                peak = peak_memory_bytes()
                pruned_model = result.apply(copy_model(model))
                row = dict(method=method, sparsity=sparsity, seed=seed,
                           accuracy=accuracy(pruned_model, dataset.test_x, dataset.test_y),
                           seconds=seconds, achieved_sparsity=result.sparsity, num_pruned=result.num_pruned,
                           num_weights=result.num_weights,
                           peak_rss_bytes=peak, timings=result.timings, settings=result.settings,
                           stats=result.stats)
                results.append(row)
                if progress:
                    print(f"[{len(results)}/{total}] {method} s={sparsity} seed={seed}: "
                          f"{row['accuracy']:.2f}% in {seconds:.1f}s", file=sys.stderr, flush=True)
    return {
        "model": model_name,
        "dataset": dataset.name,
        "dense_accuracy": accuracy(model, dataset.test_x, dataset.test_y),
        "settings": dict(methods=list(methods), sparsities=list(sparsities), seeds=list(seeds),
                         calib_samples=calib_samples, damping=damping, structure=structure, gradients=gradients,
                         options=options,
                         test_samples=len(dataset.test_x)),
        "results": results,
        "note": UNSTRUCTURED_NOTE,
    }


def summarise(report: dict) -> dict:
    """{(method, sparsity): (mean accuracy, std accuracy, mean seconds)} over seeds."""
    groups = {}
    for row in report["results"]:
        groups.setdefault((row["method"], row["sparsity"]), []).append(row)
    summary = {}
    for key, rows in groups.items():
        accs = [row["accuracy"] for row in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary[key] = (statistics.fmean(accs), std, statistics.fmean(row["seconds"] for row in rows))
    return summary


def format_table(report: dict) -> str:
    """Methods as rows, sparsities as columns: mean accuracy (± std over seeds) and mean seconds."""
    summary = summarise(report)
    sparsities = report["settings"]["sparsities"]
    width = 15
    lines = [f"{report['model']} / {report['dataset']}: dense accuracy {report['dense_accuracy']:.2f}% "
             f"(seeds {report['settings']['seeds']}, {report['settings']['calib_samples']} calibration samples)",
             "method".ljust(12) + "".join(f"s={s:g}".rjust(width) for s in sparsities) + "   mean s/run"]
    for method in report["settings"]["methods"]:
        cells, seconds = [], []
        for sparsity in sparsities:
            mean, std, secs = summary[(method, sparsity)]
            cells.append(f"{mean:.2f}±{std:.2f}".rjust(width))
            seconds.append(secs)
        lines.append(method.ljust(12) + "".join(cells) + f"{statistics.fmean(seconds):12.1f}")
    lines.append(report["note"])
    return "\n".join(lines)


def write_json(report: dict, path) -> None:
    write_text(path, json.dumps(report, indent=2) + "\n")


def plot(report: dict, path) -> None:
    """Accuracy versus sparsity, one line per method (needs the 'plot' extra: matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(report)
    sparsities = report["settings"]["sparsities"]
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for method in report["settings"]["methods"]:
        means = [summary[(method, s)][0] for s in sparsities]
        stds = [summary[(method, s)][1] for s in sparsities]
        axes.errorbar(sparsities, means, yerr=stds, marker="o", capsize=3, label=method)
    axes.axhline(report["dense_accuracy"], color="grey", linestyle=":", label="dense")
    axes.set(xlabel="sparsity", ylabel="test accuracy (%)", title=f"{report['model']} / {report['dataset']}")
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
