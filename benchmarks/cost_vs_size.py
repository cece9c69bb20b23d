"""Issue 25's cost against size: seconds and peak resident memory of layer-wise prunes of Llama-architecture models of
about 135M, 360M and 1.1B parameters (SmolLM2-135M's, SmolLM2-360M's and TinyLlama-1.1B's shapes), built with
random weights in bfloat16, on a fixed small calibration set of random tokens. A cost-only measurement: perplexity
means nothing on random weights, and none is reported. Each run is its own process (a fresh peak-memory window);
`fit` fits the seconds of the solves and of the calibration passes to their work over the rows, and projects 7B
and 70B models onto one CPU thread and onto 8 GPUs, with the assumptions in the JSON's note.

    .venv/bin/python benchmarks/cost_vs_size.py run 135M sparsegpt 2:4 --json bench/cost_size/135M_sparsegpt.json
    .venv/bin/python benchmarks/cost_vs_size.py fit bench/cost_size/*.json --json bench/cost_vs_size.json
    .venv/bin/python benchmarks/cost_vs_size.py table bench/cost_vs_size.json bench/cost_size_float32/*.json
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
PROJECTED = {  # Llama-2-7B and Llama-2-70B: hidden, intermediate, layers, heads, key-value heads, vocabulary
    "7B": (4096, 11008, 32, 32, 32, 32000),
    "70B": (8192, 28672, 80, 64, 8, 32000),
}
GPU = dict(name="A100", fp32_flops=19.5e12)  # the projection's assumed device: its fp32 (non-tensor-core) peak
GPUS = 8
# A measured reference for the flop-rate assumption (issue 25's text): llm-compressor's GPTQ, whose per-layer solve
# has SparseGPT's shape, on Llama-3-8B on one GPU.
REFERENCE = dict(what="llm-compressor GPTQ, Llama-3-8B, 1 GPU", seconds=745.0, shape=(4096, 14336, 32, 32, 8, 128256))
CALIBRATION = (16, 256)  # windows x tokens, the same for every size


def build(size: str, dtype=torch.bfloat16, blocks: int | None = None):
    """A random Llama of `size`'s shape, with its first `blocks` decoder blocks only if given (the solves and passes
    are per block, so a shallower model measures the same per-block costs in less time)."""
    import transformers

    hidden, intermediate, layers, heads, kv_heads, vocab = SHAPES[size]
    layers = layers if blocks is None else blocks
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


def gemm_flops(size: int = 2048, repeats: int = 5) -> float:
    """This thread's float32 matrix-multiply rate (flop/s), the best of `repeats`: the yardstick a projection to
    other hardware scales by."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


def run(size: str, method: str, pattern: str, json_path: str, dtype: str = "bfloat16", blocks: int | None = None):
    from brainsurgeon import prune_layerwise

    model, config = build(size, getattr(torch, dtype), blocks)
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
               hidden=config.hidden_size, layers=config.num_hidden_layers, dtype=dtype,
               calibration=list(CALIBRATION), seconds=seconds, timings=result.timings, threads=torch.get_num_threads(),
               storage_bytes=storage, block_bytes=block, rss_before_prune_bytes=before,
               peak_rss_bytes=peak_memory_bytes(), gemm_flops=gemm_flops())
    write_text(json_path, json.dumps(row, indent=1) + "\n", overwrite=True)
    print(f"{size} {method} {pattern}: {seconds:.0f} s, peak {row['peak_rss_bytes'] / 2**30:.2f} GiB "
          f"(storage {storage / 2**30:.2f} GiB)")


def layer_shapes(shape) -> list:
    """(rows, cols) of one Llama block's seven linear layers, for a SHAPES / PROJECTED entry."""
    hidden, intermediate, _, heads, kv_heads, _ = shape
    kv = hidden * kv_heads // heads
    return [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (intermediate, hidden),
            (intermediate, hidden), (hidden, intermediate)]


def solve_units(rows: int, cols: int) -> float:
    """A layer solve's work up to a constant: rows x cols^2 (the row updates) + cols^3 (H's factorisation)."""
    return float(rows * cols**2 + cols**3)


def block_units(shape, tokens: int) -> tuple:
    """(the solves' units per layer, their weights per layer, the calibration's units) of one block: its forward
    passes and the X X^T recorded once per input (q/k/v share one, gate/up another) are tokens x (parameters + sum
    of cols^2)."""
    layers = layer_shapes(shape)
    params = sum(rows * cols for rows, cols in layers)
    recorded = sum(cols**2 for rows, cols in (layers[0], layers[3], layers[4], layers[6]))
    return ([solve_units(rows, cols) for rows, cols in layers], [float(rows * cols) for rows, cols in layers],
            float(tokens * (params + recorded)))


def makespan(costs: list, ranks: int) -> float:
    """Longest-first onto the least loaded rank, as drivers/shared_solves.py splits a block's layers."""
    loads = [0.0] * ranks
    for cost in sorted(costs, reverse=True):
        loads[loads.index(min(loads))] += cost
    return max(loads)


def least_squares(design: list, seconds: list) -> list:
    """Seconds per unit of each column of `design` (rows of units), by least squares without an intercept."""
    design = torch.tensor(design, dtype=torch.float64)
    scale = design.abs().max(0).values
    target = torch.tensor(seconds, dtype=torch.float64).unsqueeze(1)
    return (torch.linalg.lstsq(design / scale, target).solution.squeeze(1) / scale).tolist()


def projection(shape, tokens: int, per_solve: float, per_weight: float, per_pass: float, to_gpu: float) -> dict:
    """Seconds of one model of `shape` on one CPU thread, on one GPU and on GPUS GPUs (fit's note)."""
    solves, weights, passes = block_units(shape, tokens)
    layer_seconds = [per_solve * units + per_weight * count for units, count in zip(solves, weights)]
    blocks = shape[2]
    one_thread = blocks * (sum(layer_seconds) + per_pass * passes)
    return dict(one_cpu_thread_seconds=one_thread, one_gpu_seconds=one_thread * to_gpu,
                gpus_seconds=blocks * to_gpu * (makespan(layer_seconds, GPUS) + per_pass * passes / GPUS),
                gpus_solve_bound=makespan(layer_seconds, GPUS) / sum(layer_seconds))


def fit(paths: list, json_path: str) -> None:
    rows = [row for row in (json.loads(Path(path).read_text()) for path in paths) if row["dtype"] == "bfloat16"]
    tokens = CALIBRATION[0] * CALIBRATION[1]
    models = {}
    for method in sorted({row["method"] for row in rows}):
        mine = sorted((row for row in rows if row["method"] == method), key=lambda row: row["parameters"])
        units = [block_units(SHAPES[row["size"]], tokens) for row in mine]
        solve_design = [[sum(solves) * row["layers"], sum(weights) * row["layers"]]
                        for row, (solves, weights, _) in zip(mine, units)]
        pass_design = [[passes * row["layers"]] for row, (_, _, passes) in zip(mine, units)]
        solve_seconds = [row["timings"]["prune"] for row in mine]
        pass_seconds = [sum(row["timings"][key] for key in ("capture", "hessians", "propagate")) for row in mine]
        per_solve, per_weight = least_squares(solve_design, solve_seconds)
        (per_pass,) = least_squares(pass_design, pass_seconds)
        cpu_flops = min(row["gemm_flops"] for row in mine)
        to_gpu = cpu_flops / GPU["fp32_flops"]
        reference = projection(REFERENCE["shape"], tokens, per_solve, per_weight, per_pass, to_gpu)
        models[method] = dict(
            seconds_per_solve_unit=per_solve, seconds_per_weight=per_weight, seconds_per_pass_unit=per_pass,
            one_thread_gemm_flops=cpu_flops,
            fitted=[dict(size=row["size"], solve_seconds=seconds, solve_model=per_solve * a + per_weight * b,
                         pass_seconds=passes, pass_model=per_pass * c)
                    for row, seconds, (a, b), passes, (c,) in zip(mine, solve_seconds, solve_design, pass_seconds,
                                                                    pass_design)],
            reference=dict(REFERENCE, projected_one_gpu_seconds=reference["one_gpu_seconds"],
                           measured_over_projected=REFERENCE["seconds"] / reference["one_gpu_seconds"]),
            projected={name: projection(shape, tokens, per_solve, per_weight, per_pass, to_gpu)
                       for name, shape in PROJECTED.items()})
    # The reference is GPTQ, whose solve has SparseGPT's shape: its measured/projected factor (how far below its
    # peak a GPU runs such work) is sparsegpt's, and is applied to every method's projection.
    factor_from = "sparsegpt" if "sparsegpt" in models else None
    for method, model in models.items():
        factor = model["reference"]["measured_over_projected"] if factor_from is None else \
            models[factor_from]["reference"]["measured_over_projected"]
        model["reference_factor_applied"] = dict(factor=factor, from_method=factor_from or method)
        for entry in model["projected"].values():  # at the GPU rate the reference measured instead
            entry["gpus_seconds_at_reference_rate"] = entry["gpus_seconds"] * factor
    report = dict(rows=rows, cost_models=models, gpu=GPU, gpus=GPUS, calibration=list(CALIBRATION), note=(
        "Cost only: random weights and random calibration tokens, so no perplexity. Fitted by least squares over "
        "the sizes, without intercepts: the solves' seconds (timings.prune) against the layers' sum of rows x cols^2 "
        "+ cols^3 and their weights, and the calibration's seconds (capture, hessians, propagate) against tokens x "
        "(block parameters + the recorded cols^2). Projections keep this calibration size (16 x 256 tokens). On "
        "GPUs: every second of this CPU thread becomes (its float32 GEMM rate / the GPU's float32 peak) seconds, "
        "i.e. both run the work at the same fraction of their matrix-multiply rate, which small kernels do not "
        "reach on a GPU: a lower bound. `reference` sets it against a measured GPTQ time (measured_over_projected: "
        "how far the lower bound is off there, its calibration size unknown to us; GPTQ's solve has sparsegpt's "
        "shape, so sparsegpt's factor is applied to every method: gpus_seconds_at_reference_rate is each "
        "projection at the rate that reference implies). The calibration splits evenly over the ranks; the solves split by "
        "whole layers, longest first, so a block takes its largest layer's solve at least (gpus_solve_bound: that "
        "makespan over the block's total). The all_reduce of H, weight broadcasts and moving each block to its GPU "
        "(--device: sequential onloading, not measured here, where there is no GPU) are left out. A row with fewer "
        "blocks than its shape (`layers`) was built with only its first blocks: the fit counts its units per block, "
        "so it measures the same per-block costs; its seconds and peak memory are of that shallower model."))
    write_text(json_path, json.dumps(report, indent=1) + "\n", overwrite=True)
    for method, model in models.items():
        print(method, {name: f"{p['one_cpu_thread_seconds'] / 3600:.1f} h on one thread, "
                             f"{p['gpus_seconds']:.0f} to {p['gpus_seconds_at_reference_rate']:.0f} s on {GPUS} "
                             f"{GPU['name']}"
                       for name, p in model["projected"].items()},
              f"reference measured/projected {model['reference']['measured_over_projected']:.1f}x")


def table(json_path: str, float32_paths: list) -> None:
    """The README's tables from the fit's JSON (and float32 rows, set beside the bfloat16 ones of their size)."""
    report = json.loads(Path(json_path).read_text())
    float32 = {row["size"]: row for row in (json.loads(Path(path).read_text()) for path in float32_paths)}
    gib = 2**30
    print("| model | method | seconds (solves) | peak RSS | RSS before the prune | weights stored | largest H |")
    print("|---|---|---|---|---|---|---|")
    rows = sorted(report["rows"], key=lambda row: (list(SHAPES).index(row["size"]), row["method"]))
    for label, row in [(row["size"], row) for row in rows] + [(f"{size}, float32", row) for size, row in float32.items()]:
        if row["layers"] != SHAPES[row["size"]][2]:
            label += f" ({row['layers']} of its {SHAPES[row['size']][2]} blocks)"
        widest = max(cols for _, cols in layer_shapes(SHAPES[row["size"]])) ** 2 * 8
        print(f"| {label} | {row['method']} | {row['seconds']:.0f} ({row['timings']['prune']:.0f}) | "
              f"{row['peak_rss_bytes'] / gib:.2f} GiB | {row['rss_before_prune_bytes'] / gib:.2f} GiB | "
              f"{row['storage_bytes'] / gib:.2f} GiB | {widest / 2**20:.0f} MiB |")
    print()
    print(f"| projection | method | one CPU thread | one {report['gpu']['name']} (lower bound) | "
          f"{report['gpus']} GPUs (lower bound) | {report['gpus']} GPUs at the reference's rate |")
    print("|---|---|---|---|---|---|")
    for method, model in report["cost_models"].items():
        for name, entry in model["projected"].items():
            print(f"| {name} | {method} | {entry['one_cpu_thread_seconds'] / 3600:.1f} h | "
                  f"{entry['one_gpu_seconds']:.0f} s | {entry['gpus_seconds']:.0f} s | "
                  f"{entry['gpus_seconds_at_reference_rate'] / 60:.0f} min |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("run")
    one.add_argument("size", choices=sorted(SHAPES))
    one.add_argument("method")
    one.add_argument("pattern")
    one.add_argument("--json", required=True)
    one.add_argument("--blocks", type=int, help="build only the first BLOCKS decoder blocks (default: the shape's)")
    one.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                     help="the storage dtype (the cost model is fitted on bfloat16 rows)")
    shown = sub.add_parser("table")
    shown.add_argument("json")
    shown.add_argument("float32", nargs="*")
    both = sub.add_parser("fit")
    both.add_argument("paths", nargs="+")
    both.add_argument("--json", required=True)
    args = parser.parse_args()
    if args.command == "run":
        run(args.size, args.method, args.pattern, args.json, args.dtype, args.blocks)
    elif args.command == "table":
        table(args.json, args.float32)
    else:
        fit(args.paths, args.json)


if __name__ == "__main__":
    main()
