"""A prefix probe of block-level choices (issue 24; docs/decisions.md): prune only SmolLM2-135M's first K blocks,
the others left dense, and score the model's perplexity on the bench's evaluation windows. One run costs about K/30
of a full prune, so choices about the block fit can be compared in minutes.

    .venv/bin/python benchmarks/block_probe.py fit admm 2:4 --blocks 5 --epochs 4 --json out.json
    .venv/bin/python benchmarks/block_probe.py newton admm 2:4 --blocks 5 --json out.json

`fit`: the library's prune with the block fit. `newton`: prune, fit, then step the fitted weights to
W - a G H_damped^-1 (G the block loss's gradient over every weight, pruned ones included; H the layer's X X^T; a
by line search on the held-out pieces), prune again from there and fit again; it prints each block's figures as
it goes. (bench/smollm2_issue24/probe_admm_24_5blocks_gradual_e2x2.json came from a prototype of gradual pruning
inside the block that was not kept.)
"""
import argparse
import json
import time

import torch
from bench_windows import load_bench_model

from brainsurgeon import prune_layerwise
from brainsurgeon.atomic import write_text
from brainsurgeon.bench import split_pattern
from brainsurgeon.curvature.hessian import LayerObjective
from brainsurgeon.datasets.text import perplexity
from brainsurgeon.drivers.activations import (
    HessianRecorder,
    capture_block_inputs,
    model_calls,
    run_block,
    with_first,
)
from brainsurgeon.drivers.reconstruct import (
    Reconstruction,
    block_output,
    dense_targets,
    pieces,
    reconstruct_block,
)
from brainsurgeon.methods.budget import Budget
from brainsurgeon.methods.catalog import LAYER_METHODS
from brainsurgeon.modes import evaluating

LAYERS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
          "mlp.up_proj", "mlp.down_proj"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=("fit", "newton"))
    parser.add_argument("method")
    parser.add_argument("pattern", help="a sparsity (unstructured per layer) or N:M")
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--json", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, calibration, evaluation = load_bench_model()
    started = time.perf_counter()
    if args.mode == "fit":
        sparsity, kind = split_pattern(args.pattern if ":" in args.pattern else float(args.pattern))
        result = prune_layerwise(model, calibration, sparsity, args.method, pattern=kind, progress=False,
                                 blocks=[f"model.layers.{i}" for i in range(args.blocks)], reconstruct="block",
                                 reconstruct_epochs=args.epochs, reconstruct_step=0.01)
        result.apply(model)
        figures = {name: fit["held_out_after"] for name, fit in result.stats["reconstruction"].items()}
    else:
        figures = newton_reprune(model, calibration, args)
    seconds = time.perf_counter() - started
    report = dict(mode=args.mode, method=args.method, pattern=args.pattern, blocks=args.blocks, epochs=args.epochs,
                  perplexity=perplexity(model, evaluation), seconds=seconds, blocks_figures=figures)
    write_text(args.json, json.dumps(report, indent=1) + "\n", overwrite=True)
    print(f"{args.mode} {args.method} {args.pattern}: perplexity {report['perplexity']:.3f} in {seconds:.0f} s")


def newton_reprune(model, calibration, args) -> list:
    budget = Budget.parse(args.pattern) if ":" in args.pattern else Budget.parse("layer", float(args.pattern))
    solver, plan = LAYER_METHODS[args.method](), Reconstruction("block", args.epochs, 1e-2)
    blocks, figures = [model.model.layers[i] for i in range(args.blocks)], []
    with torch.no_grad(), evaluating(model):
        inputs = dense_inputs = capture_block_inputs(model, blocks[0], model_calls(model, calibration, 8))
        for index, block in enumerate(blocks):
            dense_outputs, targets = dense_targets(block, dense_inputs, plan, LAYERS)
            masks = prune(block, solver, budget, hessians(block, inputs))
            first_fit = reconstruct_block(block, masks, inputs, targets, plan)["held_out_after"]
            entry = dict(block=index, first_fit=first_fit)
            weights = {name: block.get_submodule(name).weight for name in LAYERS}
            calls, call_targets = pieces(inputs, targets)
            train, held = (calls[:-4], call_targets[:-4]), (calls[-4:], call_targets[-4:])
            gradients = block_gradients(block, weights, *train)
            layer_hessians = hessians(block, inputs)
            directions = {name: torch.linalg.solve(LayerObjective(w, layer_hessians[name], 0.01).damped,
                                                   gradients[name].double().T).T.float() for name, w in weights.items()}
            fitted = {name: w.detach().clone() for name, w in weights.items()}
            scale = float(torch.stack([f.norm() for f in fitted.values()]).norm()
                          / torch.stack([d.norm() for d in directions.values()]).norm())
            base = error(block, *held)
            best_error, best_step = base, 0.0
            for power in range(-14, 1):
                for name, w in weights.items():
                    w.copy_(fitted[name] - scale * 2.0 ** power * directions[name])
                if error(block, *held) < best_error:
                    best_error, best_step = error(block, *held), scale * 2.0 ** power
            for name, w in weights.items():
                w.copy_(fitted[name] - best_step * directions[name])
            new_masks = prune(block, solver, budget, layer_hessians)
            entry.update(dense_step_error_ratio=best_error / base, step_over_scale=best_step / scale,
                         masks_changed=sum(int((new_masks[n] != masks[n]).sum()) for n in LAYERS)
                         / sum(m.numel() for m in masks.values()),
                         second_fit=reconstruct_block(block, new_masks, inputs, targets, plan)["held_out_after"])
            figures.append(entry)
            print(entry, flush=True)
            inputs, dense_inputs = with_first(inputs, run_block(block, inputs)), with_first(dense_inputs, dense_outputs)
    return figures


def hessians(block, inputs) -> dict:
    recorder = HessianRecorder({name: block.get_submodule(name) for name in LAYERS})
    try:
        run_block(block, inputs)
    finally:
        recorder.close()
    return {name: recorder.take_hessian(name) for name in LAYERS}


def prune(block, solver, budget, layer_hessians) -> dict:
    masks = {}
    for name in LAYERS:
        weight = block.get_submodule(name).weight
        pruned, new = solver.prune(LayerObjective(weight, layer_hessians[name], 0.01), budget)
        weight.copy_(new.reshape(weight.shape))
        masks[name] = ~pruned.reshape(weight.shape)
    return masks


def block_gradients(block, weights, calls, targets) -> dict:
    for w in weights.values():
        w.requires_grad_(True)
    try:
        with torch.enable_grad():
            for call, target in zip(calls, targets):
                ((block_output(block, *call) - target).pow(2).mean() / len(calls)).backward()
        return {name: w.grad.detach().clone() for name, w in weights.items()}
    finally:
        for w in weights.values():
            w.grad = None
            w.requires_grad_(False)


def error(block, calls, targets) -> float:
    return sum(float((block_output(block, *call) - target).double().pow(2).sum())
               for call, target in zip(calls, targets))


if __name__ == "__main__":
    main()
