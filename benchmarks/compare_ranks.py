"""Issue 25's same-result and speed-up figures: pairs of `brainsurgeon prune` runs (one process against torchrun
ranks, or float32 against another storage dtype). A run is a pruned folder (--hf-model: its masks.safetensors and
brainsurgeon_report.json), or a vision run's result file X.safetensors with its --report beside it as X.json. For each
pair: the share of weights whose mask (kept or pruned) agrees, the relative difference of perplexity (or test
accuracy), the prune's seconds and their ratio, and each run's peak resident memory during the prune, as JSON.

    .venv/bin/python benchmarks/compare_ranks.py --json bench/smollm2_ranks.json \\
        "sparsegpt 2:4" models/ranks/sparsegpt_24_r1 models/ranks/sparsegpt_24_r2 [more triples]
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from brainsurgeon.atomic import write_text

MASK_SUFFIX = "_mask"  # PruneResult.save's name for a weight's mask


def masks_of(run: Path) -> dict:
    """{weight name: kept} from a folder's masks.safetensors, or from a result file's masks."""
    if run.is_dir():
        return {name: mask.bool() for name, mask in load_file(run / "masks.safetensors").items()}
    return {name.removesuffix(MASK_SUFFIX): mask.bool() for name, mask in load_file(run).items()
            if name.endswith(MASK_SUFFIX)}


def report_of(run: Path) -> dict:
    return json.loads((run / "brainsurgeon_report.json" if run.is_dir() else run.with_suffix(".json")).read_text())


def compare(label: str, first: Path, second: Path) -> dict:
    reports = [report_of(run) for run in (first, second)]
    masks = [masks_of(run) for run in (first, second)]
    metric = "perplexity" if "perplexity" in reports[0] else "accuracy"
    layers = sorted(masks[0])
    agreeing = sum(int((masks[0][name] == masks[1][name]).sum()) for name in layers)
    total = sum(mask.numel() for mask in masks[0].values())
    seconds = [report["timings"]["total"] for report in reports]
    return dict(label=label, runs=[str(first), str(second)],
                ranks=[report["settings"].get("ranks", 1) for report in reports],
                dtype=[report["settings"].get("dtype", "float32") for report in reports],
                mask_agreement=agreeing / total, weights=total,
                **{metric: [report[metric] for report in reports],
                   f"{metric}_relative_difference": abs(reports[1][metric] / reports[0][metric] - 1)},
                prune_seconds=seconds, speed_up=seconds[0] / seconds[1],
                prune_peak_rss_bytes=[report.get("prune_peak_rss_bytes") for report in reports],
                timings=[report["timings"] for report in reports])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("triples", nargs="+", help="label, first run, second run; repeated")
    args = parser.parse_args()
    if len(args.triples) % 3:
        parser.error("give label, first run and second run for each pair")
    rows = [compare(args.triples[i], Path(args.triples[i + 1]), Path(args.triples[i + 2]))
            for i in range(0, len(args.triples), 3)]
    note = ("Masks and scores differ only by the order of floating-point sums (the ranks' partial X X^T are added "
            "in another order than one process adds its batches; the Fisher path's per-sample gradients are the chunks "
            "one process computes, on other ranks); speed-up is the prune's wall time (timings.total), model loading "
            f"and scoring left out; {torch.__version__}")
    write_text(args.json, json.dumps(dict(rows=rows, note=note), indent=1) + "\n", overwrite=True)
    for row in rows:
        metric = "perplexity" if "perplexity" in row else "accuracy"
        print(f"{row['label']}: masks agree on {100 * row['mask_agreement']:.4f}%, {metric} {row[metric][0]:.3f}"
              f" against {row[metric][1]:.3f}, {row['prune_seconds'][0]:.0f} s against "
              f"{row['prune_seconds'][1]:.0f} s ({row['speed_up']:.2f}x)")


if __name__ == "__main__":
    main()
