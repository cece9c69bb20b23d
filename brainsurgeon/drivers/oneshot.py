"""The pruning driver: prune(model, calibration, sparsity, method) -> PruneResult, on the Fisher objective (in one
stage, in stages, or along the two paths of 'max') or on the layer-wise one (sequential.prune_layerwise)."""
import torch
from torch import nn
from torch.nn import functional as F

from .. import distributed, validation
from ..curvature.hessian import DEFAULT_RELATIVE_DAMPING
from ..errors import BrainSurgeonError, solver_errors_as_one_line
from .calibration import check_usable, is_tensor_pair, per_sample_losses, tensor_pair
from .judge import choose_path, judged_loss
from .layer_start import layer_start
from .layers import copy_model
from .plan import plan_run
from .registry import StageOptions
from .result import PruneResult
from .schedule import collect_pool, hooked, recalibrate, refine_stages, run_stages, walk
from .sequential import prune_layerwise
from .settings import (
    FisherSettings,
    LayerSettings,
    deprecated_scope,
    given,
    split_settings,
)
from .stage import prune_stage
from .tuning import Tuning


@solver_errors_as_one_line
def prune(model: nn.Module, calibration, sparsity: float, method: str = "cbs", loss_fn=F.cross_entropy, *,
          objective: str = "fisher", pattern: str | None = None, include=None, ignore=(), seed: int | None = None,
          progress: bool = True, fisher: FisherSettings | None = None, layer: LayerSettings | None = None,
          staging: StageOptions | None = None, tuning: Tuning | None = None, on_stage=None,
          **options) -> PruneResult:
    """One-shot prune of `model` to `sparsity` with `method` (methods/catalog.py: 'SELECTION[+UPDATE]' on the
    Fisher objective, e.g. 'cbs', 'swaps', 'wf+cbsu', or the preset 'max', the most accurate configuration
    measured). The model is not modified: call `result.apply(model)`.

    `calibration`: an (X, y) pair or an iterable of (inputs, targets) batches (on the layer objective, model
    inputs alone will do). `pattern` is the budget (methods/budget.py), on either objective: 'global' (one count
    over all layers, the Fisher objective's default), 'layer' (the sparsity in each layer, the layer objective's
    default), 'row' (in each output row) or 'N:M' such as '2:4' (sparsity N/M; `sparsity` may be None).
    `include`/`ignore` name module types or layer-name regexes. The other settings come in groups, each a frozen
    dataclass checked once, given as an object or as its fields in keywords:
      fisher=FisherSettings(...)   the Fisher objective's curvature: num_samples, damping (an absolute lambda,
                                   default 1e-3), structure ('full', 'layer', 'block:K'; default: full where its
                                   gradients fit max_memory, else layer), gradients ('memory', 'disk' in
                                   scratch_dir, or 'auto'), max_memory, chunk_size;
      staging=StageOptions(...)    staged pruning (registry.StageOptions): stages, schedule (sparsities, or
                                   'adaptive'), refine (a count or 'auto'), first_order, first_method,
                                   later_damping, later_damping_grid, fresh_samples, layer_start and
                                   bn_recalibration (re-estimated BatchNorm statistics; the one field the layer
                                   objective takes too);
      layer=LayerSettings(...)     objective='layer' (the layer-wise |W X - W' X|^2, block by block, for models too
                                   large for per-sample gradients; sequential.prune_layerwise): relative_damping
                                   (a fraction of mean(diag H), default 0.01), target ('layer' or 'dense'),
                                   blocks, batch_size;
      tuning=Tuning(...)           the staged runs' measured constants (drivers/tuning.py, docs/decisions.md):
                                   step_loss_ratio, max_walk_stages, step_bisections, refine_limit,
                                   refine_without_held_out, pool_stages, path_margin, layer_start_batch.
    `on_stage(stage, sparsity, result)`, when given, is called with each Fisher stage's PruneResult (stage from 1)
    before the stage is applied and judged: to log or save it, or to return a PruneResult of the same layers to
    use instead (None keeps it).
    The remaining keywords are the method's declared options (e.g. rho, tau for cbs; damping_grid for cbsu;
    penalty for admm). A keyword no group and no method of the run declares, or a group's field on the objective
    that does not use it, is an error naming the valid ones. README ("Beyond CBS: the `swaps` selection, stages,
    and `max`") describes what the staging
    settings do; every stage's sparsity, calibration loss and seconds are in `stats['stages']`.
    """
    objective = validation.choice("objective", objective, ("fisher", "layer"))
    if "scope" in options:  # the old name of the patterns 'global' and 'layer'
        pattern = deprecated_scope(options.pop("scope"), pattern)
    curvature, layerwise, stage_options, constants, options = split_settings(
        objective, dict(options), dict(fisher=fisher, layer=layer, staging=staging, tuning=tuning))
    bn_recalibration = stage_options.bn_recalibration is not None and validation.flag(
        "bn_recalibration", stage_options.bn_recalibration)
    if objective == "layer":
        if loss_fn is not F.cross_entropy or on_stage is not None:
            raise BrainSurgeonError(f"objective='layer' does not use {'loss_fn' if on_stage is None else 'on_stage'} "
                                    "(it fits each layer's outputs, in no stages); drop it, or prune with "
                                    "objective='fisher'")
        return _prune_layer_objective(model, calibration, sparsity, method, pattern, layerwise, include, ignore, seed,
                                      bn_recalibration, progress, options)
    plan = plan_run(model, sparsity, method, loss_fn, pattern=pattern, include=include, ignore=ignore,
                    **given(curvature),
                    seed=0 if seed is None else seed, progress=progress, on_stage=on_stage, tuning=constants,
                    **given(stage_options),
                    **options)
    pool = None
    if calibration is not None:  # data-free methods (mp, random) may be given none
        pool = collect_pool(calibration, plan)
        check_usable(model, *pool.stage(0), loss_fn)
    # under torchrun the ranks share the per-sample gradients (curvature/fisher.py): they must prune alike
    arguments = dict(sparsity=sparsity, method=method, pattern=pattern, include=include, ignore=ignore, seed=seed,
                     fisher=curvature, staging=stage_options, tuning=constants, **options)
    distributed.agree(None, distributed.fingerprint(arguments, model, () if pool is None else (pool.inputs,
                                                                                              pool.targets)))
    if pool is None:
        needs = [name for name, used in (("bn_recalibration", bn_recalibration), ("layer_start", plan.layer_start),
                                         ("schedule='adaptive'", plan.schedule is None)) if used]
        if needs:
            raise BrainSurgeonError(f"{', '.join(needs)} need calibration data; pass (inputs, targets)")
    if plan.schedule is not None and len(plan.schedule) == 1 and not bn_recalibration and not plan.layer_start:
        result = prune_stage(model, pool and pool.stage(0), plan.sparsity, *plan.methods[0], first_order=False,
                             damping=plan.damping, options=plan.options, **plan.common)
        if on_stage is not None:
            result = hooked(on_stage, 1, plan.sparsity, result)
        result.settings.update(bn_recalibration=False, layer_start=False, ranks=distributed.world().size)
        return result
    result = _prune_in_stages(model, pool, plan, bn_recalibration, progress)
    result.settings.update(ranks=distributed.world().size)
    return result


def _prune_layer_objective(model, calibration, sparsity, method, pattern, layerwise, include, ignore, seed,
                           bn_recalibration, progress, options) -> PruneResult:
    """prune(objective='layer'): the layer-wise driver, with `seed` handed to a method that declares one."""
    inputs = _batchnorm_inputs(calibration) if bn_recalibration else None
    if seed is not None:
        options = dict(options, seed=seed)  # a method without a seed refuses it, naming its options
    result = prune_layerwise(model, calibration, sparsity, method, pattern="layer" if pattern is None else pattern,
                             include=include, ignore=ignore, progress=progress,
                             **{**dict(relative_damping=DEFAULT_RELATIVE_DAMPING), **given(layerwise)}, **options)
    if bn_recalibration:
        recalibrate(result.apply(copy_model(model)), model, inputs, result)
    result.settings.update(bn_recalibration=bn_recalibration)
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
                                       reports[-1]["sparsity"] >= plan.sparsity, plan.tuning.path_margin)
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
                           held_out_samples=pool.per_stage if pool and pool.fresh else 0,
                           tuning=plan.tuning.as_dict())
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
