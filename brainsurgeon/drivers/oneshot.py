"""The pruning driver: prune(model, calibration, sparsity, method) -> PruneResult."""
import inspect
import math
import sys
import time
import warnings
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from .. import validation
from ..curvature.fisher import (
    MAX_CHUNK_SIZE,
    EmpiricalFisher,
    choose_gradient_store,
    per_sample_gradient_chunks,
)
from ..curvature.gradient_store import (
    DiskGradients,
    InMemoryGradients,
    scratch_directory,
)
from ..curvature.hessian import DEFAULT_RELATIVE_DAMPING
from ..errors import BrainSurgeonError, FewSamplesWarning, solver_errors_as_one_line
from ..methods.joint import JointSelection
from ..methods.patterns import num_to_prune
from ..methods.problem import PruningProblem, Segment, best_candidate, prune_lowest
from ..methods.selection import SELECTIONS as BASIC_SELECTIONS
from ..methods.update import UPDATES
from .calibration import (
    CalibrationPool,
    check_usable,
    collect,
    is_tensor_pair,
    mean_loss,
    per_sample_losses,
    tensor_pair,
)
from .layers import (
    check_finite_model,
    copy_model,
    evaluating,
    find_prunable,
    flat_weights,
    recalibrate_batchnorm,
)
from .result import PruneResult
from .sequential import prune_layerwise, unprunable_layer

SELECTIONS = {**BASIC_SELECTIONS, JointSelection.name: JointSelection}
DEFAULT_UPDATE = {"mp": "none", "random": "none", "wf": "obs", "cbs": "cbsu", "joint": "cbsu"}
DEFAULT_DAMPING = 1e-3
GIB = 1024**3


def parse_method(method: str):
    """'SELECTION[+UPDATE]' (or a preset's name) -> (selection, update); the update defaults per selection."""
    method = PRESETS.get(method, {}).get("method", method)
    selection, _, update = method.partition("+")
    if selection not in SELECTIONS:
        raise BrainSurgeonError(f"unknown selection '{selection}' in method '{method}'; choose from {sorted(SELECTIONS)}")
    update = update or DEFAULT_UPDATE[selection]
    if update not in UPDATES:
        raise BrainSurgeonError(f"unknown update '{update}' in method '{method}'; choose from {sorted(UPDATES)}")
    return selection, update


def make_segments(layers, sparsity: float, scope: str):
    """The pruning budget: one segment over all layers (global) or one per layer, each to prune round(s * n)
    of its n weights less those a torch.nn.utils.prune mask has pruned already; none may be emptied."""
    if scope == "global":
        groups = [(f"all {sum(l.numel for l in layers)} prunable weights", layers)]
    elif scope == "layer":
        groups = [(f"all {layer.numel} weights of {layer.name}", [layer]) for layer in layers]
    else:
        raise BrainSurgeonError(f"unknown scope '{scope}'; use 'global' or 'layer'")
    segments = []
    for what, members in groups:
        region = slice(members[0].slice.start, members[-1].slice.stop)
        count = num_to_prune(sparsity, sum(l.numel for l in members)) - sum(l.already_pruned for l in members)
        if count >= region.stop - region.start:
            raise BrainSurgeonError(f"sparsity {sparsity} would prune {what}, leaving nothing; "
                                    "lower the sparsity (the exact count is round(s * p))")
        if count < 0:
            raise BrainSurgeonError(f"{what}: masks already prune more than sparsity {sparsity}; ask for at least "
                                    f"{1 - (region.stop - region.start) / sum(l.numel for l in members):.4f}")
        segments.append(Segment(region, count))
    return segments


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


def _option_names(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {"self"}


STAGE_OPTIONS = ("stages", "schedule", "first_order", "first_method", "refine", "later_damping",
                 "later_damping_grid", "bn_recalibration", "layer_start", "fresh_samples")


def _methods_of(method: str) -> set:
    """(selection, update) pairs a method name runs: a preset's first stage may run another method."""
    first_method = PRESETS.get(method, {}).get("first_method")
    return {parse_method(method)} | ({parse_method(first_method)} if first_method else set())


def accepted_options(method: str, options: dict) -> dict:
    """The subset of `options` that the method's selections or updates take, and the stage options any method
    takes (for sweeps over many methods)."""
    names = set(STAGE_OPTIONS).union(*(_option_names(SELECTIONS[sel]) | _option_names(UPDATES[upd])
                                       for sel, upd in _methods_of(method)))
    return {k: v for k, v in options.items() if k in names}


def _check_options(methods, options: dict) -> None:
    """Every option must be taken by the selection or the update of at least one of `methods`."""
    names = set().union(*(_option_names(SELECTIONS[sel]) | _option_names(UPDATES[upd]) for sel, upd in methods))
    unknown = set(options) - names
    if unknown:
        described = ", ".join(f"'{sel}+{upd}'" for sel, upd in sorted(methods))
        raise BrainSurgeonError(f"unknown options {sorted(unknown)} for method {described}")


def _build_methods(selection_name: str, update_name: str, options: dict):
    """Instantiate both methods, each with the options its constructor names."""
    selection_cls, update_cls = SELECTIONS[selection_name], UPDATES[update_name]
    return (selection_cls(**{k: v for k, v in options.items() if k in _option_names(selection_cls)}),
            update_cls(**{k: v for k, v in options.items() if k in _option_names(update_cls)}))


def _gradient_store(chunks, num_weights: int, num_samples: int, streamed: bool, scratch_dir, cleanup: ExitStack):
    """Collect the gradient chunks in memory, or in a scratch file that `cleanup` removes."""
    if not streamed:
        return InMemoryGradients.from_chunks(chunks, num_weights, num_samples)
    scratch = cleanup.enter_context(scratch_directory(scratch_dir))
    store = DiskGradients.from_chunks(chunks, num_weights, num_samples, scratch)
    cleanup.callback(store.close)
    return store


FEW_SAMPLES = 32  # below this many gradients the empirical Fisher is little more than its damping


def _warn_if_few(num_samples: int) -> None:
    if num_samples < FEW_SAMPLES:
        warnings.warn(f"only {num_samples} calibration samples for a Fisher method: its curvature has rank "
                      f"{num_samples} at most; pass at least {FEW_SAMPLES} (the paper used 1,000-10,000)",
                      FewSamplesWarning, stacklevel=4)


def sparsity_schedule(sparsity: float, stages: int = 1, schedule=None) -> list | None:
    """The sparsity after each stage. `schedule` is a list (increasing, ending at `sparsity`); or 'adaptive'
    (None: each stage's size is chosen from the model when it starts, see next_sparsity); or None: `stages` steps
    geometric in density."""
    if schedule == "adaptive":
        return None
    if isinstance(schedule, str):
        raise BrainSurgeonError(f"schedule must be a list of sparsities or 'adaptive', got {schedule!r}")
    if schedule is not None:
        schedule = [validation.sparsity(s, "every sparsity of schedule") for s in schedule]
        if not schedule or schedule[-1] != sparsity or any(b <= a for a, b in zip(schedule, schedule[1:])) \
                or schedule[0] <= 0:
            raise BrainSurgeonError(f"schedule {schedule} must increase strictly from above 0 and end at the "
                                    f"target sparsity {sparsity}, or be 'adaptive'")
        return schedule
    stages = validation.count("stages", stages)
    return [1 - (1 - sparsity) ** (t / stages) for t in range(1, stages)] + [sparsity]


# schedule='adaptive': each stage goes as far as magnitude pruning the current weights (no update) keeps the judged
# loss within STEP_LOSS_RATIO times the current one, searched by bisection in log-density, but at least
# 1/MAX_WALK_STAGES of the log-density from the dense model to the target (CHITA++ ran 16 stages).
STEP_LOSS_RATIO = 1.5
MAX_WALK_STAGES = 16
STEP_BISECTIONS = 6


def magnitude_pruned(flat: torch.Tensor, layers, sparsity: float, scope: str) -> torch.Tensor:
    """`flat` with each segment's smallest weights (by magnitude) zeroed to `sparsity`."""
    pruned = flat.clone()
    pruned[prune_lowest(flat.abs(), make_segments(layers, sparsity, scope))] = 0.0
    return pruned


def next_sparsity(model, layers, judged, reached: float, target: float, loss_fn, scope: str) -> tuple:
    """The adaptive schedule's next stage from sparsity `reached`: (its sparsity, the bound on the loss of the
    magnitude-pruned weights on the `judged` (inputs, targets), that loss at the chosen sparsity)."""
    flat = flat_weights(model, layers).float()
    loss = calibration_loss_fn(model, layers, *judged, loss_fn)
    current = loss(flat)
    bound = current + (STEP_LOSS_RATIO - 1) * abs(current)  # a loss may be negative
    density, final = 1 - reached, 1 - target

    def step(fraction: float) -> tuple:
        sparsity = target if fraction >= 1 else 1 - density * (final / density) ** fraction
        return sparsity, loss(magnitude_pruned(flat, layers, sparsity, scope))

    chosen = step(1.0)
    if chosen[1] <= bound:
        return chosen[0], bound, chosen[1]
    shortest = math.log(final) / MAX_WALK_STAGES / math.log(final / density)  # of the log-density left
    if shortest > 1 - 1e-9:  # the last step (up to rounding)
        return chosen[0], bound, chosen[1]
    low, high = shortest, 1.0
    chosen = step(low)
    if chosen[1] > bound:
        return chosen[0], bound, chosen[1]
    for _ in range(STEP_BISECTIONS):
        middle = step((low + high) / 2)
        if middle[1] <= bound:
            low, chosen = (low + high) / 2, middle
        else:
            high = (low + high) / 2
    return chosen[0], bound, chosen[1]


# refine='auto': with held-out samples, refinement stages (each fitting fresh samples) go on while each leaves the
# held-out loss below that of the unrefined model, REFINE_LIMIT at most; the first that does not is undone and ends
# them. The bar is the unrefined model, not the best stage so far: on MLPNet the held-out loss levels off after 4-6
# stages while the test accuracy and that on the held-out samples go on rising (0.9, seeds 1 and 2, test: 95.1-95.2
# after 4, 95.6-95.7 after 12, 95.8-95.9 after 16), and on ResNet20 the layer path's first or second stage already
# rises above it (without bn_recalibration; with it, all 12 stay below in 5 of 6 runs). 12 keeps MLPNet at 0.98 (7 walk stages, then about 6 s a stage) within 3 minutes. Without
# held-out samples every stage fits the same ones and there is no judge, so REFINE_WITHOUT_HELD_OUT run (more of
# them fitted only the calibration set on MLPNet).
REFINE_LIMIT = 12
REFINE_WITHOUT_HELD_OUT = 2
# Fresh samples are collected for at most POOL_STAGES stages besides the held-out ones: the pool is held in memory,
# and later stages fit random subsets of it, as they do when the data holds fewer (MNIST's 60,000 images).
POOL_STAGES = 24

PRESETS = {
    # The most accurate configuration measured (README), with nothing sized to one model. The Fisher path: cbs
    # with the caller's settings as far as the adaptive schedule's first step goes (to the target when that is
    # mild: it *is* cbs there), then joint stages with the mean gradient modelled, each sized by the adaptive
    # schedule. Their damping x grid starts at cbs's 1e-4 and reaches 10: first-order steps on ResNet20 needed far
    # more damping than 0.1. The layer path: every layer pruned towards the dense model's outputs. The one
    # choose_path keeps at the target (the Fisher path unless the layer path's held-out loss is lower beyond the
    # noise) is refined on fresh samples while that loss stays below the unrefined path's: the Fisher path wins on
    # MLPNet, the layer path on ResNet20 above 0.3 (README).
    "max": dict(method="joint", first_method="cbs", schedule="adaptive", refine="auto", fresh_samples=True,
                first_order=True, layer_start=True,
                later_damping=1e-2, later_damping_grid=(0.01, 0.1, 1.0, 10.0, 100.0, 1000.0), start="mp",
                iht_rounds=1, max_swaps=10),
}


def _check_run_settings(num_samples, chunk_size, max_memory, seed):
    """The numeric settings of a run that no method owns, checked once before any work."""
    return (None if num_samples is None else validation.count("num_samples", num_samples),
            None if chunk_size is None else validation.count("chunk_size", chunk_size),
            validation.positive("max_memory (bytes)", max_memory),
            validation.seed(seed))


def _pop_or(settings: dict, key: str, default):
    value = settings.pop(key, None)
    return default if value is None else value


def resolve_preset(method: str, settings: dict) -> tuple:
    """A preset name -> (its method, its settings under the caller's explicit ones)."""
    if method not in PRESETS:
        return method, settings
    preset = dict(PRESETS[method])
    return preset.pop("method"), {**preset, **{k: v for k, v in settings.items() if v is not None}}


@solver_errors_as_one_line
def prune(model: nn.Module, calibration, sparsity: float, method: str = "cbs", loss_fn=F.cross_entropy, *,
          num_samples: int | None = None, damping: float | None = None, include=None, ignore=(),
          scope: str = "global", structure: str = "full", gradients: str = "auto", scratch_dir=None,
          seed: int = 0, max_memory: float = 8 * GIB, chunk_size: int | None = None, progress: bool = True,
          stages: int | None = None, schedule=None, first_order: bool | None = None, first_method: str | None = None,
          refine: int | None = None, objective: str = "fisher", pattern: str = "layer",
          bn_recalibration: bool = False, **options) -> PruneResult:
    """One-shot prune of `model` to `sparsity` with `method` ('SELECTION[+UPDATE]', e.g. 'cbs', 'wf+cbsu',
    or the preset 'max': the most accurate configuration measured).

    objective='layer' prunes on the layer-wise objective |W X - W' X|^2 instead, block by block, for models too
    large for per-sample gradients (language models): `method` is then 'mp', 'wanda', 'sparsegpt' or 'joint',
    `pattern` 'layer', 'row' or 'N:M', `damping` is relative to mean(diag H) (default 0.01) and `calibration`
    holds model inputs (sequential.prune_layerwise has the details).

    `calibration`: an (X, y) pair or an iterable of (inputs, targets) batches; `num_samples` of them
    (default: all) give the per-sample gradients. `structure` shapes the Fisher: 'full', 'layer' (one block
    per layer, cross-layer curvature dropped) or 'block:K'; sparsity stays global unless scope='layer'.
    `gradients`: keep G in 'memory', stream it one block at a time from a file in `scratch_dir` ('disk'),
    or 'auto' (disk only when memory would exceed `max_memory`). `damping` defaults to 1e-3.
    `stages` > 1 (or an explicit increasing `schedule` of sparsities, or schedule='adaptive': each stage sized from
    the model the previous one left, see next_sparsity) prunes in stages, each with the gradients recomputed at
    the previous stage's pruned and updated weights; still no training step.
    `first_method` prunes the first stage (default: `method`). `first_order` adds the mean gradient's linear
    term to the loss model of the Fisher updates and the joint selection in every stage after the first (the
    trained model is taken to be at a minimum). `refine` adds that many stages at the target sparsity itself
    after a multi-stage schedule: with `first_order`, each is a damped Gauss-Newton step of the calibration
    loss on the current mask (the selection may still swap weights), using the calibration data the way a
    short fine-tuning would; refine='auto' goes on while they keep the held-out loss below the unrefined
    model's (REFINE_LIMIT at most).
    `fresh_samples` (on in 'max'): when the calibration data holds at least twice `num_samples`, the last
    `num_samples` are held out to judge stages by, and every stage fits `num_samples` of its own (the first stage
    the first ones, so a single stage is unchanged): refinement on fresh samples stops fitting the same ones.
    `later_damping` and `later_damping_grid` set the damping and the CBS-U grid of
    the stages after the first (default: those of the first). `bn_recalibration` re-estimates every BatchNorm's
    running statistics after each stage so that its outputs on the stage's calibration inputs have the dense
    model's per-channel mean and variance (recalibrate_batchnorm: forward passes only; the result carries them in
    `buffers`); every stage's sparsity, calibration loss and seconds are in `stats['stages']`.
    `layer_start` (on in 'max') also prunes every layer on the layer-wise objective towards the dense model's
    outputs, compares that with the Fisher stages' result on the held-out loss (without held-out samples, the
    calibration loss), and gives only the one it keeps the `refine` stages (`settings['path']`): the Fisher path
    unless the layer path is better beyond the noise of the judged samples (choose_path).
    `options` go to whichever of the selection and the update takes them by name (e.g. rho, tau for cbs;
    damping_grid for cbsu). The model is not modified: call `result.apply(model)`.
    """
    if validation.choice("objective", objective, ("fisher", "layer")) == "layer":
        recalibrating = validation.flag("bn_recalibration", bn_recalibration)
        inputs = _batchnorm_inputs(calibration) if recalibrating else None
        result = prune_layerwise(model, calibration, sparsity, method, pattern=pattern, include=include,
                                 ignore=ignore, progress=progress,
                                 damping=DEFAULT_RELATIVE_DAMPING if damping is None else damping, **options)
        if recalibrating:
            _recalibrate(result.apply(copy_model(model)), model, inputs, result)
        result.settings.update(bn_recalibration=recalibrating)
        return result
    plan = plan_run(model, sparsity, method, loss_fn, num_samples=num_samples, damping=damping, include=include,
                    ignore=ignore, scope=scope, structure=structure, gradients=gradients, scratch_dir=scratch_dir,
                    seed=seed, max_memory=max_memory, chunk_size=chunk_size, progress=progress, stages=stages,
                    schedule=schedule, first_order=first_order, first_method=first_method, refine=refine,
                    bn_recalibration=bn_recalibration, **options)
    pool = None
    if calibration is not None:  # data-free methods (mp, random) may be given none
        pool = _collect_pool(calibration, plan)
        check_usable(model, *pool.stage(0), loss_fn)
    if pool is None:
        needs = [name for name, used in (("bn_recalibration", bn_recalibration), ("layer_start", plan.layer_start),
                                         ("schedule='adaptive'", plan.schedule is None)) if used]
        if needs:
            raise BrainSurgeonError(f"{', '.join(needs)} need calibration data; pass (inputs, targets)")
    if plan.schedule is not None and len(plan.schedule) == 1 and not bn_recalibration and not plan.layer_start:
        result = _prune_stage(model, pool and pool.stage(0), plan.sparsity, *plan.methods[0], first_order=False,
                              damping=plan.damping, options=plan.options, **plan.common)
        result.settings.update(bn_recalibration=False, layer_start=False)
        return result
    return _prune_in_stages(model, pool, plan, bn_recalibration, progress)


def _collect_pool(calibration, plan) -> CalibrationPool:
    """The samples the stages fit and judge by: with fresh samples, enough for every stage that may run (POOL_STAGES
    at most) and a held-out part (as many as the data holds, up to that)."""
    if not plan.fresh_samples or plan.num_samples is None:
        return CalibrationPool(*collect(calibration, plan.num_samples))
    stages = min(POOL_STAGES, (MAX_WALK_STAGES if plan.schedule is None else len(plan.schedule)) + plan.refine_limit)
    return CalibrationPool(*collect(calibration, plan.num_samples, limit=plan.num_samples * (stages + 1)),
                           plan.num_samples, plan.common["seed"])


def _judged_loss(report: dict) -> float | None:
    """What stages are judged by: the held-out loss, or without held-out samples the loss on the fitted ones."""
    return report["calibration_loss"] if report.get("held_out_loss") is None else report["held_out_loss"]


# 'max' keeps the Fisher path where it reached the target (at mild sparsities a single cbs stage: cbs itself) unless
# the layer path's judged loss is lower by more than PATH_MARGIN standard errors of the mean per-sample difference:
# both are judged on the same samples, and a difference within their noise is no evidence for either path.
PATH_MARGIN = 2.0


def choose_path(fisher_losses: torch.Tensor, layer_losses: torch.Tensor, fisher_at_target: bool) -> tuple:
    """('fisher' or 'layer', the evidence: the mean of the paths' per-sample judged loss difference and its standard
    error). A Fisher walk that stopped short of the target is never chosen."""
    difference = fisher_losses - layer_losses
    error = float(difference.std() / math.sqrt(len(difference))) if len(difference) > 1 else 0.0
    evidence = dict(fisher_minus_layer=float(difference.mean()), standard_error=error)
    better = evidence["fisher_minus_layer"] > PATH_MARGIN * error
    return ("layer" if better or not fisher_at_target else "fisher"), evidence


def _prune_in_stages(model, pool, plan, bn_recalibration, progress) -> PruneResult:
    """The layer start, and the Fisher path's stages up to the target beside it; their losses before any
    refinement (held out when the pool has such samples) decide which path goes on to the refinement stages
    (choose_path)."""
    layer, skipped, compared, other, evidence, layer_losses = None, None, {}, {}, None, None
    loss_fn, dense = plan.common["loss_fn"], model if bn_recalibration else None
    if plan.layer_start:
        layer = _layer_start(model, pool, plan, dense, progress)
        if isinstance(layer, str):
            skipped, layer = layer, None
        else:
            compared["layer"] = _judged_loss(layer[1][-1])
            layer_losses = per_sample_losses(layer[2], *pool.judged, loss_fn)
    staged = copy_model(model)
    if plan.schedule is None:
        result, reports = _walk(pool, plan, dense, progress, staged, layer_losses)
    else:
        result, reports = _run_stages(pool, plan, dense, progress, staged, list(zip(plan.schedule, plan.methods)))
    path, refine = "fisher", plan.refine_limit if len(reports) > 1 else 0  # a single stage is left as it is
    if plan.layer_start:
        compared["fisher"] = _judged_loss(reports[-1])
    if layer is not None:
        chosen, evidence = choose_path(per_sample_losses(staged, *pool.judged, loss_fn), layer_losses,
                                       reports[-1]["sparsity"] >= plan.sparsity)
        if chosen == "layer":
            other = {"fisher": reports}
            (result, reports, staged), path, refine = layer, "layer", plan.refine_limit
        else:
            other = {"layer": layer[1]}
    rejected, unrefined = None, len(reports)
    if refine:
        result, reports, rejected = _refine(pool, plan, dense, progress, staged, result, reports, refine,
                                            "layer" if path == "layer" else None)
    result.timings = {key: sum(r["timings"].get(key, 0.0) for r in reports) for key in result.timings}
    result.stats = dict(result.stats, stages=reports, rejected_stage=rejected)
    result.settings.update(stages=len(reports), schedule=[report["sparsity"] for report in reports],
                           sparsity=plan.sparsity, first_method=reports[0]["method"], first_order=plan.first_order,
                           refine=plan.refine, first_damping=plan.damping, bn_recalibration=bn_recalibration,
                           layer_start=plan.layer_start, fresh_samples=plan.fresh_samples,
                           refined_stages=len(reports) - unrefined,
                           pool_samples=pool and len(pool.inputs),
                           held_out_samples=pool.per_stage if pool and pool.fresh else 0)
    if plan.layer_start:  # the losses compared (held out where the pool has such samples), and the stages of the
        # path not taken (where its seconds went; an adaptive walk that lost stops short of the target)
        result.settings.update(path=path, layer_start_skipped=skipped)
        result.stats.update(path_calibration_loss=compared, path_evidence=evidence, other_path_stages=other)
    return result


def _refine(pool, plan, dense, progress, staged, result, reports, limit, path) -> tuple:
    """Up to `limit` refinement stages at the target with the main method. With refine='auto' and held-out
    samples, the first stage that leaves the held-out loss at or above the unrefined model's is undone and ends
    them: (the result, the stages kept, the undone stage's report or None)."""
    adaptive = plan.refine == "auto" and pool is not None and pool.fresh
    if plan.refine == "auto" and not adaptive:
        limit = min(limit, REFINE_WITHOUT_HELD_OUT)
    unrefined, most = _judged_loss(reports[-1]), len(reports) + limit
    for _ in range(limit):
        before = copy_model(staged) if adaptive else None
        stage_result, (report,) = _run_stages(pool, plan, dense, progress, staged,
                                              [(plan.sparsity, plan.refine_method)], first=len(reports) + 1, path=path,
                                              total=most)
        if adaptive and _judged_loss(report) >= unrefined:
            staged.load_state_dict(before.state_dict())
            return result, reports, report
        result, reports = stage_result, reports + [report]
    return result, reports, None


def _walk(pool, plan, dense, progress, staged, rival=None) -> tuple:
    """The adaptive schedule's stages: each sized by next_sparsity on the held-out samples (without them, the
    first stage's) from the model the previous one left: (the last stage's result, every stage's report, with
    its step bound). Given the other path's per-sample judged losses at the target (`rival`), the walk stops short
    of the target once choose_path would prefer that path even to this stage: the loss of a walk rises with its
    steps, so it could not win."""
    layers, _ = find_prunable(staged, plan.common["include"], plan.common["ignore"])
    judged, loss_fn = pool.judged, plan.common["loss_fn"]
    reports, reached = [], 0.0
    while True:
        reached, bound, proxy = next_sparsity(staged, layers, judged, reached, plan.sparsity, loss_fn,
                                              plan.common["scope"])
        method = plan.methods[min(len(reports), 1)]
        result, (report,) = _run_stages(pool, plan, dense, progress, staged, [(reached, method)],
                                        first=len(reports) + 1, total=0)
        reports.append(dict(report, step_loss_bound=bound, step_magnitude_loss=proxy))
        if reached >= plan.sparsity or (rival is not None and _loses_to(staged, judged, loss_fn, rival)):
            return result, reports


def _loses_to(staged, judged, loss_fn, rival) -> bool:
    """Whether choose_path prefers the path with per-sample judged losses `rival` to `staged` at the target."""
    return choose_path(per_sample_losses(staged, *judged, loss_fn), rival, True)[0] == "layer"


def _batchnorm_inputs(calibration) -> torch.Tensor:
    """The model inputs that BatchNorm statistics are re-estimated on, for the layer-wise objective: a tensor of
    inputs or the inputs of an (inputs, targets) pair."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    if is_tensor_pair(calibration):
        return tensor_pair(calibration)[0]
    raise BrainSurgeonError("bn_recalibration with objective='layer' needs the calibration inputs as one tensor or "
                            "an (inputs, targets) pair of tensors; pass them that way")


def _recalibrate(staged, dense, inputs, result) -> None:
    """BatchNorm statistics of `staged` re-estimated towards `dense` on `inputs` (recalibrate_batchnorm), carried
    by the stage's `result`, their seconds in its timings."""
    started = time.perf_counter()
    result.buffers = recalibrate_batchnorm(staged, dense, inputs)
    seconds = time.perf_counter() - started
    result.timings = dict(result.timings, batchnorm=seconds, total=result.timings["total"] + seconds)


def _stage_report(staged, fitted, held_out, loss_fn, target, method, result, stage, total, progress,
                  path=None) -> dict:
    """A stage's line of the trace (and of stderr): sparsity reached, loss on the samples it `fitted` and on the
    `held_out` ones, seconds (where they went in `timings`)."""
    report = dict(sparsity=target, method=method, seconds=result.timings["total"],
                  calibration_loss=None if fitted is None else mean_loss(staged, *fitted, loss_fn),
                  held_out_loss=None if held_out is None else mean_loss(staged, *held_out, loss_fn),
                  timings=result.timings, stats=result.stats, **({"path": path} if path else {}))
    if progress:
        losses = "".join(f", {name} loss {report[key]:.4g}" for key, name in
                         (("calibration_loss", "calibration"), ("held_out_loss", "held-out"))
                         if report[key] is not None)
        where = f"{path} path " if path else ""
        print(f"{where}stage {stage}{f'/{total}' if total else ''}: {method} to sparsity {target:.4g}{losses} in "
              f"{report['seconds']:.1f}s", file=sys.stderr, flush=True)
    return report


def _run_stages(pool, plan, dense, progress, staged, schedule, first=1, path=None, total=None) -> tuple:
    """`schedule`'s stages [(sparsity, (selection, update))], numbered from `first` (of `total`, for progress),
    each pruning `staged` further in place on its own samples of the pool: (the last stage's result, every stage's
    report)."""
    total = first - 1 + len(schedule) if total is None else total  # 0: not known in advance
    result, reports, held_out = None, [], pool and pool.held_out
    for stage, (target, (selection_name, update_name)) in enumerate(schedule, first):
        calibration = pool and pool.stage(stage - 1)
        # The trained model is taken to be at a minimum: its mean gradient is noise until a stage has moved it.
        result = _prune_stage(staged, calibration, target, selection_name, update_name,
                              first_order=plan.first_order and stage > 1,
                              damping=plan.damping if stage == 1 else plan.later_damping,
                              options=plan.options if stage == 1 else plan.later_options, **plan.common)
        result.apply(staged)
        if dense is not None:
            _recalibrate(staged, dense, calibration[0], result)
        reports.append(_stage_report(staged, calibration, held_out, plan.common["loss_fn"], target,
                                     f"{selection_name}+{update_name}", result, stage, total, progress, path))
    return result, reports


def _layer_start_blocker(model: nn.Module, layers) -> str | None:
    """Why the layer-wise start cannot prune these layers (None when it can)."""
    modules = dict(model.named_modules())
    for layer in layers:
        why = unprunable_layer(modules[layer.module], layer)
        if why:
            return f"{layer.module}: {why}"
    return None


def exact_layer_sparsities(layers, sparsity: float) -> dict:
    """Per-layer sparsities whose exact counts add up to the global count: each layer's share, the remainders
    given to the largest fractional parts (ties by order)."""
    sizes = [layer.size for layer in layers]
    total = num_to_prune(sparsity, sum(sizes))
    shares = [sparsity * size for size in sizes]
    counts = [int(share) for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda i: counts[i] - shares[i])
    for index in by_remainder[: total - sum(counts)]:
        counts[index] += 1
    return {layer.module: count / size for layer, count, size in zip(layers, counts, sizes)}


def _layer_start(model, pool, plan, dense, progress):
    """The layer start of 'max': every layer pruned towards the dense model's outputs (`joint`, the model as one
    block, exact counts adding up to the global one): (its result, its stage report, the pruned model), or why
    the layer-wise driver cannot prune these layers."""
    layers, _ = find_prunable(model, plan.common["include"], plan.common["ignore"])
    blocker = _layer_start_blocker(model, layers)
    if blocker is not None:
        return blocker
    fitted = pool.stage(0)
    result = prune_layerwise(model, fitted[0], exact_layer_sparsities(layers, plan.sparsity), "joint",
                             target="dense", blocks=[""], include=plan.common["include"],
                             ignore=plan.common["ignore"], batch_size=128, progress=False)
    staged = copy_model(model)
    result.apply(staged)
    if dense is not None:
        _recalibrate(staged, dense, fitted[0], result)
    report = _stage_report(staged, fitted, pool.held_out, plan.common["loss_fn"], plan.sparsity,
                           "joint (layer-wise, to dense)", result, 1, 1, progress, "layer")
    return result, [report], staged


@dataclass
class RunPlan:
    """A prune's settings, every one checked, and the stages it will run: built before any work."""

    sparsity: float
    schedule: list | None  # sparsity after each stage (None: adaptive)
    methods: list  # (selection, update) per stage
    refine_method: tuple
    damping: float
    later_damping: float
    first_order: bool
    refine: int | str  # a count, or 'auto'
    refine_limit: int  # the most refinement stages a path runs (the Fisher path none after a single stage)
    layer_start: bool
    fresh_samples: bool
    num_samples: int | None
    options: dict  # the first stage's method options
    later_options: dict
    common: dict  # the settings every stage takes as they are


def plan_run(model: nn.Module, sparsity: float, method: str = "cbs", loss_fn=F.cross_entropy, *,
             num_samples=None, damping=None, include=None, ignore=(), scope="global", structure="full",
             gradients="auto", scratch_dir=None, seed=0, max_memory=8 * GIB, chunk_size=None, progress=True,
             stages=None, schedule=None, first_order=None, first_method=None, refine=None, bn_recalibration=False,
             **options) -> RunPlan:
    """Check every argument of `prune` against `model` (no data, no gradients) and return the plan it runs.
    `bench` plans every run of a sweep this way before the first one starts."""
    sparsity = validation.sparsity(sparsity)
    method, chosen = resolve_preset(method, dict(damping=damping, stages=stages, first_order=first_order,
                                                 schedule=schedule, first_method=first_method, refine=refine,
                                                 **options))
    damping = validation.positive("damping", _pop_or(chosen, "damping", DEFAULT_DAMPING))
    stages = _pop_or(chosen, "stages", 1)
    first_order = bool(chosen.pop("first_order", None))
    schedule = chosen.pop("schedule", None)
    first_method = chosen.pop("first_method", None) or method
    refine = _pop_or(chosen, "refine", 0)
    refine_limit = REFINE_LIMIT if refine == "auto" else validation.count("refine (or 'auto')", refine, minimum=0,
                                                                                  maximum=validation.MAX_REFINE)
    layer_start = validation.flag("layer_start", chosen.pop("layer_start", False))
    fresh_samples = validation.flag("fresh_samples", chosen.pop("fresh_samples", False))
    later_damping = validation.positive("later_damping", _pop_or(chosen, "later_damping", damping))
    later_grid = chosen.pop("later_damping_grid", None)
    later_options = {**chosen, **({"damping_grid": later_grid} if later_grid is not None else {})}
    num_samples, chunk_size, max_memory, seed = _check_run_settings(num_samples, chunk_size, max_memory, seed)
    include, ignore = validation.patterns("include", include) or None, validation.patterns("ignore", ignore)
    validation.choice("scope", scope, ("global", "layer"))
    validation.choice("gradients", gradients, ("auto", "memory", "disk"))
    if scratch_dir is not None and not Path(scratch_dir).is_dir():
        raise BrainSurgeonError(f"scratch_dir {scratch_dir} is not a directory; create it or leave it unset")
    validation.flag("bn_recalibration", bn_recalibration)
    if not callable(loss_fn):
        raise BrainSurgeonError(f"loss_fn must be callable (outputs, targets) -> scalar loss, got {loss_fn!r}")
    targets = sparsity_schedule(sparsity, stages, schedule)
    first, main = parse_method(first_method), parse_method(method)
    _check_options({first, main}, chosen)
    _build_methods(*first, chosen)  # the methods check their own options
    _build_methods(*main, later_options)
    check_finite_model(model)
    layers, _ = find_prunable(model, include, ignore)
    to_prune = sum(segment.count for segment in make_segments(layers, sparsity, scope))  # refuses emptying them
    if targets is not None and len(targets) > max(to_prune, 1):
        raise BrainSurgeonError(f"{len(targets)} stages for {to_prune} weights to prune: a stage would prune none; "
                                f"ask for at most {max(to_prune, 1)} stages")
    fisher_regions(layers, structure)
    common = dict(loss_fn=loss_fn, include=include, ignore=ignore, scope=scope, structure=structure,
                  gradients=gradients, scratch_dir=scratch_dir, seed=seed, max_memory=max_memory,
                  chunk_size=chunk_size, progress=progress)
    methods = [first, main] if targets is None else [first] + [main] * (len(targets) - 1)
    return RunPlan(sparsity, targets, methods, main, damping, later_damping,
                   first_order, refine, refine_limit, layer_start, fresh_samples, num_samples, chosen, later_options,
                   common)


def _prune_stage(model, calibration, sparsity, selection_name, update_name, *, loss_fn, damping,
                 include, ignore, scope, structure, gradients, scratch_dir, seed, max_memory, chunk_size, progress,
                 first_order, options) -> PruneResult:
    """One selection and update from the model's current weights, on the collected (inputs, targets)."""
    selection, update = _build_methods(selection_name, update_name, options)
    layers, dense_layers = find_prunable(model, include, ignore)
    segments = make_segments(layers, sparsity, scope)
    regions = fisher_regions(layers, structure)
    num_weights = sum(layer.size for layer in layers)
    chunk_size = chunk_size or default_chunk_size(num_weights, max_memory)
    needs_fisher = selection.needs_fisher or update.needs_fisher
    timings, start = {}, time.perf_counter()

    inputs = targets = None
    if needs_fisher or selection.needs_loss or update.needs_loss:
        if calibration is None:
            raise BrainSurgeonError(f"{selection_name}+{update_name} needs calibration data; pass (inputs, targets)")
        inputs, targets = calibration
        if needs_fisher:
            _warn_if_few(len(inputs))
            streamed = choose_gradient_store(gradients, len(inputs), regions, max_memory, chunk_size)
    problem = PruningProblem(weights=flat_weights(model, layers).float(), segments=segments,
                             generator=torch.Generator().manual_seed(seed), show_progress=progress)
    if inputs is not None:
        problem.calibration_loss = calibration_loss_fn(model, layers, inputs, targets, loss_fn)
    with ExitStack() as cleanup:
        if needs_fisher:
            chunks = per_sample_gradient_chunks(model, layers, inputs, targets, loss_fn, chunk_size, progress)
            store = _gradient_store(chunks, num_weights, len(inputs), streamed, scratch_dir, cleanup)
            problem.fisher = EmpiricalFisher(store, damping, regions, first_order)
            timings["gradients"] = time.perf_counter() - start

        mark = time.perf_counter()
        candidates = selection.select(problem)
        timings["selection"] = time.perf_counter() - mark
        mark = time.perf_counter()
        pruned, delta = best_candidate(problem, update, candidates)
        timings["update"] = time.perf_counter() - mark
        if needs_fisher:
            selection_objective = problem.fisher.quadratic(problem.weights * pruned)
            predicted_loss_increase = problem.fisher.predicted_change(delta)
    timings["total"] = time.perf_counter() - start

    new_flat = problem.weights + delta
    new_flat[pruned] = 0.0  # exact zeros whatever the arithmetic
    settings = dict(method=f"{selection_name}+{update_name}", selection=selection_name, update=update_name,
                    sparsity=sparsity, scope=scope, structure=structure, seed=seed,
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
