"""The bench's plot: the metric against sparsity, one line per row of the table, and beside it each staged run's
loss after every stage, and the per-layer sparsities an allocation chose (needs the 'plot' extra: matplotlib)."""
from .atomic import atomic_path
from .bench import label, metric_of, row_label, row_labels, summarise


def _loss_trace(stages) -> list:
    """[(sparsity, loss)] per stage: the held-out loss where the run had held-out samples, else the calibration
    loss."""
    losses = [stage.get("held_out_loss") or stage.get("calibration_loss") for stage in stages]
    return [(stage["sparsity"], loss) for stage, loss in zip(stages, losses) if loss is not None]


def staged_runs(report: dict) -> list:
    """[(method, target sparsity, seed, [(sparsity, loss) per stage])] of the runs pruned in stages, and of those
    that compared two paths (even where the one taken is a single stage)."""
    runs = []
    for row in report["results"]:
        stats = row.get("stats") or {}
        trace = _loss_trace(stats.get("stages") or [])
        if len(trace) > 1 or (trace and stats.get("other_path_stages")):
            runs.append((row["method"], row["sparsity"], row["seed"], trace))
    return runs


def paths_not_taken(report: dict) -> list:
    """[(method, target sparsity, seed, [(sparsity, loss) per stage])] of the path each 'max' run did not take
    (an adaptive walk that lost stops short of the target)."""
    return [(row["method"], row["sparsity"], row["seed"], _loss_trace(stages)) for row in report["results"]
            for stages in ((row.get("stats") or {}).get("other_path_stages") or {}).values() if _loss_trace(stages)]


def _plot_stages(axes, runs, others) -> None:
    """The loss after each stage against the sparsity it reached: one line per staged run, one colour
    per (method, target); refinement stages at the target are the vertical steps; the paths not taken dashed."""
    colours = {}
    for (method, target, _, trace), dashed in [(run, False) for run in runs] + [(run, True) for run in others]:
        key = (method, target)
        first = key not in colours
        colours.setdefault(key, f"C{len(colours) % 10}")
        sparsities, losses = zip(*trace)
        axes.plot(sparsities, losses, marker=".", color=colours[key], alpha=0.5 if dashed else 0.8,
                  linestyle="--" if dashed else "-", label=f"{method} to {label(target)}" if first else None)
    axes.set(xlabel="sparsity after the stage", ylabel="held-out (else calibration) loss", yscale="log",
             title="stages (dashed: the path not taken)" if others else "stages")
    axes.legend(fontsize="small")


def plot(report: dict, path, overwrite: bool = False) -> None:
    """Accuracy versus sparsity, one line per method, and beside it each staged run's calibration loss after every
    stage against the sparsity reached (needs the 'plot' extra: matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(report)
    sparsities = report["settings"]["sparsities"]
    runs, others, allocated = staged_runs(report), paths_not_taken(report), allocated_runs(report)
    staged = bool(runs or others)
    count = 1 + staged + bool(allocated)
    figure, panels = plt.subplots(1, count, figsize=(6.5 * count, 4.5), squeeze=False)
    axes = panels[0][0]
    numeric = all(isinstance(s, (int, float)) for s in sparsities)
    positions = sparsities if numeric else list(range(len(sparsities)))
    for method in row_labels(report):
        means = [summary[(method, s)][0] for s in sparsities]
        stds = [summary[(method, s)][1] for s in sparsities]
        axes.errorbar(positions, means, yerr=stds, marker="o", capsize=3, label=method)
    metric = metric_of(report)
    axes.axhline(report[f"dense_{metric}"], color="grey", linestyle=":", label="dense")
    if not numeric:
        axes.set_xticks(positions, [label(s) for s in sparsities])
    if metric == "perplexity":
        axes.set_yscale("log")
    axes.set(xlabel="sparsity or pattern", ylabel="test accuracy (%)" if metric == "accuracy" else metric,
             title=f"{report['model']} / {report['dataset'].split(' (')[0]}")
    axes.legend()
    if staged:
        _plot_stages(panels[0][1], runs, others)
    if allocated:
        axes = panels[0][-1]
        for name, sparsities_by_layer in allocated:
            axes.plot(range(len(sparsities_by_layer)), list(sparsities_by_layer.values()), marker=".", label=name)
        axes.set(xlabel="pruned layer, in model order", ylabel="sparsity", title="per-layer sparsities chosen")
        axes.legend()
    figure.tight_layout()
    with atomic_path(path, overwrite) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def allocated_runs(report: dict) -> list:
    """[(row label at its sparsity, {layer: sparsity})] of the runs whose allocation chose per-layer sparsities."""
    return [(f"{row_label(row)} at {label(row['sparsity'])}", row["settings"]["layer_sparsities"])
            for row in report["results"] if row.get("allocation", "uniform") != "uniform"
            and (row.get("settings") or {}).get("layer_sparsities")]
