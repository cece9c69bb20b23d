"""The layer start of 'max': every prunable layer pruned on the layer-wise objective towards the dense model's
outputs, under the run's pattern (a global one as exact per-layer counts adding up to it), as a path beside the
Fisher stages."""
from torch import nn

from .allocation import exact_layer_sparsities
from .layers import copy_model, find_prunable
from .schedule import recalibrate, stage_report
from .sequential import prune_layerwise, unprunable_layer


def layer_start_blocker(model: nn.Module, layers) -> str | None:
    """Why the layer-wise start cannot prune these layers (None when it can)."""
    modules = dict(model.named_modules())
    for layer in layers:
        why = unprunable_layer(modules[layer.module], layer)
        if why:
            return f"{layer.module}: {why}"
    return None


def layer_start(model, pool, plan, dense, progress):
    """The layer start of 'max': every layer pruned towards the dense model's outputs (`admm`, the model as one
    block, exact counts adding up to the global one): (its result, its stage report, the pruned model), or why
    the layer-wise driver cannot prune these layers."""
    layers, _ = find_prunable(model, plan.common["include"], plan.common["ignore"])
    blocker = layer_start_blocker(model, layers)
    if blocker is not None:
        return blocker
    fitted = pool.stage(0)
    pattern = plan.common["pattern"]
    per_layer = exact_layer_sparsities(layers, plan.sparsity) if pattern == "global" else plan.sparsity
    result = prune_layerwise(model, fitted[0], None if ":" in pattern else per_layer, "admm",
                             pattern="layer" if pattern == "global" else pattern, target="dense", blocks=[""],
                             include=plan.common["include"],
                             ignore=plan.common["ignore"], batch_size=plan.tuning.layer_start_batch, progress=False)
    staged = copy_model(model)
    result.apply(staged)
    if dense is not None:
        recalibrate(staged, dense, fitted[0], result)
    report = stage_report(staged, fitted, pool.held_out, plan.common["loss_fn"], plan.sparsity,
                           "admm (layer-wise, to dense)", result, 1, 1, progress, "layer")
    return result, [report], staged
