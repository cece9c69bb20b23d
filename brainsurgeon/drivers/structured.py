"""Structured pruning, block by block: whole units removed and the model physically shrunk (issue 23, first part).

The blocks and their calibration inputs are the layer-wise driver's (activations.py). In each block the units
are found by probing (models/surgery.py: a consumer's input columns produced by other layers' rows and by nothing
else, such as an MLP's hidden neurons); every consumer's H = X X^T is accumulated on the block's inputs, the
method chooses which units go (methods/units.py), the consumer's kept columns are refitted exactly (all methods
but 'norm' and 'wanda_sp', which keep the columns as they are, as their papers do), and the producers and the
consumer are replaced by smaller nn.Linear layers. The next block sees the pruned block's outputs.

How many units each consumer loses (`allocation`):
  uniform  the same fraction of every consumer's units, so a Hugging Face config keeps one width per kind
           (intermediate_size)
  errors   the same total, spread to give the least summed error: a first pass over the dense model follows
           every consumer's structured-OBS path to one unit left and records its error curve, divided by the
           median over tokens of the squared norm of the block's output (the residual stream the error is added
           to, so errors of different depths are on one scale; the median, because the mean is dominated by the
           few tokens that carry massive activations); methods/units.allocate picks the counts. The widths
           then differ per block and the model is saved with a width map (models/shrunk.py).
  loss     as errors, but each curve is put on the scale of the calibration loss: multiplied by the squared
           gradient of the loss with respect to the consumer's output, per sample and channel
           (drivers/sensitivity.py; causal language models, and classifiers against their own predictions)
  fluctuation  FLAP's adaptive structure: every column's fluctuation on the dense model, standardised within its
           consumer and averaged per unit, and the lowest units removed across the model until the parameter
           budget is spent

Biases (`biases`): 'existing' refits (obs, swaps) or compensates (flap) through the consumers' own biases only;
'add' gives every consumer a bias to carry the removed columns' mean contribution (FLAP does; the default for
flap). A Hugging Face config then turns on the switch that builds those biases (models/shrunk.py).
"""
import copy
import functools
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import validation
from ..curvature.hessian import DEFAULT_RELATIVE_DAMPING
from ..errors import BrainSurgeonError, solver_errors_as_one_line
from ..methods import units
from ..methods.budget import num_to_prune
from ..models.shrunk import match_config_biases
from ..models.surgery import remove_units, width_in
from ..modes import evaluating
from ..progress import progress_bar
from .activations import (
    capture_block_inputs,
    cross_statistics,
    find_blocks,
    model_calls,
    run_block,
    with_first,
)
from .layers import check_finite_model
from .sensitivity import layer_sensitivities
from .unit_curves import Positions, UnitGroups, block_layers, error_curves
from .unit_objective import (
    REFITTED,
    OutputScales,
    UnitObjective,
    given_scores,
    statistics,
)

ALLOCATIONS = ("uniform", "errors", "loss", "fluctuation")
BIASES = ("existing", "add")
TARGETS = ("layer", "dense")
DEFAULT_TARGET = "layer"
ROW_WEIGHTS = ("batchnorm", "none")
UNIT_KINDS = ("heads", "neurons", "channels")
COSTS = ("parameters", "macs")


@dataclass
class StructuredResult:
    """The shrunk model (a copy; the caller's is untouched), the widths before and after per consumer, and what
    each method reported."""

    model: nn.Module
    widths: dict  # consumer name -> (units before, units after)
    settings: dict
    stats: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    left_dense: dict = field(default_factory=dict)  # nn.Linear or nn.Conv2d name -> why it kept its shape
    kept_rows: dict = field(default_factory=dict)  # producer name -> the dense model's rows (channels) it kept

    def parameters_before_after(self, dense: nn.Module) -> tuple:
        return sum(p.numel() for p in dense.parameters()), sum(p.numel() for p in self.model.parameters())


def check_choices(method: str, allocation: str, units_of, names=("structured method", "allocation")) -> tuple:
    """(method, allocation, unit kinds as a tuple), each checked against the valid ones; `names` are how the
    messages call the first two (the command line names its flags)."""
    method = validation.choice(names[0], method, units.SELECTIONS)
    allocation = validation.choice(names[1], allocation, ALLOCATIONS)
    units_of = (units_of,) if isinstance(units_of, str) else tuple(units_of)
    for kind in units_of:
        validation.choice("unit kind", kind, UNIT_KINDS)
    if not units_of:
        raise BrainSurgeonError(f"units_of is empty; name one or more of {list(UNIT_KINDS)}")
    return method, allocation, units_of


def check_refit_options(method: str, target: str = None, row_weights: str = None) -> tuple:
    """(target, row_weights), defaults filled in; a value other than the default is refused, before any work,
    for a method that does not refit (only obs and swaps can honour it)."""
    target = validation.choice("target", target or DEFAULT_TARGET, TARGETS)
    row_weights = validation.choice("row_weights", row_weights or ROW_WEIGHTS[0], ROW_WEIGHTS)
    asked = [f"{name}={value!r}" for name, value, default in (("target", target, DEFAULT_TARGET),
                                                             ("row_weights", row_weights, ROW_WEIGHTS[0]))
             if value != default]
    if asked and method not in REFITTED:
        raise BrainSurgeonError(f"{' and '.join(asked)} only change{'s' if len(asked) == 1 else ''} the methods that "
                                f"refit ({' and '.join(REFITTED)}), not {method!r}; drop it or choose one of them")
    return target, row_weights


@solver_errors_as_one_line
def prune_structured(model: nn.Module, calibration, fraction: float, method: str = "swaps", *,
                     units_of: tuple = UNIT_KINDS, allocation: str = "uniform", cost: str = "parameters",
                     biases: str = None, target: str = None, row_weights: str = None,
                     relative_damping: float = DEFAULT_RELATIVE_DAMPING, max_swaps: int = 200, blocks=None,
                     batch_size: int = 8, progress: bool = True) -> StructuredResult:
    """Remove `fraction` of the units of the unit groups (module docstring) with `method` (one of
    methods/units.SELECTIONS), spread over the consumers by `allocation` ('uniform', 'errors',
    'loss' or 'fluctuation'), and return the shrunk copy. `units_of` names the kinds of units pruned ('heads',
    'neurons', 'channels'); `fraction` is of each group's units (uniform), or (errors, loss) of all their `cost`:
    'parameters', or 'macs' (multiply-accumulates per input, which a convolution's spatial size weighs).
    `biases` ('existing' or 'add'; default 'add' for flap, else 'existing') says which consumers carry the
    removed columns' mean (module docstring); `target` ('layer' or 'dense', for obs and swaps) what the refit
    reproduces: each consumer's output on the pruned inputs, or the dense model's; `row_weights` ('batchnorm' or
    'none', for obs and swaps) whether a consumer's rows are weighted by the factors of a BatchNorm that takes its
    output, so that errors are measured where they join the stream. `calibration` is model
    inputs, as for prune_layerwise; `relative_damping` damps each consumer's H by a fraction of its mean diagonal."""
    fraction = validation.number("fraction", fraction, low=0, high=1, high_open=True)
    method, allocation, units_of = check_choices(method, allocation, units_of)
    cost = validation.choice("cost", cost, COSTS)
    biases = validation.choice("biases", "add" if biases is None and method == "flap" else biases or "existing",
                               BIASES)
    target, row_weights = check_refit_options(method, target, row_weights)
    relative_damping = validation.positive("relative_damping", relative_damping)
    max_swaps = validation.count("max_swaps", max_swaps, minimum=0)
    batch_size = validation.count("batch_size", batch_size)
    check_finite_model(model)
    pruned = copy.deepcopy(model)
    started = time.perf_counter()
    widths, stats, kinds, kept_rows = {}, {}, {}, {}
    with evaluating(pruned), torch.no_grad():
        found = find_blocks(pruned, blocks)
        calls = model_calls(pruned, calibration, batch_size)
        inputs = capture_block_inputs(pruned, found[0][1], calls)
        counts, groups_of, scales_of = None, UnitGroups(), OutputScales(row_weights == "batchnorm")
        if allocation != "uniform":
            scales = layer_sensitivities(pruned, block_layers(found), calls) if allocation == "loss" else None
            curves, costs = error_curves(found, inputs, units_of, relative_damping, progress, groups_of, scales,
                                         cost, functools.partial(UnitObjective, method, biases, relative_damping),
                                         allocation, scales_of)
            budget = fraction * sum((len(curve) + 1) * costs[name] for name, curve in curves.items())
            counts = units.allocate(curves, budget, costs)
        dense_inputs = inputs
        for name, block in progress_bar(found, "structured blocks", progress):
            # in forward order, each group's H recorded on the inputs the groups before it left
            dense_block = copy.deepcopy(block) if target == "dense" else None
            for group in groups_of(name, block, inputs, units_of):
                full = f"{name}.{group.consumer}".strip(".")
                consumer = block.get_submodule(group.consumer)
                width = width_in(consumer)
                if dense_block is None:
                    raw, mean = statistics(block, group.consumer, inputs)
                    towards = None
                else:
                    raw, cross, mean, dense_mean = cross_statistics(block, dense_block, group.consumer, inputs,
                                                                    dense_inputs)
                    towards = (cross, dense_mean)
                objective = UnitObjective(method, biases, relative_damping,
                                          scales_of(name, block, group, inputs))
                weight, hessian, kept_bias = objective.problem(consumer, raw, mean, towards)
                count = num_to_prune(fraction, group.units) if counts is None else counts[full]
                removed, figures = units.choose_units(weight, hessian, count, method, max_swaps, group.columns,
                                                      given_scores(method, block, group, inputs, raw, mean))
                kept_units = torch.tensor(sorted(set(range(group.units)) - set(removed.tolist())), dtype=torch.long)
                kept = torch.cat([group.columns_of(kept_units), kept_bias])
                new = objective.update(weight, hessian, kept, mean, group.columns[removed].flatten())
                error = units.error_of(weight, hessian, kept, new)
                new = objective.unscaled(new)
                stats[full] = dict(figures, kind=group.kind, removed=removed.tolist(), units=group.units,
                                   parameters_per_unit=group.parameters_per_unit(block),
                                   producers=list(group.producers), error=error)
                for producer in group.producers:
                    kept_rows[f"{name}.{producer}".strip(".")] = group.rows_of(producer, kept_units)
                bias = new[:, -1].float() if len(kept_bias) else None
                remove_units(block, group, kept_units, new[:, : new.shape[1] - len(kept_bias)].float(), bias)
                widths[full] = (width, width_in(block.get_submodule(group.consumer)))
                kinds[full] = (group.kind, len(kept_units), group.heads_per_unit, group.columns.shape[1])
            inputs = with_first(inputs, run_block(block, inputs))
            if dense_block is not None:
                dense_inputs = with_first(dense_inputs, run_block(dense_block, dense_inputs))
    if not widths:
        raise BrainSurgeonError(f"no unit groups of {' or '.join(units_of)} found: structured pruning needs "
                                "nn.Linear or nn.Conv2d consumers whose inputs come from other layers' rows alone "
                                "(MLP hidden neurons, a residual block's inner channels) or from attention heads")
    _update_config(pruned, widths, kinds)
    if biases == "add" and hasattr(getattr(pruned, "config", None), "to_dict"):
        match_config_biases(pruned)
    settings = dict(method=method, fraction=fraction, units_of=list(units_of), allocation=allocation, cost=cost,
                    biases=biases, target=target, row_weights=row_weights, relative_damping=relative_damping,
                    max_swaps=max_swaps, blocks=[name for name, _ in found], batch_size=batch_size)
    return StructuredResult(pruned, widths, settings, stats, {"total": time.perf_counter() - started},
                            _left_dense(pruned, found, groups_of, units_of), kept_rows)


def _left_dense(model: nn.Module, found, groups_of: UnitGroups, units_of) -> dict:
    """Every nn.Linear and nn.Conv2d the prune did not shrink, with the reason."""
    members = {}
    for name, _ in found:
        for group in groups_of.of_block.get(name, []):
            for member in [group.consumer, *group.producers]:
                members[f"{name}.{member}".strip(".")] = group.kind
    outside = "outside the blocks (embeddings and the output head stay whole)"
    reasons = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and members.get(name) not in units_of:
            inside = any(name.startswith(f"{block}.") or not block for block, _ in found)
            reasons[name] = (f"its {members[name]} were not asked for" if name in members else
                             "in no unit group the probes found (a residual stream's channels feed several "
                             "consumers)" if inside else outside)
    return reasons


def _update_config(model: nn.Module, widths: dict, kinds: dict) -> None:
    """A Hugging Face config follows the shrunk widths when every block kept one width of each kind and the
    config held the old one (intermediate_size; num_attention_heads and num_key_value_heads, with head_dim made
    explicit). Other widths are left to the width map (models/shrunk.py)."""
    config = getattr(model, "config", None)
    if config is None:
        return
    neurons = [name for name in widths if kinds[name][0] == "neurons"]
    before, after = {widths[n][0] for n in neurons}, {widths[n][1] for n in neurons}
    if neurons and len(after) == 1 and before == {getattr(config, "intermediate_size", None)}:
        config.intermediate_size = after.pop()
    heads = {kinds[name][1:] for name in widths if kinds[name][0] == "heads"}
    if len(heads) == 1 and hasattr(config, "num_key_value_heads"):
        kv_heads, per_unit, columns = heads.pop()
        head_dim = columns // per_unit
        if getattr(config, "head_dim", None) in (None, head_dim):
            config.head_dim = head_dim
            config.num_attention_heads, config.num_key_value_heads = kv_heads * per_unit, kv_heads


@torch.no_grad()
def unit_totals(model: nn.Module, calibration, cost: str = "parameters", blocks=None) -> dict:
    """The `cost` of each kind of unit group in the blocks ('heads', 'neurons', 'channels'): parameters, or
    multiply-accumulates per input ('macs'); and the parameters of the blocks in all ('blocks'); found by the
    same probes as prune_structured on the first calibration batch. The model is left as it was."""
    cost = validation.choice("cost", cost, COSTS)
    totals = dict.fromkeys(UNIT_KINDS, 0)
    with evaluating(model):
        found = find_blocks(model, blocks)
        inputs = capture_block_inputs(model, found[0][1], model_calls(model, calibration, 8)[:1])
        groups_of = UnitGroups()
        for name, block in found:
            groups = groups_of(name, block, inputs, UNIT_KINDS)
            positions = Positions(block, groups)
            try:
                outputs = run_block(block, inputs)
            finally:
                positions.close()
            for group in groups:
                totals[group.kind] += group.units * (group.macs_per_unit(block, positions.per_input) if cost == "macs"
                                                     else group.parameters_per_unit(block))
            inputs = with_first(inputs, outputs)
    totals["blocks"] = sum(p.numel() for _, block in found for p in block.parameters())
    return totals
