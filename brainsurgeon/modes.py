"""A model's modes handed back as they were: eval mode for a computation, then every module's own train/eval mode
and the weights torch.nn.utils.prune computes (used by the curvature and the drivers alike)."""
from contextlib import contextmanager

from torch import nn


def computed_weights(model: nn.Module) -> list:
    """(module, name, tensor) of the weights torch.nn.utils.prune recomputes as plain attributes in a forward
    pre-hook: functional calls would leave them computed from the substituted tensors."""
    return [(module, name[: -len("_orig")], module.__dict__[name[: -len("_orig")]])
            for module in model.modules() for name, _ in module.named_parameters(recurse=False)
            if name.endswith("_orig") and name[: -len("_orig")] in module.__dict__]


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (BatchNorm on running statistics, no dropout) for the block, then the model as it was handed
    over: every module's own train/eval mode, and the weights torch.nn.utils.prune computes."""
    modes = [(module, module.training) for module in model.modules()]
    computed = computed_weights(model)
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training
        for module, name, tensor in computed:
            setattr(module, name, tensor)
