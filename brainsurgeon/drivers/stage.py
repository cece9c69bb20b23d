"""One stage of a prune on the Fisher objective: per-sample gradients at the model's current weights, a selection
and an update, as a PruneResult (the core every staged, walked or refined run repeats)."""
import sys
import time
import warnings
from collections import deque
from contextlib import ExitStack

import torch
from torch.func import functional_call

from ..curvature.fisher import (
    MAX_CHUNK_SIZE,
    EmpiricalFisher,
    choose_gradient_store,
    memory_need,
    per_sample_gradient_chunks,
)
from ..curvature.gradient_store import (
    DiskGradients,
    InMemoryGradients,
    scratch_directory,
)
from ..errors import BrainSurgeonError, FewSamplesWarning
from ..methods.budget import Budget
from ..methods.problem import PruningProblem, best_candidate
from ..modes import evaluating
from .layers import find_prunable, flat_weights
from .registry import build_methods
from .result import PruneResult

DEFAULT_DAMPING = 1e-3
GIB = 1024**3
DEFAULT_MAX_MEMORY = 8 * GIB  # what a run may use when the caller does not say


def default_chunk_size(num_weights: int, max_memory: float) -> int:
    """Samples per vmap chunk: up to MAX_CHUNK_SIZE, with the chunk's gradients (held twice) in 1/8 of the budget."""
    return int(max(1, min(MAX_CHUNK_SIZE, max_memory // (8 * 2 * num_weights * 4))))


def fisher_regions(layers, structure: str):
    """Contiguous weight regions of the Fisher blocks: 'full' (one), 'layer', or 'block:K' (<= K per block)."""
    if not isinstance(structure, str):
        raise BrainSurgeonError(f"structure must be 'full', 'layer' or 'block:K', got {structure!r}")
    if structure == "full":
        return [slice(0, sum(layer.size for layer in layers))]
    if structure == "layer":
        return [layer.slice for layer in layers]
    kind, _, size = structure.partition(":")
    if kind == "block" and size.isdigit() and int(size) > 0:
        size = int(size)
        return [slice(start, min(start + size, layer.slice.stop))
                for layer in layers for start in range(layer.offset, layer.slice.stop, size)]
    raise BrainSurgeonError(f"unknown Fisher structure '{structure}'; use 'full', 'layer' or 'block:K' (K > 0)")


def fitting_structure(layers, num_samples: int, gradients: str, max_memory: float, chunk_size: int) -> tuple:
    """structure=None: (one Fisher block over every weight, 'full', where its gradients fit `max_memory`, else one
    block per layer, 'layer', which may stream from disk; why, or None when 'full' fits)."""
    full = fisher_regions(layers, "full")
    modes = (False, True) if gradients == "auto" else (gradients == "disk",)
    need = min(memory_need(num_samples, full, streamed, chunk_size) for streamed in modes)
    if need <= max_memory:
        return "full", None
    return "layer", (f"one Fisher block per layer: the full Fisher's {num_samples} gradients need about "
                     f"{need / GIB:.1f} GiB, above max_memory {max_memory / GIB:.1f} GiB")


def samples_that_fit(layers, wanted: int, max_memory: float, chunk_size: int | None = None) -> int:
    """The most per-sample gradients, at most `wanted`, whose Fisher fits `max_memory` with one block per layer
    streamed from disk (the leanest store); at least 1."""
    regions = fisher_regions(layers, "layer")
    chunk_size = chunk_size or default_chunk_size(sum(layer.size for layer in layers), max_memory)
    low, high = 1, wanted
    while low < high:  # memory_need grows with the samples
        middle = (low + high + 1) // 2
        if memory_need(middle, regions, True, chunk_size) <= max_memory:
            low = middle
        else:
            high = middle - 1
    return low


def calibration_loss_fn(model, layers, inputs, targets, loss_fn, batch_size=128):
    """Return calibration_loss(flat): mean calibration loss with the prunable weights set to `flat`.

    Small batches keep a conv net's activations in cache: ResNet20 on 1,000 CIFAR images took 0.63 s in
    batches of 128 against 1.57 s in one batch (MLPNet is as fast either way). The last few losses are
    remembered: the driver scores each candidate's update, whose loss CBS-U's damping walk has just
    computed (it is at most 3 evaluations back: the best lam, the next one, no compensation)."""
    params = dict(model.named_parameters())
    state = {**{k: v.detach() for k, v in params.items()}, **dict(model.named_buffers())}
    recent = deque(maxlen=3)  # (flat, loss)

    def calibration_loss(flat: torch.Tensor) -> float:
        for seen, loss in recent:
            if torch.equal(seen, flat):
                return loss
        weights = {layer.param: layer.scatter(flat[layer.slice]) for layer in layers}
        total = 0.0
        with torch.no_grad(), evaluating(model):
            for start in range(0, len(inputs), batch_size):
                out = functional_call(model, {**state, **weights}, (inputs[start : start + batch_size],))
                total += float(loss_fn(out, targets[start : start + batch_size])) * len(out)
        recent.append((flat.clone(), total / len(inputs)))
        return recent[-1][1]

    return calibration_loss


def gradient_store(chunks, num_weights: int, num_samples: int, streamed: bool, scratch_dir, cleanup: ExitStack):
    """Collect the gradient chunks in memory, or in a scratch file that `cleanup` removes."""
    if not streamed:
        return InMemoryGradients.from_chunks(chunks, num_weights, num_samples)
    scratch = cleanup.enter_context(scratch_directory(scratch_dir))
    store = DiskGradients.from_chunks(chunks, num_weights, num_samples, scratch)
    cleanup.callback(store.close)
    return store


FEW_SAMPLES = 32  # below this many gradients the empirical Fisher is little more than its damping


def warn_if_few(num_samples: int) -> None:
    if num_samples < FEW_SAMPLES:
        warnings.warn(f"only {num_samples} calibration samples for a Fisher method: its curvature has rank "
                      f"{num_samples} at most; pass at least {FEW_SAMPLES} (the paper used 1,000-10,000)",
                      FewSamplesWarning, stacklevel=4)


def prune_stage(model, calibration, sparsity, selection_name, update_name, *, loss_fn, damping,
                 include, ignore, pattern, structure, gradients, scratch_dir, seed, max_memory, chunk_size, progress,
                 first_order, options) -> PruneResult:
    """One selection and update from the model's current weights, on the collected (inputs, targets)."""
    selection, update = build_methods(selection_name, update_name, options)
    layers, dense_layers = find_prunable(model, include, ignore)
    segments = Budget.parse(pattern, sparsity).segments_over(layers)
    num_weights = sum(layer.size for layer in layers)
    chunk_size = chunk_size or default_chunk_size(num_weights, max_memory)
    needs_fisher = selection.needs_fisher or update.needs_fisher
    timings, start = {}, time.perf_counter()

    inputs = targets = None
    chosen_structure = None
    if needs_fisher or selection.needs_loss or update.needs_loss:
        if calibration is None:
            raise BrainSurgeonError(f"{selection_name}+{update_name} needs calibration data; pass (inputs, targets)")
        inputs, targets = calibration
        if needs_fisher and structure is None:
            structure, chosen_structure = fitting_structure(layers, len(inputs), gradients, max_memory, chunk_size)
            if chosen_structure and progress:
                print(f"brainsurgeon: chose structure='layer': {chosen_structure}", file=sys.stderr, flush=True)
    structure = structure or "full"
    regions = fisher_regions(layers, structure)
    if inputs is not None:
        if needs_fisher:
            warn_if_few(len(inputs))
            streamed = choose_gradient_store(gradients, len(inputs), regions, max_memory, chunk_size)
    problem = PruningProblem(weights=flat_weights(model, layers).float(), segments=segments,
                             generator=torch.Generator().manual_seed(seed), show_progress=progress)
    if inputs is not None:
        problem.calibration_loss = calibration_loss_fn(model, layers, inputs, targets, loss_fn)
    with ExitStack() as cleanup:
        if needs_fisher:
            chunks = per_sample_gradient_chunks(model, layers, inputs, targets, loss_fn, chunk_size, progress)
            store = gradient_store(chunks, num_weights, len(inputs), streamed, scratch_dir, cleanup)
            problem.curvature = EmpiricalFisher(store, damping, regions, first_order)
            timings["gradients"] = time.perf_counter() - start

        mark = time.perf_counter()
        candidates = selection.select(problem)
        timings["selection"] = time.perf_counter() - mark
        mark = time.perf_counter()
        pruned, delta = best_candidate(problem, update, candidates)
        timings["update"] = time.perf_counter() - mark
        if needs_fisher:
            selection_objective = problem.curvature.quadratic(problem.weights * pruned)
            predicted_loss_increase = problem.curvature.predicted_change(delta)
    timings["total"] = time.perf_counter() - start

    new_flat = problem.weights + delta
    new_flat[pruned] = 0.0  # exact zeros whatever the arithmetic
    settings = dict(method=f"{selection_name}+{update_name}", selection=selection_name, update=update_name,
                    sparsity=sparsity, pattern=pattern, structure=structure, seed=seed,
                    **({"structure_chosen": chosen_structure} if chosen_structure else {}),
                    gradients=("disk" if streamed else "memory") if needs_fisher else None,
                    damping=damping if needs_fisher else None, first_order=first_order if needs_fisher else None,
                    num_samples=None if inputs is None else len(inputs), layers=[layer.name for layer in layers],
                    stages=1, **selection.settings(), **update.settings())
    result = PruneResult(
        masks={layer.name: layer.scatter(~pruned[layer.slice], fill=False) for layer in layers},
        weights={layer.name: layer.scatter(new_flat[layer.slice]).clone() for layer in layers},
        settings=settings, timings=timings, stats=problem.stats, dense_layers=dense_layers,
    )
    if needs_fisher:
        result.selection_objective, result.predicted_loss_increase = selection_objective, predicted_loss_increase
    return result
