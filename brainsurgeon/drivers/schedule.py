"""Staging on the Fisher objective: the sparsity of each stage (fixed, geometric or adaptive), the calibration pool
the stages fit, running stages in place, the adaptive walk and the refinement stages at the target."""
import math
import sys
import time

from .. import validation
from ..errors import BrainSurgeonError
from ..methods.budget import Budget, smallest_magnitude
from .calibration import CalibrationPool, collect, mean_loss, per_sample_losses
from .judge import choose_path, judged_loss
from .layers import copy_model, find_prunable, flat_weights, recalibrate_batchnorm
from .stage import calibration_loss_fn, prune_stage


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


def next_sparsity(model, layers, judged, reached: float, target: float, loss_fn, pattern: str, tuning) -> tuple:
    """The adaptive schedule's next stage from sparsity `reached`: as far as magnitude pruning the current weights
    (no update) keeps the loss on the `judged` (inputs, targets) within tuning.step_loss_ratio times the current one,
    found by bisection in log-density, but at least 1/tuning.max_walk_stages of the log-density left. Returns (its
    sparsity, the bound on the loss, that loss at the chosen sparsity)."""
    flat = flat_weights(model, layers).float()
    loss = calibration_loss_fn(model, layers, *judged, loss_fn)
    current = loss(flat)
    bound = current + (tuning.step_loss_ratio - 1) * abs(current)  # a loss may be negative
    density, final = 1 - reached, 1 - target

    def step(fraction: float) -> tuple:
        sparsity = target if fraction >= 1 else 1 - density * (final / density) ** fraction
        return sparsity, loss(flat * ~smallest_magnitude(flat, Budget.parse(pattern, sparsity).segments_over(layers)))

    chosen = step(1.0)
    if chosen[1] <= bound:
        return chosen[0], bound, chosen[1]
    shortest = math.log(final) / tuning.max_walk_stages / math.log(final / density)  # of the log-density left
    if shortest > 1 - 1e-9:  # the last step (up to rounding)
        return chosen[0], bound, chosen[1]
    low, high = shortest, 1.0
    chosen = step(low)
    if chosen[1] > bound:
        return chosen[0], bound, chosen[1]
    for _ in range(tuning.step_bisections):
        middle = step((low + high) / 2)
        if middle[1] <= bound:
            low, chosen = (low + high) / 2, middle
        else:
            high = (low + high) / 2
    return chosen[0], bound, chosen[1]


def collect_pool(calibration, plan) -> CalibrationPool:
    """The samples the stages fit and judge by: with fresh samples, enough for every stage that may run
    (tuning.pool_stages at most: the pool is held in memory, and later stages fit random subsets of it, as they do
    when the data holds fewer) and a held-out part (as many as the data holds, up to that)."""
    if not plan.fresh_samples or plan.num_samples is None:
        return CalibrationPool(*collect(calibration, plan.num_samples))
    tuning = plan.tuning
    stages = min(tuning.pool_stages, (tuning.max_walk_stages if plan.schedule is None else len(plan.schedule))
                 + plan.refine_limit)
    return CalibrationPool(*collect(calibration, plan.num_samples, limit=plan.num_samples * (stages + 1)),
                           plan.num_samples, plan.common["seed"])


def refine_stages(pool, plan, dense, progress, staged, result, reports, limit, path, run=None) -> tuple:
    """Up to `limit` refinement stages at the target with the main method, each run by `run` (run_stages'
    signature; default run_stages). With refine='auto' and held-out samples, the first stage that leaves the
    held-out loss at or above the unrefined model's is undone and ends them: the bar is the unrefined model, not the
    best stage so far (docs/decisions.md). Without held-out samples there is no judge and every stage fits the same
    samples, so tuning.refine_without_held_out run. Returns (the result, the stages kept, the undone stage's report
    or None)."""
    run = run_stages if run is None else run
    adaptive = plan.refine == "auto" and pool is not None and pool.fresh
    if plan.refine == "auto" and not adaptive:
        limit = min(limit, plan.tuning.refine_without_held_out)
    unrefined, most = judged_loss(reports[-1]), len(reports) + limit
    for _ in range(limit):
        before = copy_model(staged) if adaptive else None
        stage_result, (report,) = run(pool, plan, dense, progress, staged, [(plan.sparsity, plan.refine_method)],
                                      first=len(reports) + 1, path=path, total=most)
        if adaptive and judged_loss(report) >= unrefined:
            staged.load_state_dict(before.state_dict())
            return result, reports, report
        result, reports = stage_result, reports + [report]
    return result, reports, None


def walk(pool, plan, dense, progress, staged, rival=None) -> tuple:
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
                                              plan.common["pattern"], plan.tuning)
        method = plan.methods[min(len(reports), 1)]
        result, (report,) = run_stages(pool, plan, dense, progress, staged, [(reached, method)],
                                        first=len(reports) + 1, total=0)
        reports.append(dict(report, step_loss_bound=bound, step_magnitude_loss=proxy))
        if reached >= plan.sparsity or (rival is not None and loses_to(staged, judged, loss_fn, rival,
                                                                       plan.tuning.path_margin)):
            return result, reports


def loses_to(staged, judged, loss_fn, rival, margin: float) -> bool:
    """Whether choose_path prefers the path with per-sample judged losses `rival` to `staged` at the target."""
    return choose_path(per_sample_losses(staged, *judged, loss_fn), rival, True, margin)[0] == "layer"


def recalibrate(staged, dense, inputs, result) -> None:
    """BatchNorm statistics of `staged` re-estimated towards `dense` on `inputs` (recalibrate_batchnorm), carried
    by the stage's `result`, their seconds in its timings."""
    started = time.perf_counter()
    result.buffers = recalibrate_batchnorm(staged, dense, inputs)
    seconds = time.perf_counter() - started
    result.timings = dict(result.timings, batchnorm=seconds, total=result.timings["total"] + seconds)


def stage_report(staged, fitted, held_out, loss_fn, target, method, result, stage, total, progress,
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


def hooked(on_stage, stage: int, sparsity: float, result):
    """The caller's on_stage(stage, sparsity, result): a PruneResult to use instead, or None to keep `result`."""
    replaced = on_stage(stage, sparsity, result)
    if replaced is None:
        return result
    if type(replaced) is not type(result) or set(replaced.weights) != set(result.weights):
        raise BrainSurgeonError(f"on_stage returned {type(replaced).__name__} for stage {stage}; return a PruneResult "
                                "of the same layers, or None to keep the stage's own")
    return replaced


def run_stages(pool, plan, dense, progress, staged, schedule, first=1, path=None, total=None) -> tuple:
    """`schedule`'s stages [(sparsity, (selection, update))], numbered from `first` (of `total`, for progress),
    each pruning `staged` further in place on its own samples of the pool: (the last stage's result, every stage's
    report)."""
    total = first - 1 + len(schedule) if total is None else total  # 0: not known in advance
    result, reports, held_out = None, [], pool and pool.held_out
    for stage, (target, (selection_name, update_name)) in enumerate(schedule, first):
        calibration = pool and pool.stage(stage - 1)
        # The trained model is taken to be at a minimum: its mean gradient is noise until a stage has moved it.
        result = prune_stage(staged, calibration, target, selection_name, update_name,
                              first_order=plan.first_order and stage > 1,
                              damping=plan.damping if stage == 1 else plan.later_damping,
                              options=plan.options if stage == 1 else plan.later_options, **plan.common)
        if plan.on_stage is not None:
            result = hooked(plan.on_stage, stage, target, result)
        result.apply(staged)
        if dense is not None:
            recalibrate(staged, dense, calibration[0], result)
        reports.append(stage_report(staged, calibration, held_out, plan.common["loss_fn"], target,
                                     f"{selection_name}+{update_name}", result, stage, total, progress, path))
    return result, reports
