"""Units found from the model, and the surgery that removes them: modules replaced by smaller ones.

A consumer nn.Linear's input column j is a *unit* when it is produced by rows j of other nn.Linear layers of the
same block and by nothing else: zeroing those rows (weights and bias) zeroes exactly column j of the consumer's
input, and leaves the block's output equal to the block run with that column forced to zero. Both are checked by
probing the block on calibration inputs, so no architecture is named: a Llama MLP's hidden neuron (gate and up
rows, down_proj column) and a GPT-2 or BERT MLP's (fc1 row, fc2 column) are found the same way. A value channel,
which is one too, is ruled out by a trial removal on a copy of the block, whose attention code reshapes by the
head width. A consumer nn.Conv2d's input channel is a unit the same way, its weight's columns being the channel's
kernel taps: the producers are every layer whose row j changes channel j of the consumer's input and no other
(a convolution's filter, the BatchNorm after it, whose scale and shift are its row), and at least one of them
zeroes it. A channel of a residual stream, read by several consumers, is no unit of one consumer and stays whole.

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
BATCHNORM = nn.modules.batchnorm._BatchNorm


def width_in(module: nn.Module) -> int:
    """A consumer's input width: features, or channels of a convolution."""
    return module.in_channels if isinstance(module, nn.Conv2d) else module.in_features


def width_out(module: nn.Module) -> int:
    """A producer's rows: output features or channels, or a BatchNorm's channels."""
    if isinstance(module, nn.Conv2d):
        return module.out_channels
    return module.num_features if isinstance(module, BATCHNORM) else module.out_features


def matrix_of(module: nn.Module) -> torch.Tensor:
    """A consumer's weight as the objective's matrix, rows x columns (a convolution unfolded, channel-major)."""
    return module.weight.reshape(module.weight.shape[0], -1)


def _channels(x: torch.Tensor, consumer: nn.Module, index):
    """`x`'s channels `index` as the consumer reads them: dim 1 of an image batch, else the last dim."""
    return x[:, index] if isinstance(consumer, nn.Conv2d) else x[..., index]


def _layers(block: nn.Module) -> dict:
    """The block's consumers and producers: nn.Linear, nn.Conv2d (not grouped) and affine BatchNorm layers."""
    return {name: module for name, module in block.named_modules()
            if isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)
            or (isinstance(module, BATCHNORM) and module.affine)}


@dataclass
class UnitGroup:
    """The units of one consumer: each unit is some of its input columns and some rows of each producer."""

    consumer: str  # module name inside the block
    producers: dict  # module name -> the rows of each unit (units x rows per unit)
    columns: torch.Tensor  # the consumer's input columns of each unit (units x columns per unit)
    kind: str = "neurons"  # "heads": key-value groups of attention heads; "channels": a convolution's inputs
    heads_per_unit: int = 0  # for heads: the query heads of one unit

    @property
    def units(self) -> int:
        return len(self.columns)

    def parameters_per_unit(self, block: nn.Module) -> int:
        """The weights (and biases) one unit removes: its producers' rows and its consumer columns."""
        count = self.columns.shape[1] * block.get_submodule(self.consumer).weight.shape[0]
        for name, rows in self.producers.items():
            module = block.get_submodule(name)
            per_row = 0 if isinstance(module, BATCHNORM) else module.weight[0].numel()
            count += rows.shape[1] * (per_row + (module.bias is not None))
        return count

    def macs_per_unit(self, block: nn.Module, positions: dict) -> int:
        """The multiply-accumulates per input one unit removes, given at how many `positions` per input each member
        applies its weights (a convolution's output pixels; a BatchNorm's scaling is not counted)."""
        count = self.columns.shape[1] * block.get_submodule(self.consumer).weight.shape[0] * positions[self.consumer]
        for name, rows in self.producers.items():
            module = block.get_submodule(name)
            if not isinstance(module, BATCHNORM):
                count += rows.shape[1] * module.weight[0].numel() * positions[name]
        return count

    def rows_of(self, name: str, kept: torch.Tensor) -> torch.Tensor:
        return self.producers[name][kept].flatten()

    def columns_of(self, kept: torch.Tensor) -> torch.Tensor:
        return self.columns[kept].flatten()


def neuron_group(consumer: str, producers: list, width: int, taps: int = 0) -> UnitGroup:
    """Units of one input feature each, with the producers' rows of the same index; or, given the `taps` of a
    convolution's kernel, units of one input channel, each that many columns of the unfolded weight."""
    each = torch.arange(width).unsqueeze(1)
    if not taps:
        return UnitGroup(consumer, {name: each for name in producers}, each)
    return UnitGroup(consumer, {name: each for name in producers}, torch.arange(width * taps).reshape(width, taps),
                     "channels")


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


def _zeroed_rows(module: nn.Module, rows: torch.Tensor):
    saved = (module.weight.data[rows].clone(), None if module.bias is None else module.bias.data[rows].clone())
    module.weight.data[rows] = 0
    if module.bias is not None:
        module.bias.data[rows] = 0
    return saved


def _restore_rows(module: nn.Module, rows: torch.Tensor, saved) -> None:
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
    """Every consumer nn.Linear or nn.Conv2d of `block` whose inputs are units (module docstring), with their
    producers, found by probing the block on the first sequence of one captured call (args, kwargs)."""
    args, kwargs = sequence_of(args, kwargs)
    layers = _layers(block)
    groups = []
    for consumer_name, consumer in layers.items():
        if isinstance(consumer, BATCHNORM):
            continue
        width = width_in(consumer)
        probe = torch.randperm(width, generator=torch.Generator().manual_seed(width))[:PROBE_COLUMNS]
        others = torch.ones(width, dtype=torch.bool)
        others[probe] = False
        reference, dense_output = _consumer_input(block, consumer, args, kwargs)
        if _channels(reference, consumer, probe).abs().max() == 0:
            continue  # the probed columns carry nothing: no evidence either way
        producers, zeroing = [], False
        for name, module in layers.items():
            if name == consumer_name or width_out(module) != width:
                continue
            saved = _zeroed_rows(module, probe)
            try:
                changed, _ = _consumer_input(block, consumer, args, kwargs)
            finally:
                _restore_rows(module, probe, saved)
            probed = _channels(changed, consumer, probe)
            untouched = torch.allclose(_channels(changed, consumer, others), _channels(reference, consumer, others),
                                       rtol=1e-5, atol=1e-6)
            if untouched and not torch.equal(probed, _channels(reference, consumer, probe)):
                producers.append(name)
                zeroing |= bool(probed.abs().max() <= tolerance * reference.abs().max())
        if producers and zeroing:
            expected = _with_columns_zeroed(block, consumer, probe, args, kwargs)
            taps = matrix_of(consumer).shape[1] // width if isinstance(consumer, nn.Conv2d) else 0
            group = neuron_group(consumer_name, producers, width, taps)
            if (_removal_is_exact(block, layers, producers, probe, args, kwargs, expected, dense_output)
                    and _shrinks(block, group, probe, consumer, args, kwargs, expected)):
                groups.append(group)
                continue
        if not isinstance(consumer, nn.Linear):
            continue
        linears = {name: module for name, module in layers.items() if isinstance(module, nn.Linear)}
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
    """The block's output with the consumer's input `columns` (features or channels) forced to zero."""
    def zero_columns(module, inputs):
        x = inputs[0].clone()
        if isinstance(module, nn.Conv2d):
            x[:, columns] = 0
        else:
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
    remove_units(trial, group, kept, matrix_of(consumer)[:, group.columns_of(kept)])
    try:
        actual = _output_of(trial, args, kwargs)
    except (RuntimeError, ValueError):
        return False
    scale = float(expected.abs().max()) or 1.0
    return actual.shape == expected.shape and bool((actual - expected).abs().max() <= 1e-5 * scale)


def _removal_is_exact(block, layers, producers, probe, args, kwargs, expected, dense_output) -> bool:
    """The block with the producers' rows zeroed equals `expected`, the block with the consumer's probed columns
    zeroed: the rows feed nothing else."""
    saved = [_zeroed_rows(layers[name], probe) for name in producers]
    try:
        actual = _output_of(block, args, kwargs)
    finally:
        for name, rows in zip(producers, saved):
            _restore_rows(layers[name], probe, rows)
    scale = float(dense_output.abs().max()) or 1.0
    return bool((actual - expected).abs().max() <= 1e-5 * scale)


@torch.no_grad()
def output_scales(block: nn.Module, consumer: str, args, kwargs):
    """gamma / sqrt(running var + eps) per output channel of the BatchNorm (in eval mode) that takes the consumer's
    output as it is, or None when none does: the factor by which an error in the consumer's output reaches the
    stream after it."""
    norms = [norm for norm in block.modules()
             if isinstance(norm, BATCHNORM) and norm.track_running_stats and not norm.training]
    if not norms:
        return None  # nothing to probe for: a transformer block's forward is not run
    module, produced, found = block.get_submodule(consumer), [], []

    def keep(_, __, output):
        produced.append(output)

    def check(norm):
        def hook(_, inputs):
            if produced and inputs[0] is produced[-1]:
                found.append(norm)
        return hook

    handles = [module.register_forward_hook(keep)]
    handles += [norm.register_forward_pre_hook(check(norm)) for norm in norms]
    try:
        block(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    if not found:
        return None
    norm = found[0]
    scale = torch.rsqrt(norm.running_var.double() + norm.eps)
    return scale * norm.weight.detach().double() if norm.affine else scale


def _smaller_linear(module: nn.Linear, weight: torch.Tensor, bias) -> nn.Linear:
    smaller = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device,
                        dtype=module.weight.dtype)
    smaller.weight.data.copy_(weight)
    if bias is not None:
        smaller.bias.data.copy_(bias)
    return smaller


def _smaller(module: nn.Module, rows: torch.Tensor) -> nn.Module:
    """A producer with only `rows` (output features or channels; a BatchNorm's entries and statistics)."""
    if isinstance(module, nn.Linear):
        return _smaller_linear(module, module.weight[rows], None if module.bias is None else module.bias[rows])
    smaller = copy.deepcopy(module)
    for name, value in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
        if value is not None and value.dim() and value.shape[0] == width_out(module):
            kept = value.detach()[rows].clone()
            setattr(smaller, name, nn.Parameter(kept, value.requires_grad) if name in module._parameters else kept)
    if isinstance(module, nn.Conv2d):
        smaller.out_channels = len(rows)
    else:
        smaller.num_features = len(rows)
    return smaller


def _smaller_consumer(module: nn.Module, matrix: torch.Tensor, bias=None) -> nn.Module:
    """The consumer with the kept columns' weights `matrix` (rows x kept columns, a convolution's unfolded), and
    `bias` when given (added where the consumer had none), else its own."""
    bias = module.bias if bias is None else bias.to(module.weight.dtype)
    if isinstance(module, nn.Linear):
        return _smaller_linear(module, matrix, bias)
    smaller = copy.deepcopy(module)
    taps = module.weight[0, 0].numel()
    smaller.in_channels = matrix.shape[1] // taps
    smaller.weight = nn.Parameter(matrix.reshape(module.out_channels, -1, *module.kernel_size).contiguous())
    smaller.bias = None if bias is None else nn.Parameter(bias.detach().clone())
    return smaller


def _replace(block: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(block.get_submodule(parent_name) if parent_name else block, child, module)


@torch.no_grad()
def remove_units(block: nn.Module, group: UnitGroup, kept: torch.Tensor, consumer_weight: torch.Tensor,
                 consumer_bias: torch.Tensor = None) -> None:
    """Replace the group's producers by layers of their kind with only the `kept` units' rows, and its consumer by
    one with only their input columns, whose weights are `consumer_weight` (rows x kept columns: the refit, or
    the kept columns as they were) and whose bias is `consumer_bias` (its own when None)."""
    for name in group.producers:
        _replace(block, name, _smaller(block.get_submodule(name), group.rows_of(name, kept)))
    consumer = block.get_submodule(group.consumer)
    _replace(block, group.consumer, _smaller_consumer(consumer, consumer_weight.to(consumer.weight.dtype),
                                                      consumer_bias))
