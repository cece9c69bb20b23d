"""Issue 25's same-result and speed-up figures: pairs of `brainsurgeon prune --hf-model` runs (one process against
torchrun ranks, or float32 against another storage dtype), each a pruned folder and its --report JSON. For each pair:
the share of weights whose mask (kept or pruned) agrees, perplexity's relative difference, the prune's seconds and
their ratio, and each run's peak resident memory during the prune, written as JSON.

    .venv/bin/python benchmarks/compare_ranks.py --json bench/smollm2_ranks.json \\
        "sparsegpt 2:4" models/ranks/sparsegpt_24_r1 models/ranks/sparsegpt_24_r2 [more triples]
"""
import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from brainsurgeon.atomic import write_text


def masks_of(folder: Path) -> dict:
    """{weight name: kept} from the folder's masks.safetensors."""
    return {name: mask.bool() for name, mask in load_file(folder / "masks.safetensors").items()}


def compare(label: str, first: Path, second: Path) -> dict:
    reports = [json.loads((folder / "brainsurgeon_report.json").read_text()) for folder in (first, second)]
    masks = [masks_of(folder) for folder in (first, second)]
    layers = sorted(masks[0])
    agreeing = sum(int((masks[0][name] == masks[1][name]).sum()) for name in layers)
    total = sum(mask.numel() for mask in masks[0].values())
    seconds = [report["timings"]["total"] for report in reports]
    return dict(label=label, runs=[str(first), str(second)],
                ranks=[report["settings"].get("ranks", 1) for report in reports],
                dtype=[report["settings"].get("dtype", "float32") for report in reports],
                mask_agreement=agreeing / total, weights=total,
                perplexity=[report["perplexity"] for report in reports],
                perplexity_relative_difference=abs(reports[1]["perplexity"] / reports[0]["perplexity"] - 1),
                prune_seconds=seconds, speed_up=seconds[0] / seconds[1],
                prune_peak_rss_bytes=[report.get("prune_peak_rss_bytes") for report in reports],
                timings=[report["timings"] for report in reports])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True)
    parser.add_argument("triples", nargs="+", help="label, first folder, second folder; repeated")
    args = parser.parse_args()
    if len(args.triples) % 3:
        parser.error("give label, first folder and second folder for each pair")
    rows = [compare(args.triples[i], Path(args.triples[i + 1]), Path(args.triples[i + 2]))
            for i in range(0, len(args.triples), 3)]
    note = ("Masks and perplexity differ only by the order of floating-point sums (the ranks' partial X X^T are "
            "added in another order than one process adds its batches); speed-up is the prune's wall time (the "
            "driver's timings.total: calibration forwards, H, solves, propagation), model loading and scoring left "
            f"out; {torch.__version__}")
    write_text(args.json, json.dumps(dict(rows=rows, note=note), indent=1) + "\n", overwrite=True)
    for row in rows:
        print(f"{row['label']}: masks agree on {100 * row['mask_agreement']:.4f}%, perplexity {row['perplexity'][0]:.3f}"
              f" against {row['perplexity'][1]:.3f}, {row['prune_seconds'][0]:.0f} s against "
              f"{row['prune_seconds'][1]:.0f} s ({row['speed_up']:.2f}x)")


if __name__ == "__main__":
    main()
