"""The structured benchmark of a language model: every method x allocation x fraction of the blocks' parameters,
on the same calibration and evaluation windows, with what a smaller model is for measured in the same process:
parameters, multiply-accumulates per input window, the saved file's size, and the forward latency of the dense
and the pruned model timed interleaved (median of repeats after a warm-up, the thread count recorded)."""
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .atomic import atomic_path, check_writable
from .bench import peak_memory_bytes, reset_peak_memory, write_json
from .datasets.text import perplexity
from .drivers.structured import (
    UNIT_KINDS,
    check_choices,
    prune_structured,
    unit_totals,
)
from .errors import BrainSurgeonError
from .models.shrunk import write_shrunk_folder

LATENCY_REPEATS = 7  # forwards per model after one warm-up; the median is reported


def latency(models: dict, window: torch.Tensor, repeats: int = LATENCY_REPEATS) -> dict:
    """Median seconds of one forward of `window` per model, the models' forwards interleaved so that a change of
    the machine's speed meets them all alike."""
    times = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model(window)
        for _ in range(repeats):
            for name, model in models.items():
                started = time.perf_counter()
                model(window)
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)  # the counter hands over shapes


# torch's counter knows the GPU attention kernels; the CPU one it runs here is mapped to the same formula.
CPU_ATTENTION = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def macs(model, window: torch.Tensor) -> int:
    """Multiply-accumulates of one forward of `window` (torch's FLOP counter, halved), attention products
    included."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION) as counter:
        model(window)
    return counter.get_total_flops() // 2


def saved_bytes(model, tokenizer) -> int:
    """The size of the model's weight files as save_shrunk writes them."""
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch) / "model"
        folder.mkdir()
        write_shrunk_folder(folder, model, tokenizer, {})
        return sum(path.stat().st_size for path in folder.glob("*.safetensors"))


def figures(model, tokenizer, evaluation) -> dict:
    return dict(perplexity=perplexity(model, evaluation), parameters=sum(p.numel() for p in model.parameters()),
                macs=macs(model, evaluation[:1]), file_bytes=saved_bytes(model, tokenizer))


def plan_runs(methods, allocations, fractions, units_of) -> list:
    """(fraction, method, allocation) for every run, each value checked before any work."""
    for method in methods:
        for allocation in allocations:
            check_choices(method, allocation, units_of)
    for fraction in fractions:
        if not isinstance(fraction, float) or not 0 < fraction < 1:
            raise BrainSurgeonError(f"structured fractions are of the blocks' parameters, in (0, 1); got {fraction}")
    if not (methods and allocations and fractions):
        raise BrainSurgeonError("bench needs at least one method, allocation and fraction")
    return [(fraction, method, allocation) for fraction in fractions for allocation in allocations
            for method in methods]


def check_fractions_fit(fractions, whole: float, prunable: float, of: str, units: str) -> None:
    """Refuse a fraction of `whole` (the `of` measure) that the units can not reach: they hold `prunable` of it."""
    too_much = [f for f in fractions if f * whole >= prunable]
    if too_much:
        raise BrainSurgeonError(f"cannot remove {too_much[0]:g} of the {of} from {units} alone "
                                f"({prunable / whole:.3f} of them); lower the fraction")


def prune_options(relative_damping=None, biases=None, target=None, row_weights=None) -> dict:
    """The prune_structured options a sweep was given (None: the library's default), recorded in its settings."""
    given = dict(relative_damping=relative_damping, biases=biases, target=target, row_weights=row_weights)
    return {key: value for key, value in given.items() if value is not None}


def run_structured_benchmark(model, tokenizer, calibration, evaluation, methods, allocations, fractions,
                             units_of=UNIT_KINDS, model_name="model", relative_damping=None, biases=None, target=None,
                             row_weights=None, json_path=None, overwrite=False, progress=True) -> dict:
    """Prune with every (method, allocation) at every fraction of the blocks' parameters; the fraction of the
    pruned units' own parameters is that times the blocks' parameters over theirs (refused above 1). With
    `json_path` the report so far is written after every run."""
    if json_path:
        check_writable(json_path, overwrite)
    runs = plan_runs(methods, allocations, fractions, units_of)
    sizes = unit_totals(model, calibration)
    prunable = sum(sizes[kind] for kind in units_of)
    check_fractions_fit(fractions, sizes["blocks"], prunable, "blocks' parameters", " and ".join(units_of))
    options = prune_options(relative_damping, biases, target, row_weights)
    report = dict(model=model_name, metric="perplexity", threads=torch.get_num_threads(),
                  settings=dict(methods=list(methods), allocations=list(allocations), fractions=list(fractions),
                                units=[kind for kind in units_of if sizes[kind]], calib_windows=list(calibration.shape),
                                eval_windows=list(evaluation.shape), latency_window=list(evaluation[:1].shape),
                                latency_repeats=LATENCY_REPEATS, unit_parameters=sizes, **options),
                  dense=figures(model, tokenizer, evaluation), results=[], complete=False)
    for index, (fraction, method, allocation) in enumerate(runs):
        reset_peak_memory()
        started = time.perf_counter()
        result = prune_structured(model, calibration, fraction * sizes["blocks"] / prunable, method,
                                  units_of=units_of, allocation=allocation, progress=progress, **options)
        seconds, peak = time.perf_counter() - started, peak_memory_bytes()
        timed = latency({"dense": model, "pruned": result.model}, evaluation[:1])
        row = dict(method=method, allocation=allocation, fraction=fraction, seconds=seconds, peak_rss_bytes=peak,
                   **figures(result.model, tokenizer, evaluation), latency_dense=timed["dense"],
                   latency_pruned=timed["pruned"], speedup=timed["dense"] / timed["pruned"],
                   widths={name: after for name, (_, after) in result.widths.items()},
                   swaps=sum(s.get("swaps", 0) for s in result.stats.values()), settings=result.settings)
        row["blocks_removed"] = (report["dense"]["parameters"] - row["parameters"]) / sizes["blocks"]
        report["results"].append(row)
        if json_path:
            write_json(report, json_path, overwrite=True)
        if progress:
            print(f"[{index + 1}/{len(runs)}] {method} {allocation} {fraction:g}: perplexity {row['perplexity']:.2f} "
                  f"(dense {report['dense']['perplexity']:.2f}), {row['speedup']:.2f}x in {seconds:.0f}s",
                  file=sys.stderr, flush=True)
    report["complete"] = True
    if json_path:
        write_json(report, json_path, overwrite=True)
    return report


def is_structured(report: dict) -> bool:
    return isinstance(report, dict) and "units" in report.get("settings", {})


def _rows(reports: list) -> list:
    """Every run of the reports, each with the unit kinds of its sweep."""
    return [dict(row, units=report["settings"]["units"]) for report in reports for row in report["results"]]


def label(row: dict) -> str:
    return f"{row['method']} · {row['allocation']} · {'+'.join(row['units'])}"


def markdown_table(reports) -> str:
    """Perplexity per run kind (rows: method, allocation, units) and fraction of the blocks' parameters (columns),
    over one or more sweeps of the same model and windows; then each run's measured size and speed."""
    reports = [reports] if isinstance(reports, dict) else list(reports)
    fractions = sorted({f for report in reports for f in report["settings"]["fractions"]})
    rows = {}
    for row in _rows(reports):
        rows.setdefault(label(row), {})[row["fraction"]] = row
    dense = reports[0]["dense"]
    lines = ["| method · allocation · units | " + " | ".join(f"{f:g}" for f in fractions) + " |",
             "|---" * (len(fractions) + 1) + "|",
             "| dense | " + " | ".join(f"{dense['perplexity']:.2f}" for _ in fractions) + " |"]
    for name, cells in rows.items():
        cells_text = (f"{cells[f]['perplexity']:.2f}" if f in cells else "" for f in fractions)
        lines.append(f"| {name} | " + " | ".join(cells_text) + " |")
    lines += ["", "| fraction | method · allocation · units | blocks removed | parameters | MACs / window | file | "
              "latency (pruned vs dense) | speed-up | s/run | peak RSS |", "|---|---|---|---|---|---|---|---|---|---|",
              f"| 0 | dense | 0 | {dense['parameters']:,} | {dense['macs'] / 1e9:.1f} G | "
              f"{dense['file_bytes'] / 2**20:.0f} MiB | | | | |"]
    for row in sorted(_rows(reports), key=lambda r: r["fraction"]):
        lines.append(f"| {row['fraction']:g} | {label(row)} | {row['blocks_removed']:.3f} | {row['parameters']:,} | "
                     f"{row['macs'] / 1e9:.1f} G | {row['file_bytes'] / 2**20:.0f} MiB | "
                     f"{row['latency_pruned']:.3f} s vs {row['latency_dense']:.3f} s | {row['speedup']:.2f}x | "
                     f"{row['seconds']:.0f} | {row['peak_rss_bytes'] / 2**30:.1f} GiB |")
    return "\n".join(lines)


def plot(reports, path, overwrite: bool = False) -> None:
    """Perplexity against the measured speed-up, one line per run kind over one or more sweeps (needs the 'plot'
    extra: matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reports = [reports] if isinstance(reports, dict) else list(reports)
    report = reports[0]
    series = {}
    for row in _rows(reports):
        series.setdefault(label(row), []).append((row["speedup"], row["perplexity"]))
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        points.sort()
        axes.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    axes.scatter([1.0], [report["dense"]["perplexity"]], color="grey", marker="*", s=80, label="dense")
    axes.set_yscale("log")
    axes.set(xlabel=f"measured speed-up over dense ({report['threads']} threads)", ylabel="perplexity",
             title=f"{report['model']}: structured pruning")
    axes.legend()
    figure.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
