"""Issue 25's cost against size: seconds and peak resident memory of layer-wise prunes of Llama-architecture models of
about 135M, 360M and 1.1B parameters (SmolLM2-135M's, SmolLM2-360M's and TinyLlama-1.1B's shapes), built with
random weights in bfloat16, on a fixed small calibration set of random tokens. A cost-only measurement: perplexity
means nothing on random weights, and none is reported. Each run is its own process (a fresh peak-memory window);
`--fit` fits seconds = a * params * hidden + b * params over the rows and projects 7B and 70B models.

    .venv/bin/python benchmarks/cost_vs_size.py run 135M sparsegpt 2:4 --json bench/cost_size/135M_sparsegpt.json
    .venv/bin/python benchmarks/cost_vs_size.py fit bench/cost_size/*.json --json bench/cost_vs_size.json
"""
import argparse
import json
import time
from pathlib import Path

import torch

from brainsurgeon.atomic import write_text
from brainsurgeon.bench import peak_memory_bytes, reset_peak_memory, split_pattern

SHAPES = {  # hidden, intermediate, layers, heads, key-value heads, vocabulary: the published configs
    "135M": (576, 1536, 30, 9, 3, 49152),
    "360M": (960, 2560, 32, 15, 5, 49152),
    "1.1B": (2048, 5632, 22, 32, 4, 32000),
}
PROJECTED = {"7B": (6.74e9, 4096), "70B": (68.98e9, 8192)}  # Llama-2-7B and 70B: parameters, hidden size
CALIBRATION = (16, 256)  # windows x tokens, the same for every size


def build(size: str, dtype=torch.bfloat16):
    import transformers

    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[size]
    config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                                      num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
                                      max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in the storage dtype: no float32 copy ever exists
    try:
        return transformers.LlamaForCausalLM(config).eval(), config
    finally:
        torch.set_default_dtype(previous)


def run(size: str, method: str, pattern: str, json_path: str) -> None:
    from brainsurgeon import prune_layerwise

    model, config = build(size)
    calibration = torch.randint(0, config.vocab_size, CALIBRATION, generator=torch.Generator().manual_seed(0))
    sparsity, kind = split_pattern(pattern if ":" in pattern else float(pattern))
    storage = sum(value.numel() * value.element_size() for value in model.state_dict().values())
    block = sum(value.numel() * value.element_size() for value in model.model.layers[0].state_dict().values())
    reset_peak_memory()
    before = peak_memory_bytes()
    started = time.perf_counter()
    result = prune_layerwise(model, calibration, sparsity, method, pattern=kind, in_place=True, progress=False)
    seconds = time.perf_counter() - started
    row = dict(size=size, method=method, pattern=pattern, parameters=sum(p.numel() for p in model.parameters()),
               hidden=config.hidden_size, layers=config.num_hidden_layers, dtype="bfloat16",
               calibration=list(CALIBRATION), seconds=seconds, timings=result.timings, threads=torch.get_num_threads(),
               storage_bytes=storage, block_bytes=block, rss_before_prune_bytes=before,
               peak_rss_bytes=peak_memory_bytes())
    write_text(json_path, json.dumps(row, indent=1) + "\n", overwrite=True)
    print(f"{size} {method} {pattern}: {seconds:.0f} s, peak {row['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"(storage {storage / 2**30:.2f} GiB)")


def fit(paths: list, json_path: str) -> None:
    rows = [json.loads(Path(path).read_text()) for path in paths]
    models = {}
    for method in sorted({row["method"] for row in rows}):
        mine = [row for row in rows if row["method"] == method]
        design = torch.tensor([[row["parameters"] * row["hidden"], row["parameters"]] for row in mine],
                              dtype=torch.float64)
        seconds = torch.tensor([row["seconds"] for row in mine], dtype=torch.float64)
        scale = design.abs().max(0).values
        coefficients = torch.linalg.lstsq(design / scale, seconds.unsqueeze(1)).solution.squeeze(1) / scale
        predicted = design @ coefficients
        models[method] = dict(a_per_param_hidden=float(coefficients[0]), b_per_param=float(coefficients[1]),
                              fitted=[dict(size=row["size"], seconds=row["seconds"], model=float(p))
                                      for row, p in zip(mine, predicted)],
                              projected_cpu_seconds={name: float(coefficients[0] * params * hidden
                                                                 + coefficients[1] * params)
                                                     for name, (params, hidden) in PROJECTED.items()})
    report = dict(rows=rows, cost_models=models, note=(
        "Cost only: random weights and random calibration tokens, so no perplexity. seconds = a * params * hidden "
        "+ b * params is fitted by least squares: a covers the solves (each layer's products with its d x d H), "
        "b the calibration forwards and propagation, for this calibration set's size."))
    write_text(json_path, json.dumps(report, indent=1) + "\n", overwrite=True)
    for method, model in models.items():
        print(method, {name: f"{seconds / 3600:.1f} h" for name, seconds in model["projected_cpu_seconds"].items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("size", choices=sorted(SHAPES))
    one.add_argument("method")
    one.add_argument("pattern")
    one.add_argument("--json", required=True)
    both = sub.add_parser("fit")
    both.add_argument("paths", nargs="+")
    both.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.command == "run":
        run(args.size, args.method, args.pattern, args.json)
    else:
        fit(args.paths, args.json)


if __name__ == "__main__":
    main()
