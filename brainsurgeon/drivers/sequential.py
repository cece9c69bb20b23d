"""The layer-wise driver: prune block by block on |W X - W' X|^2 (OBC, SparseGPT; docs/design.md section 4).

The blocks are the model's repeated layers (the largest nn.ModuleList: a transformer's decoder or encoder layers),
or the whole model as one block when it has none (a CNN). The inputs of the first block are captured with a
forward pre-hook that stops the model there; every later block gets the outputs of the blocks before it *after*
they were pruned. Hooks on each prunable layer of a block accumulate H = X X^T / N from those inputs; each layer
is pruned with its own H; the pruned block is run again to give the next block its inputs. Peak memory is one
block's Hessians and the calibration activations, on top of the model. The model is handed back unchanged.

target='dense' asks each layer to reproduce the *dense* model's output of that layer from the pruned model's
inputs, min |W X_d - W' X_p|^2, instead of SparseGPT's min |W X_p - W' X_p|^2: the errors of the layers before
are then corrected rather than carried on. With H = X_p X_p^T / N and C = X_p X_d^T / N that objective is
(w' - w*)^T H (w' - w*) + const per row, w* = w + H_damped^-1 (C - H) w, so every method runs unchanged on
the target W* (w* = w exactly where the two streams agree). The layers of a block are then pruned one at a
time in order, each from inputs that pass through the layers pruned before it, and a second, dense stream of
activations is carried along (twice the activation memory). docs/decisions.md has what it gains on ResNet20.
"""
import copy
import itertools
import time

import torch
from torch import nn

from .. import distributed, validation
from ..curvature.hessian import DEFAULT_RELATIVE_DAMPING, LayerObjective
from ..errors import BrainSurgeonError, solver_errors_as_one_line
from ..memory import trim_heap
from ..methods.budget import Budget
from ..methods.catalog import LAYER_METHODS, canonical
from ..modes import evaluating
from ..progress import progress_bar
from .activations import (
    HessianRecorder,
    capture_block_inputs,
    cross_products,
    find_blocks,
    input_groups,
    model_calls,
    run_block,
    with_first,
)
from .layers import check_finite_model, find_prunable, storage_dtype
from .owl import owl_allocation
from .packed_masks import PackedMasks
from .placement import (
    Keeping,
    as_float32,
    check_device,
    home_device,
    in_float32,
    onloaded,
    restore,
    to_device,
)
from .reconstruct import dense_targets, plan_reconstruction, reconstruct
from .result import PruneResult
from .search_allocation import searched_allocation
from .shared_solves import SharedSolves

ALLOCATIONS = ("uniform", "owl", "search")
OUTSIDE_BLOCKS = "outside the repeated blocks the layer-wise driver prunes (embeddings, stem, output head stay dense)"


def unsupported_layer(module: nn.Module) -> str | None:
    """Why this driver cannot prune the module (None for a Linear or a Conv2d with groups=1)."""
    if isinstance(module, nn.Linear):
        return None
    if isinstance(module, nn.Conv2d) and module.groups == 1 and isinstance(module.padding, tuple):
        return None
    return f"{type(module).__name__} has no weight-times-input form here (Linear, or Conv2d with groups=1)"


def unprunable_layer(module: nn.Module, layer) -> str | None:
    """Why this driver cannot prune `layer` (a PrunableLayer of `module`), None when it can."""
    masked = layer.tensor != "weight"
    return unsupported_layer(module) or (
        "carries a torch.nn.utils.prune mask; the layer-wise driver prunes plain weights" if masked else None)


@solver_errors_as_one_line
def prune_layerwise(model: nn.Module, calibration, sparsity=None, method: str = "sparsegpt", *, pattern="layer",
                    relative_damping: float = DEFAULT_RELATIVE_DAMPING, blocks=None, include=None, ignore=(),
                    batch_size: int = 8, target: str = "layer", reconstruct: str = "none",
                    reconstruct_epochs: int = None, reconstruct_step: float = None, allocation: str = "uniform",
                    in_place: bool = False, device=None, progress: bool = True, **options) -> PruneResult:
    """Prune every prunable layer of `model`'s blocks on the layer-wise objective, block by block.

    `method`: 'mp', 'wanda', 'sparsegpt', 'admm', 'wf', 'cbs' or 'swaps' (methods/catalog.py). `pattern`:
    'layer' (unstructured, exact count per layer), 'row' (exact count per output row) or 'N:M' such as '2:4'
    (sparsity N/M). `relative_damping`: added to H's diagonal as a fraction of mean(diag H) (the Fisher objective's
    `damping` is an absolute lambda instead). `calibration`: model inputs (a tensor such as
    token ids, batched by `batch_size`, an (inputs, targets) pair, or an iterable of tensors or keyword dicts).
    `target`: 'layer' (each layer keeps its own output on the pruned model's inputs, as SparseGPT) or 'dense'
    (each layer reproduces the dense model's output; module docstring). `reconstruct`: 'none', 'block' (after
    each block is pruned, its kept weights are fitted to the dense block's outputs) or 'sublayer' (each child
    module holding pruned layers, such as attention and MLP, to the dense child's): drivers/reconstruct.py, with
    at most `reconstruct_epochs` passes (default 4) and Adam's step `reconstruct_step` (default 1e-2) times each
    layer's weight RMS; the dense stream is carried as for target='dense'). `allocation`: 'uniform' (`sparsity`
    in every layer), 'owl' (OWL's per-block sparsities from the dense model's outlier ratios, drivers/owl.py) or
    'search' (ours: per-block sparsities from a short evolutionary search judged on held-out calibration windows,
    drivers/search_allocation.py), both with the global count exact, for patterns 'layer' and 'row'. `sparsity`
    may also be a dict {layer name: sparsity} for 'layer' and 'row' patterns. `options` go to the method. The
    model is not modified: call `result.apply(model)`. With `in_place=True` the model's weights are pruned as the
    run goes and the result's weights are the model's own tensors, not copies, so that peak memory is the model, one
    block's work and the masks at a bit per weight; on an error the model is then left part-pruned.

    Weights stored in bfloat16 or float16 stay so (H and the solves are float32). When the default process group
    of torch.distributed is initialised (torchrun; brainsurgeon.distributed.join), every rank must call this with
    the same arguments: each runs its share of the calibration calls and of each block's layer solves
    (drivers/shared_solves.py), and every rank gets the same result.
    """
    world, failure, calls = distributed.world(), None, None
    arguments = dict(sparsity=sparsity, method=method, pattern=pattern, relative_damping=relative_damping,
                     blocks=blocks, include=include, ignore=ignore, batch_size=batch_size, target=target,
                     reconstruct=reconstruct, reconstruct_epochs=reconstruct_epochs,
                     reconstruct_step=reconstruct_step, allocation=allocation, **options)
    try:  # every argument checked before any work, on every rank
        validation.flag("in_place", in_place)
        device, home = check_device(device, world.size), home_device(model)
        refit = plan_reconstruction(reconstruct, reconstruct_epochs, reconstruct_step)
        layer_method, pattern, blocks, per_block, dense = plan_layerwise(
            model, sparsity, pattern, method, relative_damping=relative_damping, blocks=blocks, include=include,
            ignore=ignore, batch_size=batch_size, target=target, **options)
        allocation = check_allocation(allocation, sparsity, pattern)
        if layer_method.needs_hessian or refit.active:
            calls = model_calls(model, calibration, batch_size)
            if len(calls) < world.size:
                raise BrainSurgeonError(f"{len(calls)} calibration batches cannot be shared by {world.size} ranks; "
                                        "pass more calibration data (--calib-seqs) or a smaller batch_size")
    except BrainSurgeonError as error:
        failure = error
    tensors = [value for args, kwargs in calls or () for value in (*args, *kwargs.values())]
    distributed.agree(failure, distributed.fingerprint(arguments, model, tensors))
    solves = SharedSolves(world)
    chose = time.perf_counter()
    allocation_figures = None
    if allocation == "owl":
        sparsity = owl_allocation(model, calibration, pattern.sparsity, per_block, blocks, batch_size=batch_size)
    elif allocation == "search":
        sparsity, allocation_figures = searched_allocation(model, calibration, pattern.sparsity, per_block, blocks,
                                                           batch_size=batch_size, progress=progress)
    if allocation != "uniform":
        layer_method, pattern, blocks, per_block, dense = plan_layerwise(
            model, sparsity, pattern.kind, method, relative_damping=relative_damping, blocks=[n for n, _ in blocks],
            include=include, ignore=ignore, batch_size=batch_size, target=target, **options)
    to_dense = target == "dense" and layer_method.needs_hessian
    per_layer = isinstance(sparsity, dict)
    pattern_name = f"{pattern.kind} (per layer)" if per_layer else pattern.name
    # share: waiting for, and receiving, the layers other ranks solved (torch.distributed)
    timings = {"allocation": time.perf_counter() - chose, "capture": 0.0, "hessians": 0.0, "prune": 0.0,
               "reconstruct": 0.0, "propagate": 0.0, "share": 0.0}
    stats, masks, refits = {}, PackedMasks(), {}
    keeping = Keeping(in_place, home)
    mark = time.perf_counter()
    with torch.no_grad(), evaluating(model):
        inputs = dense_inputs = None
        if calls is not None:  # each rank runs its own shard of the calls
            inputs = to_device(capture_block_inputs(model, blocks[0][1], world.shard(calls)), device)
            dense_inputs = inputs if to_dense or refit.active else None
        timings["capture"] = time.perf_counter() - mark
        bar = progress_bar(blocks, f"{layer_method.name} {pattern_name}", progress)
        for (block_name, block), layers in zip(bar, per_block):
            run = _prune_block_to_dense if to_dense else _prune_block
            with onloaded(block, device, home):
                inputs, dense_inputs = run(block, layers, inputs, dense_inputs, layer_method, relative_damping,
                                           timings, stats, masks, keeping, (refit, refits, block_name), solves)
            for _, full_name, _ in layers:  # the result's masks live with the model
                masks[f"{full_name}.weight"] = masks[f"{full_name}.weight"].to(home)
            trim_heap()  # the block's activations and solves, freed: resident memory follows what is live
    timings["total"] = time.perf_counter() - chose
    settings = dict(objective="layer", method=layer_method.name, pattern=pattern_name,
                    sparsity=_fraction_pruned(masks) if per_layer else pattern.sparsity, target=target,
                    allocation=allocation,
                    layer_sparsities=dict(sparsity) if per_layer else None, relative_damping=relative_damping,
                    blocks=[name for name, _ in blocks], layers=list(masks), **refit.settings(),
                    num_calls=None if calls is None else len(calls), batch_size=batch_size, ranks=world.size,
                    dtype=str(storage_dtype(model)).removeprefix("torch."), device=str(device or home),
                    **layer_method.settings())
    return PruneResult(masks=masks, weights=keeping.weights(), settings=settings, timings=timings,
                       stats={"layers": stats, **({"reconstruction": refits} if refit.active else {}),
                              **({"allocation": allocation_figures} if allocation_figures else {})},
                       dense_layers=dense)


def check_allocation(allocation: str, sparsity, pattern: Budget) -> str:
    """`allocation` if it can run with this sparsity and (parsed) pattern: a data-chosen allocation sets each
    layer's own count, so it takes one sparsity and a per-layer or per-row pattern."""
    validation.choice("allocation", allocation, ALLOCATIONS)
    if allocation != "uniform" and (isinstance(sparsity, dict) or pattern.kind == "nm"):
        given = "a dict" if isinstance(sparsity, dict) else pattern.name
        raise BrainSurgeonError(f"allocation '{allocation}' chooses each layer's sparsity; pass one sparsity with "
                                f"pattern 'layer' or 'row', not {given}")
    return allocation


def _fraction_pruned(masks: dict) -> float:
    return sum(int((~mask).sum()) for mask in masks.values()) / sum(mask.numel() for mask in masks.values())


def plan_layerwise(model, sparsity, pattern, method, *, relative_damping=DEFAULT_RELATIVE_DAMPING, blocks=None,
                   include=None, ignore=(), batch_size=8, target="layer", **options):
    """Every argument of prune_layerwise checked against the model before any work: (method, pattern, blocks,
    the layers to prune per block as (module name, full name, pattern), the dense layers with reasons)."""
    if "damping" in options:
        raise BrainSurgeonError("the layer-wise objective takes relative_damping (a fraction of mean(diag H), default "
                                f"{DEFAULT_RELATIVE_DAMPING}), not damping (the Fisher objective's absolute lambda); "
                                "pass relative_damping")
    named = canonical(method, "layer") if isinstance(method, str) else None
    if named not in LAYER_METHODS:
        raise BrainSurgeonError(f"unknown layer-wise method {method!r}; choose from {sorted(LAYER_METHODS)}")
    method = named
    layer_method = LAYER_METHODS[method](**options)  # refuses an option the method does not declare
    per_layer = sparsity if isinstance(sparsity, dict) else None
    if pattern == "global":
        raise BrainSurgeonError("pattern 'global' is the Fisher objective's: the layer-wise objective prunes each layer "
                                "to its own count; pass pattern='layer', or a dict of per-layer sparsities")
    pattern = Budget.parse(pattern, 0.5 if per_layer else sparsity)
    if per_layer is not None:
        if pattern.kind == "nm":
            raise BrainSurgeonError("per-layer sparsities go with the 'layer' or 'row' pattern; N:M fixes its own")
        per_layer = {name: Budget(pattern.kind, validation.sparsity(value, f"sparsity of {name}"))
                     for name, value in per_layer.items()}
    validation.choice("target", target, ("layer", "dense"))
    validation.positive("relative_damping", relative_damping)
    validation.count("batch_size", batch_size)
    include, ignore = validation.patterns("include", include) or None, validation.patterns("ignore", ignore)
    check_finite_model(model)
    blocks = find_blocks(model, blocks)
    in_blocks = {f"{name}.{sub}".strip(".") for name, block in blocks for sub, _ in block.named_modules()}
    dense = {name: OUTSIDE_BLOCKS for name, module in model.named_modules()
             if isinstance(getattr(module, "weight", None), torch.Tensor) and name not in in_blocks}
    per_block = []
    for block_name, block in blocks:
        layers, block_dense = find_prunable(block, include, ignore)
        modules = dict(block.named_modules())
        kept = []
        for layer in layers:
            full_name = f"{block_name}.{layer.module}".strip(".")
            why = unprunable_layer(modules[layer.module], layer)
            if why:
                dense[full_name] = why
                continue
            weight = modules[layer.module].weight
            layer_pattern = pattern if per_layer is None else per_layer.pop(full_name, None)
            if layer_pattern is None:
                raise BrainSurgeonError(f"per-layer sparsities name no sparsity for {full_name}; give every "
                                        "pruned layer one")
            layer_pattern.check_shape(weight.shape[0], weight[0].numel(), full_name)
            kept.append((layer.module, full_name, layer_pattern))
        dense.update({f"{block_name}.{name}".strip("."): why for name, why in block_dense.items()})
        per_block.append(kept)
    if not any(per_block):
        raise BrainSurgeonError("no prunable layers inside the blocks; pass include=[...] or blocks=[...]")
    if per_layer:
        raise BrainSurgeonError(f"per-layer sparsities name layers that are not pruned: {sorted(per_layer)}")
    return layer_method, pattern, blocks, per_block, dense


def _prune_block(block, layers, inputs, dense_inputs, layer_method, relative_damping, timings, stats, masks, keeping,
                 reconstruction, solves):
    """Prune one block's layers from its (already pruned-upstream) inputs; return the next block's inputs (and,
    when reconstructing, the dense stream's)."""
    modules = dict(block.named_modules())
    mark = time.perf_counter()
    dense_outputs = targets = None
    if reconstruction[0].active:  # the block is still dense
        dense_outputs, targets = dense_targets(block, dense_inputs, reconstruction[0], [name for name, *_ in layers])
    timings["propagate"] += time.perf_counter() - mark
    mark = time.perf_counter()
    recorder = None
    if inputs is not None:
        recorder = HessianRecorder({name: modules[name] for name, _, _ in layers})
        try:
            run_block(block, inputs)
        finally:
            recorder.close()
        recorder.sum_across_ranks()
    timings["hessians"] += time.perf_counter() - mark
    originals = {}
    try:
        owners = solves.owners(layers, modules)
        for (name, full_name, pattern), owner in zip(layers, owners):
            weight = modules[name].weight
            keeping.remember(originals, name, weight)
            if owner != solves.world.rank:
                continue
            hessian = (recorder.take_hessian(name) if recorder
                       else torch.eye(weight[0].numel(), dtype=torch.float64, device=weight.device))
            objective = LayerObjective(weight, hessian, relative_damping)
            del hessian  # the objective's damped copy is the only d x d one left while the layer is solved
            _prune_layer(modules[name], full_name, objective, recorder is not None, layer_method, pattern, timings,
                         stats, masks)
            del objective
        mark = time.perf_counter()
        solves.share(layers, owners, modules, masks, stats)
        timings["share"] += time.perf_counter() - mark
        _reconstruct(block, layers, inputs, targets, reconstruction, timings, masks)
        keeping.keep(modules, layers)
        mark = time.perf_counter()
        next_inputs = None if inputs is None else with_first(inputs, run_block(block, inputs))
        timings["propagate"] += time.perf_counter() - mark
    finally:  # the caller's model comes back unchanged, whatever happened
        restore(modules, originals)
    return next_inputs, None if dense_outputs is None else with_first(dense_inputs, dense_outputs)


def _prune_block_to_dense(block, layers, inputs, dense_inputs, layer_method, relative_damping, timings, stats, masks,
                          keeping, reconstruction, solves):
    """target='dense': prune the block's layers one at a time, each towards the dense block's output of that layer
    (module docstring); return the next block's pruned and dense inputs."""
    modules = dict(block.named_modules())
    dense_block = copy.deepcopy(block)
    originals = {}
    try:
        groups = input_groups(block, [name for name, *_ in layers], inputs[0])
        # in turn, each group of layers fed one tensor from the layers pruned before it; within a group the
        # layers are independent (their input exists before any of them runs) and are shared among the ranks
        for _, group in itertools.groupby(layers, key=lambda layer: groups[layer[0]]):
            group = list(group)
            mark = time.perf_counter()
            hessian, cross = cross_products(block, dense_block, group[0][0], inputs, dense_inputs)
            timings["hessians"] += time.perf_counter() - mark
            owners = solves.owners(group, modules)
            for (name, full_name, pattern), owner in zip(group, owners):
                keeping.remember(originals, name, modules[name].weight)
                if owner == solves.world.rank:
                    objective = LayerObjective.reproducing(modules[name].weight, hessian, cross, relative_damping)
                    _prune_layer(modules[name], full_name, objective, True, layer_method, pattern, timings, stats,
                                 masks)
            mark = time.perf_counter()
            solves.share(group, owners, modules, masks, stats)
            timings["share"] += time.perf_counter() - mark
        mark = time.perf_counter()
        dense_outputs, targets = dense_targets(dense_block, dense_inputs, reconstruction[0],
                                               [name for name, *_ in layers])
        timings["propagate"] += time.perf_counter() - mark
        _reconstruct(block, layers, inputs, targets, reconstruction, timings, masks)
        keeping.keep(modules, layers)
        mark = time.perf_counter()
        next_inputs = with_first(inputs, run_block(block, inputs))
        next_dense = with_first(dense_inputs, dense_outputs)
        timings["propagate"] += time.perf_counter() - mark
    finally:
        restore(modules, originals)
    return next_inputs, next_dense


def _reconstruct(block, layers, inputs, targets, reconstruction, timings, masks) -> None:
    """With a Reconstruction that is active, fit the block's pruned weights to `targets` (dense_targets: the
    dense block's outputs, or its sub-layers') in their modules, and record the fit's figures."""
    plan, refits, block_name = reconstruction
    if not plan.active:
        return
    keep = {name: masks[f"{full_name}.weight"] for name, full_name, _ in layers}
    with in_float32(block):  # Adam's steps on float32 weights; a bfloat16 block's are rounded back afterwards
        refits[block_name] = reconstruct(block, keep, as_float32(inputs), as_float32(targets), plan)
    timings["reconstruct"] += refits[block_name]["seconds"]


def _prune_layer(module, full_name, objective, has_hessian, layer_method, pattern, timings, stats, masks):
    """Prune one layer and write the result into the module, so that the block's outputs are the pruned ones."""
    mark = time.perf_counter()
    shape = module.weight.shape
    pruned, new = layer_method.prune(objective, pattern)
    module.weight.copy_(new.reshape(shape))  # rounded to the weights' storage dtype, if not float32
    masks[f"{full_name}.weight"] = ~pruned.reshape(shape)
    new = module.weight.detach()
    seconds = time.perf_counter() - mark
    timings["prune"] += seconds
    entry = {"seconds": seconds}
    if has_hessian:
        nothing_kept = torch.zeros(objective.shape, device=new.device)
        entry.update(error=objective.error(new), dense_output=objective.error(nothing_kept))
    stats[full_name] = {**entry, **getattr(layer_method, "last_stats", {})}
