"""Benchmark: accuracy (or, for language models, perplexity) of each method at each sparsity and seed, as a
table, JSON and an optional plot."""
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from . import validation
from .atomic import check_writable, write_text
from .curvature.hessian import DEFAULT_RELATIVE_DAMPING
from .datasets.vision import Dataset, accuracy
from .distributed import world
from .drivers.layers import copy_model, storage_dtype
from .drivers.oneshot import prune
from .drivers.placement import check_device
from .drivers.plan import plan_run
from .drivers.registry import check_sweep_options, options_for
from .drivers.stage import DEFAULT_MAX_MEMORY
from .drivers.tuning import Tuning
from .errors import BrainSurgeonError
from .memory import trim_heap

UNSTRUCTURED_NOTE = ("Unstructured sparsity alone does not make the model smaller or faster: "
                     "the zeros need sparse storage or sparse kernels to pay off.")


def reset_peak_memory() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM) from the memory that is live: the
    heap's free memory is returned first; elsewhere a no-op."""
    trim_heap()
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


def measure_run(model, run_prune, score) -> dict:
    """Time `run_prune()` and its peak resident memory, then `score` a pruned copy of `model`: the fields every
    bench row has. `seconds` is the prune's wall time; `peak_rss_bytes` the process's peak during it."""
    reset_peak_memory()
    start = time.perf_counter()
    result = run_prune()
    seconds = time.perf_counter() - start
    peak = peak_memory_bytes()
    return dict(score=score(result.apply(copy_model(model))), seconds=seconds, achieved_sparsity=result.sparsity,
                num_pruned=result.num_pruned, num_weights=result.num_weights, peak_rss_bytes=peak,
                timings=result.timings, settings=result.settings, stats=result.stats)


def column(sparsity) -> tuple:
    """A vision bench column -> (sparsity, pattern): 0.5 is one global count, '2:4' is N:M."""
    return (None, sparsity) if isinstance(sparsity, str) else (sparsity, None)


def run_benchmark(model, dataset: Dataset, methods, sparsities, seeds=(0,), calib_samples=DEFAULT_CALIB_SAMPLES,
                  damping=None, model_name="model", progress=True, max_memory=DEFAULT_MAX_MEMORY, structure=None,
                  gradients="auto", json_path=None, overwrite=False, **options) -> dict:
    """Prune `model` with every method x sparsity x seed; each run starts from the dense model.

    `seconds` is the wall time of the prune call, per-sample gradients included; `peak_rss_bytes` its peak
    resident memory (the process's, data and model included). With `json_path`, the report so far is written
    after every run (`complete` is false until the last), so a long bench that is stopped keeps its figures;
    an existing file there is refused before the first run unless `overwrite`.
    """
    if json_path:
        check_writable(json_path, overwrite)
    if not (len(methods) and len(sparsities) and len(seeds)):
        raise BrainSurgeonError("bench needs at least one method, one sparsity and one seed")
    tuning = Tuning(**{name: options.pop(name) for name in Tuning.names() if name in options})
    check_sweep_options(methods, options)
    for seed in seeds:  # every run is checked before the first one starts
        for sparsity in sparsities:
            for method in methods:
                plan_run(model, column(sparsity)[0], method, pattern=column(sparsity)[1], damping=damping, seed=seed,
                         max_memory=max_memory, structure=structure, gradients=gradients, tuning=tuning,
                         **options_for(method, options))
    calib_samples = validation.count("calibration samples", calib_samples)
    report = {
        "model": model_name,
        "dataset": dataset.name,
        "dense_accuracy": accuracy(model, dataset.test_x, dataset.test_y),
        "settings": dict(methods=list(methods), sparsities=list(sparsities), seeds=list(seeds),
                         calib_samples=calib_samples, damping=damping, structure=structure, gradients=gradients,
                         options=options, tuning=tuning.as_dict(), test_samples=len(dataset.test_x)),
        "results": [],
        "complete": False,
        "note": UNSTRUCTURED_NOTE,
    }
    results = report["results"]
    total = len(methods) * len(sparsities) * len(seeds)
    for seed in seeds:
        # The whole training split in a seeded order: every method fits its first calib_samples, and staged
        # methods with fresh samples draw further ones from it.
        calibration = dataset.calibration(dataset.num_train, seed)
        for sparsity in sparsities:
            for method in methods:
                measured = measure_run(
                    model, lambda: prune(model, calibration, column(sparsity)[0], method, num_samples=calib_samples,
                                         pattern=column(sparsity)[1], damping=damping, seed=seed,
                                         progress=progress, max_memory=max_memory, structure=structure,
                                         gradients=gradients, tuning=tuning, **options_for(method, options)),
                    lambda pruned: accuracy(pruned, dataset.test_x, dataset.test_y))
                row = dict(method=method, sparsity=sparsity, seed=seed, accuracy=measured.pop("score"), **measured)
                _record(report, row, json_path)
                if progress:
                    print(f"[{len(results)}/{total}] {method} s={sparsity} seed={seed}: "
                          f"{row['accuracy']:.2f}% in {row['seconds']:.1f}s", file=sys.stderr, flush=True)
    report["complete"] = True
    return report


def _record(report: dict, row: dict, json_path) -> None:
    """Add a run's row; rewrite the run's own JSON (checked before the first run) with the report so far."""
    report["results"].append(row)
    if json_path:
        write_json(report, json_path, overwrite=True)


def metric_of(report: dict) -> str:
    return report.get("metric", "accuracy")


def label(sparsity) -> str:
    """A column's name: a sparsity, or a pattern such as 2:4."""
    return f"{sparsity:g}" if isinstance(sparsity, (int, float)) else str(sparsity)


def row_label(row: dict) -> str:
    """A run's row in the tables: its method, with what it ran with beyond the defaults (the dense target, a
    reconstruction, an allocation other than uniform)."""
    settings = row.get("settings") or {}
    label = row["method"]
    if settings.get("target") == "dense":
        label += " to dense"
    if settings.get("reconstruct", "none") != "none":
        label += f" + {settings['reconstruct']} fit"
    allocation = row.get("allocation", "uniform")
    return label if allocation == "uniform" else f"{label} ({allocation})"


def row_labels(report: dict) -> list:
    """The tables' rows in the order the runs were made."""
    return list(dict.fromkeys(row_label(row) for row in report["results"]))


def merged(reports: list) -> dict:
    """Several language-model bench reports of one model and windows as one: their runs in order, the columns in
    order of first appearance."""
    first = reports[0]
    if any(report.get("model") != first.get("model") or report["settings"].get("eval_windows") !=
           first["settings"].get("eval_windows") for report in reports):
        raise BrainSurgeonError("bench JSONs make one table only when they share the model and evaluation windows")
    columns = list(dict.fromkeys(s for report in reports for s in report["settings"]["sparsities"]))
    return dict(first, settings=dict(first["settings"], sparsities=columns),
                results=[row for report in reports for row in report["results"]])


def summarise(report: dict) -> dict:
    """{(row label, sparsity): (mean metric, std metric, mean seconds)} over seeds."""
    groups = {}
    for row in report["results"]:
        groups.setdefault((row_label(row), row["sparsity"]), []).append(row)
    summary = {}
    for key, rows in groups.items():
        accs = [row[metric_of(report)] for row in rows]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        summary[key] = (statistics.fmean(accs), std, statistics.fmean(row["seconds"] for row in rows))
    return summary


def format_table(report: dict) -> str:
    """Methods as rows, sparsities as columns: mean accuracy (± std over seeds) and mean seconds."""
    summary = summarise(report)
    sparsities = report["settings"]["sparsities"]
    width = 15
    metric = metric_of(report)
    rows = row_labels(report)
    first = max(12, *(len(row) + 2 for row in rows))
    lines = [f"{report['model']} / {report['dataset']}: dense {metric} {report['dense_' + metric]:.2f} "
             f"(seeds {report['settings']['seeds']}, {report['settings']['calib_samples']} calibration samples)",
             "method".ljust(first) + "".join(f"s={label(s)}".rjust(width) for s in sparsities) + "   mean s/run"]
    for method in rows:
        cells, seconds = [], []
        for sparsity in sparsities:
            if (method, sparsity) not in summary:
                cells.append("–".rjust(width))
                continue
            mean, std, secs = summary[(method, sparsity)]
            cells.append(f"{mean:.2f}±{std:.2f}".rjust(width))
            seconds.append(secs)
        lines.append(method.ljust(first) + "".join(cells) + f"{statistics.fmean(seconds):12.1f}")
    lines.append(report["note"])
    return "\n".join(lines)


def markdown_table(report: dict) -> str:
    """The README's form of a bench JSON: methods as rows, sparsities (or patterns) as columns, mean (± std over
    seeds where there are several), a dense row, and the mean seconds per run."""
    summary, dense = summarise(report), report[f"dense_{metric_of(report)}"]
    sparsities, seeds = report["settings"]["sparsities"], report["settings"]["seeds"]
    lines = [f"| method | {' | '.join(label(s) for s in sparsities)} | s/run |",
             "|---" * (len(sparsities) + 2) + "|",
             "| dense | " + " | ".join(f"{dense:.2f}" for _ in sparsities) + " | |"]
    for method in row_labels(report):
        cells = [summary.get((method, s)) for s in sparsities]
        values = ["–" if cell is None else f"{cell[0]:.2f}" + (f"±{cell[1]:.2f}" if len(seeds) > 1 else "")
                  for cell in cells]
        seconds = statistics.fmean(cell[2] for cell in cells if cell is not None)
        lines.append(f"| {method} | {' | '.join(values)} | {seconds:.0f} |")
    return "\n".join(lines)


def write_json(report: dict, path, overwrite: bool = False) -> None:
    write_text(path, json.dumps(report, indent=2) + "\n", overwrite)


def split_pattern(pattern) -> tuple:
    """A language-model bench column -> (sparsity, pattern): 0.5 is unstructured per layer, '2:4' is N:M."""
    if isinstance(pattern, str) and ":" in pattern:
        return None, pattern
    return pattern, "layer"


def check_lm_sweep(methods, options: dict) -> dict:
    """Refuse an unknown layer-wise method, or an option that no method of the sweep declares; return each
    method's declared option names."""
    from .methods.catalog import LAYER_METHODS, current_name

    unknown_methods = [method for method in methods
                       if not isinstance(method, str) or current_name(method, "layer") not in LAYER_METHODS]
    if unknown_methods:
        raise BrainSurgeonError(f"unknown layer-wise method {unknown_methods[0]!r}; choose from "
                                f"{sorted(LAYER_METHODS)}")
    declared = {method: LAYER_METHODS[current_name(method, "layer")].Options.names() for method in methods}
    unknown = sorted(set(options) - set().union(*declared.values()))
    if unknown:
        raise BrainSurgeonError(f"no method of {list(methods)} takes option {', '.join(map(repr, unknown))}; the "
                                f"options they take are: "
                                f"{', '.join(sorted(set().union(*declared.values()))) or 'none'}")
    return declared


def run_lm_benchmark(model, calibration, evaluation, methods, patterns, model_name="model", relative_damping=None,
                     progress=True, text_source="wiki", json_path=None, overwrite=False, reconstruction=None,
                     allocations=("uniform",), target="layer", device=None, **options) -> dict:
    """Prune a language model with every layer-wise method x pattern x allocation on the same calibration token
    windows and score perplexity on the same evaluation windows. A pattern is a sparsity (unstructured per layer)
    or 'N:M'; an allocation is prune_layerwise's (sequential.ALLOCATIONS). `reconstruction`: prune_layerwise's
    reconstruct keywords, `target` its target and `device` its device, the same for every run. With `json_path`,
    the report so far is written after every run, as in run_benchmark."""
    reconstruction = dict(reconstruction or {})
    if json_path:
        check_writable(json_path, overwrite)
    from .datasets.text import perplexity
    from .drivers.reconstruct import plan_reconstruction
    from .drivers.sequential import (
        ALLOCATIONS,
        check_allocation,
        plan_layerwise,
        prune_layerwise,
    )

    if not (len(methods) and len(patterns)):
        raise BrainSurgeonError("bench needs at least one method and one sparsity or pattern")
    declared = check_lm_sweep(methods, options)

    def method_options(method):
        return {key: value for key, value in options.items() if key in declared[method]}

    if not allocations:
        raise BrainSurgeonError(f"bench needs at least one allocation ({', '.join(ALLOCATIONS)})")
    runs = [(method, pattern, allocation) for pattern in patterns for allocation in allocations for method in methods]
    relative_damping = DEFAULT_RELATIVE_DAMPING if relative_damping is None else relative_damping
    for method, pattern, allocation in runs:  # checked before the first run
        sparsity, kind = split_pattern(pattern)
        _, parsed, *_ = plan_layerwise(model, sparsity, kind, method, relative_damping=relative_damping,
                                       target=target, **method_options(method))
        check_allocation(allocation, sparsity, parsed)
    plan_reconstruction(**reconstruction)
    check_device(device, world().size)
    started = time.perf_counter()
    stored = storage_dtype(model)
    # scored in float32 whatever the weights are stored in while pruning
    dense = perplexity(model if stored == torch.float32 else copy_model(model).float(), evaluation, progress=progress)
    report = {
        "model": model_name,
        "dataset": text_source,
        "metric": "perplexity",
        "dense_perplexity": dense,
        "settings": dict(methods=list(methods), sparsities=list(patterns), seeds=[0], relative_damping=relative_damping,
                         calib_samples=len(calibration), calib_windows=list(calibration.shape),
                         eval_windows=list(evaluation.shape), options=options, allocations=list(allocations),
                         target=target, dtype=str(stored).removeprefix("torch."), ranks=world().size, device=device,
                         threads_per_rank=torch.get_num_threads(),
                         **reconstruction),
        "results": [],
        "complete": False,
        "note": UNSTRUCTURED_NOTE,
    }
    for method, pattern, allocation in runs:
        sparsity, kind = split_pattern(pattern)
        measured = measure_run(model, lambda: prune_layerwise(
            model, calibration, sparsity, method, pattern=kind, relative_damping=relative_damping, progress=progress,
            allocation=allocation, target=target, device=device, **reconstruction, **method_options(method)),
            lambda pruned: perplexity(pruned.float(), evaluation, progress=progress))
        row = dict(method=method, sparsity=pattern, seed=0, allocation=allocation, perplexity=measured.pop("score"),
                   **measured)
        report["settings"]["wall_seconds"] = time.perf_counter() - started
        _record(report, row, json_path)
        if progress:
            print(f"[{len(report['results'])}/{len(runs)}] {method} {label(pattern)} ({allocation}): perplexity "
                  f"{row['perplexity']:.2f} (dense {dense:.2f}) in {row['seconds']:.1f}s", file=sys.stderr, flush=True)
    report["complete"] = True
    return report
