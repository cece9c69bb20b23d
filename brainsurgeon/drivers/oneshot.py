"""The pruning driver: prune(model, calibration, sparsity, method) -> PruneResult, on the Fisher objective (in one
stage, in stages, or along the two paths of 'max') or on the layer-wise one (sequential.prune_layerwise)."""
import torch
from torch import nn
from torch.nn import functional as F

from .. import validation
from ..curvature.hessian import DEFAULT_RELATIVE_DAMPING
from ..errors import BrainSurgeonError, solver_errors_as_one_line
from .calibration import check_usable, is_tensor_pair, per_sample_losses, tensor_pair
from .judge import choose_path, judged_loss
from .layer_start import layer_start
from .layers import copy_model
from .plan import plan_run
from .result import PruneResult
from .schedule import collect_pool, recalibrate, refine_stages, run_stages, walk
from .sequential import prune_layerwise
from .stage import DEFAULT_MAX_MEMORY, prune_stage

# Arguments of prune that only the Fisher objective uses, with the value that means "not given".
FISHER_ONLY = dict(num_samples=None, scope=None, structure=None, gradients=None, scratch_dir=None, max_memory=None,
                   chunk_size=None, stages=None, schedule=None, first_order=None, first_method=None, refine=None)


@solver_errors_as_one_line
def prune(model: nn.Module, calibration, sparsity: float, method: str = "cbs", loss_fn=F.cross_entropy, *,
          num_samples: int | None = None, damping: float | None = None, include=None, ignore=(),
          scope: str | None = None, structure: str | None = None, gradients: str | None = None, scratch_dir=None,
          seed: int | None = None, max_memory: float | None = None, chunk_size: int | None = None,
          progress: bool = True, stages: int | None = None, schedule=None, first_order: bool | None = None,
          first_method: str | None = None, refine: int | None = None, objective: str = "fisher",
          pattern: str | None = None, bn_recalibration: bool = False, **options) -> PruneResult:
    """One-shot prune of `model` to `sparsity` with `method` ('SELECTION[+UPDATE]', e.g. 'cbs', 'wf+cbsu',
    or the preset 'max': the most accurate configuration measured).

    objective='layer' prunes on the layer-wise objective |W X - W' X|^2 instead, block by block, for models too
    large for per-sample gradients (language models): `method` is then 'mp', 'wanda', 'sparsegpt', 'admm', 'wf', 'cbs' or 'swaps',
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
    term to the loss model of the Fisher updates and the swaps selection in every stage after the first (the
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
    `options` are the method's declared options (e.g. rho, tau for cbs; damping_grid for cbsu) and the stage
    options (registry.StageOptions). An option the run does not use is an error naming the ones it does: on the
    layer objective, the Fisher path's settings (num_samples, scope, structure, gradients, stages, ...); on the
    Fisher objective, `pattern`. The model is not modified: call `result.apply(model)`.
    """
    if validation.choice("objective", objective, ("fisher", "layer")) == "layer":
        given = dict(num_samples=num_samples, scope=scope, structure=structure, gradients=gradients,
                     scratch_dir=scratch_dir, max_memory=max_memory, chunk_size=chunk_size, stages=stages,
                     schedule=schedule, first_order=first_order, first_method=first_method, refine=refine)
        unused = [name for name, value in given.items() if value is not FISHER_ONLY[name]]
        unused += ["loss_fn"] if loss_fn is not F.cross_entropy else []
        if unused:
            raise BrainSurgeonError(f"objective='layer' does not use {', '.join(unused)} (the Fisher objective's "
                                    "settings); drop them, or prune with objective='fisher'")
        return _prune_layer_objective(model, calibration, sparsity, method, pattern, damping, include, ignore, seed,
                                      bn_recalibration, progress, options)
    if pattern is not None:
        raise BrainSurgeonError(f"pattern={pattern!r} applies to objective='layer' only; on the Fisher objective the "
                                "sparsity is global or per layer (scope='layer'); drop pattern or pass "
                                "objective='layer'")
    plan = plan_run(model, sparsity, method, loss_fn, num_samples=num_samples, damping=damping, include=include,
                    ignore=ignore, scope=scope or "global", structure=structure,
                    gradients=gradients or "auto", scratch_dir=scratch_dir, seed=0 if seed is None else seed,
                    max_memory=DEFAULT_MAX_MEMORY if max_memory is None else max_memory, chunk_size=chunk_size,
                    progress=progress, stages=stages, schedule=schedule, first_order=first_order,
                    first_method=first_method, refine=refine, bn_recalibration=bn_recalibration, **options)
    pool = None
    if calibration is not None:  # data-free methods (mp, random) may be given none
        pool = collect_pool(calibration, plan)
        check_usable(model, *pool.stage(0), loss_fn)
    if pool is None:
        needs = [name for name, used in (("bn_recalibration", bn_recalibration), ("layer_start", plan.layer_start),
                                         ("schedule='adaptive'", plan.schedule is None)) if used]
        if needs:
            raise BrainSurgeonError(f"{', '.join(needs)} need calibration data; pass (inputs, targets)")
    if plan.schedule is not None and len(plan.schedule) == 1 and not bn_recalibration and not plan.layer_start:
        result = prune_stage(model, pool and pool.stage(0), plan.sparsity, *plan.methods[0], first_order=False,
                             damping=plan.damping, options=plan.options, **plan.common)
        result.settings.update(bn_recalibration=False, layer_start=False)
        return result
    return _prune_in_stages(model, pool, plan, bn_recalibration, progress)


def _prune_layer_objective(model, calibration, sparsity, method, pattern, damping, include, ignore, seed,
                           bn_recalibration, progress, options) -> PruneResult:
    """prune(objective='layer'): the layer-wise driver, with `seed` handed to a method that declares one."""
    recalibrating = validation.flag("bn_recalibration", bn_recalibration)
    inputs = _batchnorm_inputs(calibration) if recalibrating else None
    if seed is not None:
        options = dict(options, seed=seed)  # a method without a seed refuses it, naming its options
    result = prune_layerwise(model, calibration, sparsity, method, pattern=pattern or "layer", include=include,
                             ignore=ignore, progress=progress,
                             damping=DEFAULT_RELATIVE_DAMPING if damping is None else damping, **options)
    if recalibrating:
        recalibrate(result.apply(copy_model(model)), model, inputs, result)
    result.settings.update(bn_recalibration=recalibrating)
    return result


def _prune_in_stages(model, pool, plan, bn_recalibration, progress) -> PruneResult:
    """The layer start, and the Fisher path's stages up to the target beside it; their losses before any
    refinement (held out when the pool has such samples) decide which path goes on to the refinement stages
    (choose_path)."""
    layer, skipped, compared, other, evidence, layer_losses = None, None, {}, {}, None, None
    loss_fn, dense = plan.common["loss_fn"], model if bn_recalibration else None
    if plan.layer_start:
        layer = layer_start(model, pool, plan, dense, progress)
        if isinstance(layer, str):
            skipped, layer = layer, None
        else:
            compared["layer"] = judged_loss(layer[1][-1])
            layer_losses = per_sample_losses(layer[2], *pool.judged, loss_fn)
    staged = copy_model(model)
    if plan.schedule is None:
        result, reports = walk(pool, plan, dense, progress, staged, layer_losses)
    else:
        result, reports = run_stages(pool, plan, dense, progress, staged, list(zip(plan.schedule, plan.methods)))
    path, refine = "fisher", plan.refine_limit if len(reports) > 1 else 0  # a single stage is left as it is
    if plan.layer_start:
        compared["fisher"] = judged_loss(reports[-1])
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
        result, reports, rejected = refine_stages(pool, plan, dense, progress, staged, result, reports, refine,
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


def _batchnorm_inputs(calibration) -> torch.Tensor:
    """The model inputs that BatchNorm statistics are re-estimated on, for the layer-wise objective: a tensor of
    inputs or the inputs of an (inputs, targets) pair."""
    if isinstance(calibration, torch.Tensor):
        return calibration
    if is_tensor_pair(calibration):
        return tensor_pair(calibration)[0]
    raise BrainSurgeonError("bn_recalibration with objective='layer' needs the calibration inputs as one tensor or "
                            "an (inputs, targets) pair of tensors; pass them that way")
