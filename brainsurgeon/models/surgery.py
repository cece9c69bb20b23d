"""Units found from the model, and the surgery that removes them: modules replaced by smaller ones.

A consumer nn.Linear's input column j is a *unit* when it is produced by rows j of other nn.Linear layers of the
same block and by nothing else: zeroing those rows (weights and bias) zeroes exactly column j of the consumer's
input, and leaves the block's output equal to the block run with that column forced to zero. Both are checked by
probing the block on calibration inputs, so no architecture is named: a Llama MLP's hidden neuron (gate and up
rows, down_proj column) and a GPT-2 or BERT MLP's (fc1 row, fc2 column) are found the same way. Attention heads
are not units of this kind (their q and k rows do not zero anything) and stay for later; a value channel, which
is one, is ruled out by a trial removal on a copy of the block, whose attention code reshapes by the head width.
"""
import copy
from dataclasses import dataclass

import torch
from torch import nn

PROBE_COLUMNS = 3  # columns zeroed at once by a probe: any shared producer row shows up in one of them


@dataclass
class UnitGroup:
    """The units of one consumer: its input columns, each with the producers' rows of the same index."""

    consumer: str  # module name inside the block
    producers: list  # module names whose output rows are the units


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


@torch.no_grad()
def find_unit_groups(block: nn.Module, args, kwargs, tolerance: float = 1e-6) -> list:
    """Every consumer nn.Linear of `block` whose input columns are units (module docstring), with their producers,
    found by probing the block on one captured call (args, kwargs)."""
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
        if producers and _removal_is_exact(block, linears, consumer, producers, probe, args, kwargs, dense_output):
            group = UnitGroup(consumer_name, producers)
            if _shrinks(block, group, probe, consumer, args, kwargs):
                groups.append(group)
    return groups


def _shrinks(block, group: UnitGroup, probe, consumer, args, kwargs) -> bool:
    """The block still runs, and gives the zeroed block's output, with the probed units physically removed from a
    copy: a layout the block's code assumes (an attention head's width in a reshape) rules the group out."""
    def zero_columns(module, inputs):
        x = inputs[0].clone()
        x[..., probe] = 0
        return (x, *inputs[1:])

    handle = consumer.register_forward_pre_hook(zero_columns)
    try:
        expected = _output_of(block, args, kwargs)
    finally:
        handle.remove()
    trial = copy.deepcopy(block)
    kept = torch.ones(consumer.in_features, dtype=torch.bool)
    kept[probe] = False
    kept = torch.nonzero(kept).squeeze(1)
    remove_units(trial, group, kept, consumer.weight[:, kept])
    try:
        actual = _output_of(trial, args, kwargs)
    except (RuntimeError, ValueError):
        return False
    scale = float(expected.abs().max()) or 1.0
    return actual.shape == expected.shape and bool((actual - expected).abs().max() <= 1e-5 * scale)


def _removal_is_exact(block, linears, consumer, producers, probe, args, kwargs, dense_output) -> bool:
    """The block with the producers' rows zeroed equals the block with the consumer's probed columns zeroed: the
    rows feed nothing else."""
    def zero_columns(module, inputs):
        x = inputs[0].clone()
        x[..., probe] = 0
        return (x, *inputs[1:])

    handle = consumer.register_forward_pre_hook(zero_columns)
    try:
        expected = _output_of(block, args, kwargs)
    finally:
        handle.remove()
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
    """Replace the group's producers by nn.Linear layers with only the `kept` rows, and its consumer by one with
    only the kept input columns, whose weights are `consumer_weight` (rows x len(kept): the refit, or the kept
    columns as they were)."""
    for name in group.producers:
        module = block.get_submodule(name)
        _replace(block, name, _smaller_linear(module, module.weight[kept],
                                              None if module.bias is None else module.bias[kept]))
    consumer = block.get_submodule(group.consumer)
    _replace(block, group.consumer, _smaller_linear(consumer, consumer_weight.to(consumer.weight.dtype), consumer.bias))
