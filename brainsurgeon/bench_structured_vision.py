"""The structured benchmark of a vision model: every method x allocation x fraction of the model's
multiply-accumulates x seed, each prune scored twice (as it comes, and with its BatchNorm statistics matched to the
dense model's outputs), with the parameters, MACs per image and the CPU latency of the dense and the pruned network
at batch 1 and batch 128 timed interleaved in the same process."""
import copy
import statistics
import sys
import time

import torch

from .atomic import atomic_path, check_writable
from .bench import peak_memory_bytes, reset_peak_memory, write_json
from .bench_structured import (
    LATENCY_REPEATS,
    check_fractions_fit,
    latency,
    macs,
    plan_runs,
    prune_options,
)
from .datasets.vision import Dataset, accuracy
from .drivers.layers import recalibrate_batchnorm
from .drivers.structured import prune_structured, unit_totals

LATENCY_BATCHES = (1, 128)
PROBE_IMAGES = 8  # the images the unit probes and the cost count run on


def _figures(model, dataset: Dataset) -> dict:
    return dict(accuracy=accuracy(model, dataset.test_x, dataset.test_y),
                parameters=sum(p.numel() for p in model.parameters()), macs=macs(model, dataset.test_x[:1]))


def run_vision_structured_benchmark(model, dataset: Dataset, methods, allocations, fractions, seeds=(0,),
                                    calib_samples: int = 1000, model_name: str = "model", relative_damping=None,
                                    biases=None, target=None, row_weights=None, json_path=None, overwrite: bool = False,
                                    progress: bool = True) -> dict:
    """Prune the channels of `model` with every (method, allocation) at every fraction of its multiply-accumulates
    per image, for each seed's calibration images; each prune is scored as it comes and with BatchNorm matching
    (drivers/layers.recalibrate_batchnorm on the calibration images). With `json_path` the report so far is
    written after every prune."""
    if json_path:
        check_writable(json_path, overwrite)
    runs = plan_runs(methods, allocations, fractions, ("channels",))
    probe = dataset.calibration(PROBE_IMAGES, 0)[0]
    prunable = unit_totals(model, probe, cost="macs")["channels"]
    dense = _figures(model, dataset)
    check_fractions_fit(fractions, dense["macs"], prunable, "MACs", "channels")
    options = prune_options(relative_damping, biases, target, row_weights)
    report = dict(model=model_name, metric="accuracy", threads=torch.get_num_threads(),
                  settings=dict(methods=list(methods), allocations=list(allocations), fractions=list(fractions),
                                seeds=list(seeds), units=["channels"], calib_samples=calib_samples, cost="macs",
                                latency_batches=list(LATENCY_BATCHES), latency_repeats=LATENCY_REPEATS,
                                prunable_macs=prunable, **options),
                  dense=dense, results=[], complete=False)
    for seed in seeds:
        calibration = dataset.calibration(calib_samples, seed)[0]
        for fraction, method, allocation in runs:
            reset_peak_memory()
            started = time.perf_counter()
            result = prune_structured(model, calibration, fraction * dense["macs"] / prunable, method,
                                      units_of=("channels",), allocation=allocation, cost="macs", batch_size=128,
                                      progress=progress, **options)
            seconds, peak = time.perf_counter() - started, peak_memory_bytes()
            matched = copy.deepcopy(result.model)
            recalibrate_batchnorm(matched, model, calibration, kept=result.kept_rows)
            for bn_matching, pruned in ((False, result.model), (True, matched)):
                row = dict(method=method, allocation=allocation, fraction=fraction, seed=seed,
                           bn_matching=bn_matching, seconds=seconds, peak_rss_bytes=peak,
                           **_figures(pruned, dataset), widths={k: after for k, (_, after) in result.widths.items()})
                row["macs_removed"] = 1 - row["macs"] / dense["macs"]
                for batch in LATENCY_BATCHES:
                    timed = latency({"dense": model, "pruned": pruned}, dataset.test_x[:batch])
                    row[f"latency_dense_b{batch}"], row[f"latency_pruned_b{batch}"] = timed["dense"], timed["pruned"]
                    row[f"speedup_b{batch}"] = timed["dense"] / timed["pruned"]
                report["results"].append(row)
            if json_path:
                write_json(report, json_path, overwrite=True)
            if progress:
                last = report["results"][-2:]
                print(f"seed {seed} {method} {allocation} {fraction:g}: accuracy {last[0]['accuracy']:.2f}% "
                      f"({last[1]['accuracy']:.2f}% with BN matching; dense {dense['accuracy']:.2f}%), "
                      f"{last[0]['speedup_b1']:.2f}x at batch 1, {last[0]['speedup_b128']:.2f}x at 128, "
                      f"{seconds:.0f}s", file=sys.stderr, flush=True)
    report["complete"] = True
    if json_path:
        write_json(report, json_path, overwrite=True)
    return report


def is_vision_structured(report: dict) -> bool:
    settings = report.get("settings") if isinstance(report, dict) else None
    return isinstance(settings, dict) and settings.get("units") == ["channels"]


def _mean_std(values) -> str:
    spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.mean(values):.2f}{spread}"


def _name(report: dict, row: dict) -> str:
    towards = " · dense target" if report["settings"].get("target") == "dense" else ""
    plain = " · rows unweighted" if report["settings"].get("row_weights") == "none" else ""
    return f"{row['method']} · {row['allocation']}{towards}{plain}{' · BN matched' if row['bn_matching'] else ''}"


def _groups(reports) -> dict:
    """run name -> fraction -> its rows (one per seed), over one or more channel sweeps."""
    groups = {}
    for report in reports:
        for row in report["results"]:
            groups.setdefault(_name(report, row), {}).setdefault(row["fraction"], []).append(row)
    return groups


def markdown_table(reports) -> str:
    """Accuracy (mean ± std over seeds) per method, allocation, target and BatchNorm matching (rows) and fraction
    of MACs removed (columns), over one or more channel sweeps of the same model; then the measured MACs,
    parameters and latencies, averaged over seeds."""
    reports = [reports] if isinstance(reports, dict) else list(reports)
    fractions = sorted({f for report in reports for f in report["settings"]["fractions"]})
    groups = _groups(reports)
    dense = reports[0]["dense"]
    lines = ["| method · allocation | " + " | ".join(f"{f:g} of MACs" for f in fractions) + " |",
             "|---" * (len(fractions) + 1) + "|",
             "| dense | " + " | ".join(f"{dense['accuracy']:.2f}" for _ in fractions) + " |"]
    for name, cells in groups.items():
        text = (_mean_std([r["accuracy"] for r in cells[f]]) if f in cells else "" for f in fractions)
        lines.append(f"| {name} | " + " | ".join(text) + " |")
    lines += ["", "| fraction | method · allocation | MACs removed | parameters | latency b1 (pruned vs dense) | "
              "speed-up b1 | latency b128 | speed-up b128 | s/run |", "|---|---|---|---|---|---|---|---|---|",
              f"| 0 | dense | 0 | {dense['parameters']:,} | | | | | |"]
    for name, cells in groups.items():
        if name.endswith("BN matched"):
            continue  # the same network's speed: matching changes statistics only
        for fraction in fractions:
            rows = cells.get(fraction, [])
            if not rows:
                continue
            mean = {key: statistics.mean(r[key] for r in rows) for key in (
                "macs_removed", "parameters", "latency_pruned_b1", "latency_dense_b1", "speedup_b1",
                "latency_pruned_b128", "latency_dense_b128", "speedup_b128", "seconds")}
            lines.append(f"| {fraction:g} | {name} | {mean['macs_removed']:.3f} | {mean['parameters']:,.0f} | "
                         f"{mean['latency_pruned_b1'] * 1e3:.2f} ms vs {mean['latency_dense_b1'] * 1e3:.2f} ms | "
                         f"{mean['speedup_b1']:.2f}x | {mean['latency_pruned_b128'] * 1e3:.0f} ms vs "
                         f"{mean['latency_dense_b128'] * 1e3:.0f} ms | {mean['speedup_b128']:.2f}x | "
                         f"{mean['seconds']:.0f} |")
    return "\n".join(lines)


def plot(reports, path, overwrite: bool = False) -> None:
    """Accuracy against the measured batch-128 speed-up, one line per run (mean over seeds), over one or more
    channel sweeps (needs the 'plot' extra: matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [reports] if isinstance(reports, dict) else list(reports)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, cells in _groups(reports).items():
        points = sorted((statistics.mean(r["speedup_b128"] for r in rows), statistics.mean(r["accuracy"] for r in rows))
                        for rows in cells.values())
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    axes.scatter([1.0], [reports[0]["dense"]["accuracy"]], color="grey", marker="*", s=80, label="dense")
    axes.set(xlabel=f"measured speed-up over dense at batch 128 ({reports[0]['threads']} threads)",
             ylabel="test accuracy (%)", title=f"{reports[0]['model']}: channel pruning")
    axes.legend(fontsize=7)
    figure.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
