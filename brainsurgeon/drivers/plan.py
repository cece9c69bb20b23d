"""The plan of a prune on the Fisher objective: every argument checked against the model before any work."""
from dataclasses import dataclass

from torch import nn
from torch.nn import functional as F

from .. import validation
from ..errors import BrainSurgeonError
from ..methods.budget import Budget
from .layers import check_finite_model, find_prunable
from .registry import build_methods, check_options, parse_method, pop_or, resolve_preset
from .schedule import sparsity_schedule
from .settings import FisherSettings
from .stage import DEFAULT_DAMPING, DEFAULT_MAX_MEMORY, fisher_regions
from .tuning import DEFAULT_TUNING, Tuning


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
    on_stage: object = None  # the caller's hook on each stage's result (prune's docstring)
    tuning: object = None  # the staged runs' constants (drivers/tuning.py)


def plan_run(model: nn.Module, sparsity: float, method: str = "cbs", loss_fn=F.cross_entropy, *,
             num_samples=None, damping=None, include=None, ignore=(), pattern=None, structure=None,
             gradients=None, scratch_dir=None, seed=0, max_memory=None, chunk_size=None, progress=True,
             stages=None, schedule=None, first_order=None, first_method=None, refine=None, bn_recalibration=False,
             on_stage=None, tuning=None, **options) -> RunPlan:
    """Check every argument of `prune` against `model` (no data, no gradients) and return the plan it runs.
    `bench` plans every run of a sweep this way before the first one starts."""
    budget = Budget.parse("global" if pattern is None else pattern, sparsity)
    sparsity = budget.sparsity
    method, chosen = resolve_preset(method, dict(damping=damping, stages=stages, first_order=first_order,
                                                 schedule=schedule, first_method=first_method, refine=refine,
                                                 **options))
    damping = validation.positive("damping", pop_or(chosen, "damping", DEFAULT_DAMPING))
    stages = pop_or(chosen, "stages", 1)
    first_order = bool(chosen.pop("first_order", None))
    schedule = chosen.pop("schedule", None)
    first_method = chosen.pop("first_method", None) or method
    refine = pop_or(chosen, "refine", 0)
    tuning = DEFAULT_TUNING if tuning is None else tuning
    if not isinstance(tuning, Tuning):
        raise BrainSurgeonError(f"tuning must be a Tuning, got {tuning!r}")
    refine_limit = tuning.refine_limit if refine == "auto" else validation.count(
        "refine (or 'auto')", refine, minimum=0, maximum=validation.MAX_REFINE)
    layer_start = validation.flag("layer_start", chosen.pop("layer_start", False))
    fresh_samples = validation.flag("fresh_samples", chosen.pop("fresh_samples", False))
    later_damping = validation.positive("later_damping", pop_or(chosen, "later_damping", damping))
    later_grid = chosen.pop("later_damping_grid", None)
    later_options = {**chosen, **({"damping_grid": later_grid} if later_grid is not None else {})}
    curvature = FisherSettings(num_samples=num_samples, structure=structure, gradients=gradients,
                               scratch_dir=scratch_dir, max_memory=max_memory, chunk_size=chunk_size)
    num_samples, chunk_size = curvature.num_samples, curvature.chunk_size
    max_memory = DEFAULT_MAX_MEMORY if curvature.max_memory is None else curvature.max_memory
    gradients = curvature.gradients or "auto"
    seed = validation.seed(seed)
    include, ignore = validation.patterns("include", include) or None, validation.patterns("ignore", ignore)
    validation.flag("bn_recalibration", bn_recalibration)
    if on_stage is not None and not callable(on_stage):
        raise BrainSurgeonError(f"on_stage must be callable (stage, sparsity, result) -> result or None, got "
                                f"{on_stage!r}")
    if not callable(loss_fn):
        raise BrainSurgeonError(f"loss_fn must be callable (outputs, targets) -> scalar loss, got {loss_fn!r}")
    targets = sparsity_schedule(sparsity, stages, schedule)
    if budget.kind == "nm" and targets != [sparsity]:
        raise BrainSurgeonError(f"pattern {budget.pattern} prunes {sparsity:g} in one stage; drop the stages and the "
                                "schedule (and the preset), or use pattern 'global', 'layer' or 'row'")
    first, main = parse_method(first_method), parse_method(method)
    check_options({first, main}, chosen, FisherSettings.names() + Tuning.names())
    build_methods(*first, chosen)  # the methods check their own options
    build_methods(*main, later_options)
    check_finite_model(model)
    layers, _ = find_prunable(model, include, ignore)
    to_prune = sum(segment.count for segment in budget.segments_over(layers))  # refuses emptying them
    if targets is not None and len(targets) > max(to_prune, 1):
        raise BrainSurgeonError(f"{len(targets)} stages for {to_prune} weights to prune: a stage would prune none; "
                                f"ask for at most {max(to_prune, 1)} stages")
    if structure is not None:  # None: chosen from the model and max_memory when the Fisher is built
        fisher_regions(layers, structure)
    common = dict(loss_fn=loss_fn, include=include, ignore=ignore, pattern=budget.pattern, structure=structure,
                  gradients=gradients, scratch_dir=scratch_dir, seed=seed, max_memory=max_memory,
                  chunk_size=chunk_size, progress=progress)
    methods = [first, main] if targets is None else [first] + [main] * (len(targets) - 1)
    return RunPlan(sparsity, targets, methods, main, damping, later_damping,
                   first_order, refine, refine_limit, layer_start, fresh_samples, num_samples, chosen, later_options,
                   common, on_stage, tuning)
