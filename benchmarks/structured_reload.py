"""A structured prune written by the command line, reloaded with plain transformers (issue 23): the folder of
`brainsurgeon prune --pattern neurons --allocation uniform` must load with AutoModelForCausalLM alone and score the
perplexity the command reported, on the same evaluation windows.

    .venv/bin/python benchmarks/structured_reload.py [--sparsity 0.4] [--json bench/smollm2_structured_reload.json]
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import transformers

from brainsurgeon.atomic import write_text
from brainsurgeon.datasets.text import perplexity, split_text, token_windows
from brainsurgeon.models.shrunk import WIDTHS_FILE

FOLDER = "models/SmolLM2-135M-Instruct"
EVAL_WINDOWS, SEQ_LEN = 32, 512  # the command line's defaults with --hf-model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sparsity", type=float, default=0.4, help="fraction of the MLP neurons removed")
    parser.add_argument("--method", default="obs")
    parser.add_argument("--json", default="bench/smollm2_structured_reload.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out, report_path = Path(scratch) / "shrunk", Path(scratch) / "report.json"
        command = [sys.executable, "-m", "brainsurgeon.cli", "prune", "--quiet", "--hf-model", FOLDER,
                   "--pattern", "neurons", "--allocation", "uniform", "--method", args.method,
                   "--sparsity", str(args.sparsity), "--out", str(out), "--report", str(report_path)]
        subprocess.run(command, check=True)
        reported = json.loads(report_path.read_text())
        model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        tokenizer = transformers.AutoTokenizer.from_pretrained(out)
        evaluation = token_windows(tokenizer, split_text("wiki")[0], EVAL_WINDOWS, SEQ_LEN)
        reloaded = perplexity(model, evaluation)
        result = dict(command=" ".join(command[1:]), reported_perplexity=reported["perplexity"],
                      reloaded_perplexity=reloaded, relative_difference=abs(reloaded / reported["perplexity"] - 1),
                      width_map_written=(out / WIDTHS_FILE).exists(),
                      intermediate_size=model.config.intermediate_size,
                      parameters=sum(p.numel() for p in model.parameters()))
    write_text(args.json, json.dumps(result, indent=2) + "\n", overwrite=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
