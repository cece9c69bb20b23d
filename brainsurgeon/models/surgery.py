"""Units found from the model, and the surgery that removes them: modules replaced by smaller ones.

A consumer nn.Linear's input column j is a *unit* when it is produced by rows j of other nn.Linear layers of the
same block and by nothing else: zeroing those rows (weights and bias) zeroes exactly column j of the consumer's
input, and leaves the block's output equal to the block run with that column forced to zero. Both are checked by
probing the block on calibration inputs, so no architecture is named: a Llama MLP's hidden neuron (gate and up
rows, down_proj column) and a GPT-2 or BERT MLP's (fc1 row, fc2 column) are found the same way. A value channel,
which is one too, is ruled out by a trial removal on a copy of the block, whose attention code reshapes by the
head width.

Attention heads are units of another shape, found by probing one row of each other layer: a value row zeroes
the consumer (o_proj) columns of every query head that reads it, n_rep columns head_dim apart; a query row
changes its head's head_dim columns and nothing else; a key row changes the columns of every query head of its
group. From those, a unit is a key-value group: its query heads' q rows and consumer columns, its k and v rows
(with grouped-query attention, the group and all its query heads go together, so the block's ratio of query to
key-value heads stays). A trial removal on a copy confirms the block runs and is exact without one.
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn

PROBE_COLUMNS = 3  # columns zeroed at once by a probe: any shared producer row shows up in one of them


@dataclass
class UnitGroup:
    """The units of one consumer: each unit is some of its input columns and some rows of each producer."""

    consumer: str  # module name inside the block
    producers: dict  # module name -> the rows of each unit (units x rows per unit)
    columns: torch.Tensor  # the consumer's input columns of each unit (units x columns per unit)
    kind: str = "neurons"  # or "heads": key-value groups of attention heads
    heads_per_unit: int = 0  # for heads: the query heads of one unit

    @property
    def units(self) -> int:
        return len(self.columns)

    def parameters_per_unit(self, block: nn.Module) -> int:
        """The weights (and biases) one unit removes: its producers' rows and its consumer columns."""
        count = self.columns.shape[1] * block.get_submodule(self.consumer).out_features
        for name, rows in self.producers.items():
            module = block.get_submodule(name)
            count += rows.shape[1] * (module.in_features + (module.bias is not None))
        return count

    def rows_of(self, name: str, kept: torch.Tensor) -> torch.Tensor:
        return self.producers[name][kept].flatten()

    def columns_of(self, kept: torch.Tensor) -> torch.Tensor:
        return self.columns[kept].flatten()


def neuron_group(consumer: str, producers: list, width: int) -> UnitGroup:
    """Units of one column each, with the producers' rows of the same index."""
    each = torch.arange(width).unsqueeze(1)
    return UnitGroup(consumer, {name: each for name in producers}, each)


def _output_of(block, args, kwargs):
    out = block(*args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _consumer_input(block, consumer: nn.Module, args, kwargs):
    captured = {}
    handle = consumer.register_forward_pre_hook(lambda module, inputs: captured.__setitem__("x", inputs[0].detach()))
    try:
        output = _output_of(block, args, kwargs)
    finally:
        handle.remove()
    return captured["x"], output.detach()


def _zeroed_rows(module: nn.Linear, rows: torch.Tensor):
    saved = (module.weight.data[rows].clone(), None if module.bias is None else module.bias.data[rows].clone())
    module.weight.data[rows] = 0
    if module.bias is not None:
        module.bias.data[rows] = 0
    return saved


def _restore_rows(module: nn.Linear, rows: torch.Tensor, saved) -> None:
    module.weight.data[rows] = saved[0]
    if module.bias is not None:
        module.bias.data[rows] = saved[1]


def sequence_of(args, kwargs, row: int = 0) -> tuple:
    """The call cut to one sequence: every tensor whose leading size is the batch's (the hidden states' or token
    ids', an attention mask's) keeps its row `row`, and the rest (broadcast position tables, flags) is left as it
    is. The probes need one sequence, not a batch."""
    batch = args[0].shape[0] if args and torch.is_tensor(args[0]) and args[0].dim() > 1 else None

    def cut(value):
        if torch.is_tensor(value) and value.dim() > 1 and value.shape[0] == batch:
            return value[row:row + 1]
        if isinstance(value, (tuple, list)):
            return type(value)(cut(v) for v in value)
        return value

    return (cut(tuple(args)), {key: cut(value) for key, value in kwargs.items()}) if batch else (args, kwargs)


@torch.no_grad()
def find_unit_groups(block: nn.Module, args, kwargs, tolerance: float = 1e-6) -> list:
    """Every consumer nn.Linear of `block` whose input columns are units (module docstring), with their producers,
    found by probing the block on the first sequence of one captured call (args, kwargs)."""
    args, kwargs = sequence_of(args, kwargs)
    linears = {name: module for name, module in block.named_modules() if isinstance(module, nn.Linear)}
    groups = []
    for consumer_name, consumer in linears.items():
        width = consumer.in_features
        probe = torch.randperm(width, generator=torch.Generator().manual_seed(width))[:PROBE_COLUMNS]
        others = torch.ones(width, dtype=torch.bool)
        others[probe] = False
        reference, dense_output = _consumer_input(block, consumer, args, kwargs)
        if reference[..., probe].abs().max() == 0:
            continue  # the probed columns carry nothing: no evidence either way
        producers = []
        for name, module in linears.items():
            if name == consumer_name or module.out_features != width:
                continue
            saved = _zeroed_rows(module, probe)
            try:
                changed, _ = _consumer_input(block, consumer, args, kwargs)
            finally:
                _restore_rows(module, probe, saved)
            zeroed = changed[..., probe].abs().max() <= tolerance * reference.abs().max()
            untouched = torch.allclose(changed[..., others], reference[..., others], rtol=1e-5, atol=1e-6)
            if zeroed and untouched:
                producers.append(name)
        if producers:
            expected = _with_columns_zeroed(block, consumer, probe, args, kwargs)
            group = neuron_group(consumer_name, producers, width)
            if (_removal_is_exact(block, linears, producers, probe, args, kwargs, expected, dense_output)
                    and _shrinks(block, group, probe, consumer, args, kwargs, expected)):
                groups.append(group)
                continue
        group = _head_group(block, linears, consumer_name, reference, args, kwargs, tolerance)
        if group is not None:
            expected = _with_columns_zeroed(block, consumer, group.columns_of(torch.tensor([0])), args, kwargs)
            if _shrinks(block, group, torch.tensor([0]), consumer, args, kwargs, expected):
                groups.append(group)
    return groups


def _row_effect(block, consumer, module, reference, args, kwargs, tolerance) -> tuple:
    """The consumer's input columns that zeroing row 0 of `module` changes, and those it sets to exactly zero."""
    saved = _zeroed_rows(module, torch.tensor([0]))
    try:
        changed, _ = _consumer_input(block, consumer, args, kwargs)
    finally:
        _restore_rows(module, torch.tensor([0]), saved)
    scale = tolerance * float(reference.abs().max())
    flat, before = changed.flatten(0, -2), reference.flatten(0, -2)
    differs = ((flat - before).abs() > scale).any(0)
    return differs, differs & (flat.abs() <= scale).all(0)


def _head_group(block, linears, consumer_name, reference, args, kwargs, tolerance):
    """The consumer's key-value groups of attention heads (module docstring), or None when the probes do not show
    that layout."""
    consumer = linears[consumer_name]
    width = consumer.in_features
    values, changers = [], []
    for name, module in linears.items():
        if name == consumer_name or width % module.out_features:
            continue
        differs, zeroed = _row_effect(block, consumer, module, reference, args, kwargs, tolerance)
        changed = torch.nonzero(differs).squeeze(1)
        if not len(changed):
            continue
        if torch.equal(differs, zeroed):
            values.append((name, changed))
        elif torch.equal(changed, torch.arange(len(changed))):  # a query or key row: its heads' columns
            changers.append((name, len(changed)))
        else:
            return None
    if len(values) != 1 or not changers:
        return None
    (value, zeroed), head_dim = values[0], min(count for _, count in changers)
    kv_width, heads_per_unit = linears[value].out_features, len(zeroed)
    if kv_width % head_dim or not torch.equal(zeroed, torch.arange(heads_per_unit) * head_dim):
        return None
    units = kv_width // head_dim
    if units < 2 or width != units * heads_per_unit * head_dim or any(
            count not in (head_dim, heads_per_unit * head_dim) or linears[name].out_features % units
            for name, count in changers):
        return None
    producers = {name: torch.arange(linears[name].out_features).reshape(units, -1)
                 for name in [value] + [name for name, _ in changers]}
    return UnitGroup(consumer_name, producers, torch.arange(width).reshape(units, -1), "heads", heads_per_unit)


def _with_columns_zeroed(block, consumer, columns, args, kwargs):
    """The block's output with the consumer's input `columns` forced to zero."""
    def zero_columns(module, inputs):
        x = inputs[0].clone()
        x[..., columns] = 0
        return (x, *inputs[1:])

    handle = consumer.register_forward_pre_hook(zero_columns)
    try:
        return _output_of(block, args, kwargs)
    finally:
        handle.remove()


def _shrinks(block, group: UnitGroup, probe_units, consumer, args, kwargs, expected) -> bool:
    """The block still runs, and gives `expected` (its output with the probed units' columns zeroed), with the
    probed units physically removed from a copy: a layout the block's code assumes (an attention head's width in
    a reshape) rules the group out."""
    trial = copy.deepcopy(block)
    kept = torch.ones(group.units, dtype=torch.bool)
    kept[probe_units] = False
    kept = torch.nonzero(kept).squeeze(1)
    remove_units(trial, group, kept, consumer.weight[:, group.columns_of(kept)])
    try:
        actual = _output_of(trial, args, kwargs)
    except (RuntimeError, ValueError):
        return False
    scale = float(expected.abs().max()) or 1.0
    return actual.shape == expected.shape and bool((actual - expected).abs().max() <= 1e-5 * scale)


def _removal_is_exact(block, linears, producers, probe, args, kwargs, expected, dense_output) -> bool:
    """The block with the producers' rows zeroed equals `expected`, the block with the consumer's probed columns
    zeroed: the rows feed nothing else."""
    saved = [_zeroed_rows(linears[name], probe) for name in producers]
    try:
        actual = _output_of(block, args, kwargs)
    finally:
        for name, rows in zip(producers, saved):
            _restore_rows(linears[name], probe, rows)
    scale = float(dense_output.abs().max()) or 1.0
    return bool((actual - expected).abs().max() <= 1e-5 * scale)


def _smaller_linear(module: nn.Linear, weight: torch.Tensor, bias) -> nn.Linear:
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                        dtype=module.weight.dtype)
    smaller.weight.data.copy_(weight)
    if bias is not None:
        smaller.bias.data.copy_(bias)
    return smaller


def _replace(block: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, module)


@torch.no_grad()
def remove_units(block: nn.Module, group: UnitGroup, kept: torch.Tensor, consumer_weight: torch.Tensor) -> None:
    """Replace the group's producers by nn.Linear layers with only the `kept` units' rows, and its consumer by one
    with only their input columns, whose weights are `consumer_weight` (rows x kept columns: the refit, or the
    kept columns as they were)."""
    for name in group.producers:
        module, rows = block.get_submodule(name), group.rows_of(name, kept)
        _replace(block, name, _smaller_linear(module, module.weight[rows],
                                              None if module.bias is None else module.bias[rows]))
    consumer = block.get_submodule(group.consumer)
    _replace(block, group.consumer, _smaller_linear(consumer, consumer_weight.to(consumer.weight.dtype), consumer.bias))
