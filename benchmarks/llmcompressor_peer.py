"""The tool users would pick instead, on our windows: llm-compressor's SparseGPTModifier (oneshot) prunes
SmolLM2-135M on the language-model table's 64 x 512 calibration windows, and its perplexity is scored on the same
32 x 512 evaluation windows as ours. It runs in its own virtual environment (`make bench-lm-peers` builds
.venv-peers: llm-compressor pins an older transformers than ours).

    .venv-peers/bin/python benchmarks/llmcompressor_peer.py 0.5,2:4,0.7 --json bench/smollm2_peers.json
"""
import argparse
import json
import logging
import time

from bench_windows import NAME, load_bench_model

from brainsurgeon.atomic import write_text
from brainsurgeon.datasets.text import perplexity

PEER = "llm-compressor sparsegpt"


def prune_with_llmcompressor(model, calibration, setting: str) -> float:
    """Prune `model` in place with SparseGPTModifier at `setting` (a sparsity, or N:M); return the seconds."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier

    structured = ":" in setting
    n, m = (int(part) for part in setting.split(":")) if structured else (0, 0)
    modifier = SparseGPTModifier(sparsity=n / m if structured else float(setting),
                                 mask_structure=setting if structured else "0:0", dampening_frac=0.01,
                                 block_size=128, targets=["Linear"], ignore=["re:.*lm_head"])
    rows = calibration.tolist()
    dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]})
    started = time.perf_counter()
    oneshot(model=model, dataset=dataset, recipe=modifier, num_calibration_samples=len(rows),
            max_seq_length=calibration.shape[1])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("settings", help="comma-separated sparsities or N:M patterns")
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    logging.getLogger("llmcompressor").setLevel(logging.WARNING)
    import llmcompressor

    settings = args.settings.split(",")
    report = None
    for setting in settings:
        model, calibration, evaluation = load_bench_model()  # a fresh dense model each time
        if report is None:  # the bench's report format, so that `brainsurgeon table` merges it with ours
            report = dict(model=NAME, dataset=f"the bench-lm windows; {PEER} {llmcompressor.__version__}",
                          metric="perplexity", dense_perplexity=perplexity(model, evaluation),
                          settings=dict(methods=[PEER], sparsities=[column(s) for s in settings], seeds=[0],
                                        calib_samples=len(calibration), calib_windows=list(calibration.shape),
                                        eval_windows=list(evaluation.shape)),
                          results=[], complete=False)
        seconds = prune_with_llmcompressor(model, calibration, setting)
        row = dict(method=PEER, sparsity=column(setting), seed=0, seconds=seconds,
                   perplexity=perplexity(model, evaluation))
        report["results"].append(row)
        report["complete"] = len(report["results"]) == len(settings)
        write_text(args.json, json.dumps(report, indent=1) + "\n", overwrite=True)
        print(f"{PEER} {setting}: perplexity {row['perplexity']:.2f} in {seconds:.0f} s", flush=True)


def column(setting: str):
    """A bench column: a sparsity as a number, an N:M pattern as text."""
    return setting if ":" in setting else float(setting)


if __name__ == "__main__":
    main()
