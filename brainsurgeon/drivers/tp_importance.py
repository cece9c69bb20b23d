"""Torch-Pruning's default importance of a unit group, computed by Torch-Pruning itself (the 'tp' baseline).

Torch-Pruning (PyPI torch-pruning, the DepGraph line) traces which layers a channel couples and ranks channels by
GroupMagnitudeImportance: the mean over the coupled layers of each channel's squared L2 norm, the filter, its
BatchNorm scale and the consumer's input slice alike. Its dependency graph is built on the block with the block's
own call, and the group asked for is the one of the unit group's first producer's output channels, so the
coupling is Torch-Pruning's, checked against the probes' producers and consumer. Optional: the 'structured' extra.
"""
import torch
from torch import nn

from ..errors import BrainSurgeonError
from ..models.surgery import BATCHNORM, UnitGroup


def _torch_pruning():
    try:
        import torch_pruning
    except ImportError as error:
        raise BrainSurgeonError("structured method 'tp' needs Torch-Pruning: pip install 'brainsurgeon[structured]' "
                                f"(or pip install torch-pruning); {error}") from None
    return torch_pruning


def torch_pruning_scores(block: nn.Module, group: UnitGroup, args, kwargs) -> torch.Tensor:
    """One score per unit of `group` (a channel or neuron group of one column per unit per producer row), from
    Torch-Pruning's GroupMagnitudeImportance on its own dependency graph of `block` run on (args, kwargs)."""
    tp = _torch_pruning()
    if group.kind == "heads":
        raise BrainSurgeonError("structured method 'tp' ranks channels and neurons; choose another method for heads")
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(block, example_inputs=(args, kwargs),
                                                      forward_fn=lambda module, call: module(*call[0], **call[1]))
    root_name = next(name for name, module in ((n, block.get_submodule(n)) for n in group.producers)
                     if not isinstance(module, BATCHNORM))
    root = block.get_submodule(root_name)
    prune_out = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
    coupled = graph.get_pruning_group(root, prune_out, idxs=list(range(group.units)))
    names = {module: name for name, module in block.named_modules()}
    members = {names[module] for module in (dependency.target.module for dependency, _ in coupled)
               if module in names}  # the rest are Torch-Pruning's nodes for functions (a ReLU, an addition)
    expected = {group.consumer, *group.producers}
    if members != expected:
        raise BrainSurgeonError(f"Torch-Pruning couples {sorted(map(str, members))} where the probes found "
                                f"{sorted(expected)}; choose another structured method for this model")
    with torch.no_grad():
        return tp.importance.GroupMagnitudeImportance()(coupled).double()
