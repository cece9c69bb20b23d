"""Structured pruning of SmolLM2-135M's MLP hidden neurons (issue 23, first part): every method at each fraction of
the neurons, on the language-model table's calibration and evaluation windows, with the parameter count and the
forward latency of dense and shrunk measured interleaved in one process.

    .venv/bin/python benchmarks/structured_mlp.py [--fractions 0.3,0.5] [--json bench/smollm2_structured_mlp.json]
    .venv/bin/python benchmarks/structured_mlp.py --table bench/smollm2_structured_mlp.json   # the README table
"""
import argparse
import json
import time

import torch

from brainsurgeon.atomic import write_text
from brainsurgeon.bench_structured import latency
from brainsurgeon.datasets.text import perplexity, split_text, token_windows
from brainsurgeon.drivers.structured import prune_structured
from brainsurgeon.methods.units import SELECTIONS
from brainsurgeon.models.hf import load_causal_lm

FOLDER = "models/SmolLM2-135M-Instruct"


def markdown_table(report: dict) -> str:
    """The README's form of the JSON: a row per method and fraction, perplexity, size and the interleaved speed-up."""
    lines = [f"dense perplexity {report['dense_perplexity']:.2f}, {report['dense_parameters']:,} parameters, "
             f"{report['threads']} threads", "",
             "| fraction of MLP neurons | method | perplexity | parameters | intermediate | speed-up | s/run |",
             "|---|---|---|---|---|---|---|"]
    for row in report["results"]:
        method = row["method"] + ("" if row.get("allocation", "uniform") == "uniform" else f", {row['allocation']}")
        lines.append(f"| {row['fraction']:g} | {method} | {row['perplexity']:.2f} | {row['parameters']:,} | "
                     f"{row['intermediate_size']} | {row['speedup']:.2f}x | {row['seconds']:.0f} |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--table", help="print the README table of this JSON and stop")
    parser.add_argument("--fractions", default="0.3,0.5")
    parser.add_argument("--methods", default=",".join(SELECTIONS))
    parser.add_argument("--allocations", default="uniform")
    parser.add_argument("--calib-seqs", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.table:
        with open(args.table) as handle:
            print(markdown_table(json.load(handle)))
        return
    torch.set_num_threads(2)
    model, tokenizer = load_causal_lm(FOLDER, progress=False)
    evaluation_text, calibration_text = split_text("wiki")
    calibration = token_windows(tokenizer, calibration_text, args.calib_seqs, 512, seed=0)
    evaluation = token_windows(tokenizer, evaluation_text, 32, 512)
    report = dict(model=FOLDER, threads=torch.get_num_threads(), calib_windows=list(calibration.shape),
                  eval_windows=list(evaluation.shape), dense_perplexity=perplexity(model, evaluation),
                  dense_parameters=sum(p.numel() for p in model.parameters()), results=[])
    for fraction in (float(f) for f in args.fractions.split(",")):
        for method, allocation in ((m, a) for a in args.allocations.split(",") for m in args.methods.split(",")):
            started = time.perf_counter()
            result = prune_structured(model, calibration, fraction, method, allocation=allocation, progress=False)
            seconds = time.perf_counter() - started
            timed = latency({"dense": model, "pruned": result.model}, evaluation[:1])
            widths = [after for _, after in result.widths.values()]
            row = dict(method=method, allocation=allocation, fraction=fraction, seconds=seconds,
                       perplexity=perplexity(result.model, evaluation),
                       parameters=sum(p.numel() for p in result.model.parameters()),
                       intermediate_size=min(widths) if len(set(widths)) == 1 else f"{min(widths)}-{max(widths)}",
                       latency_dense=timed["dense"], latency_pruned=timed["pruned"],
                       speedup=timed["dense"] / timed["pruned"],
                       swaps=sum(s.get("swaps", 0) for s in result.stats.values()))
            report["results"].append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                write_text(args.json, json.dumps(report, indent=2) + "\n", overwrite=True)


if __name__ == "__main__":
    main()
