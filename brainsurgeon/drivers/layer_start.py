"""The layer start of 'max': every prunable layer pruned on the layer-wise objective towards the dense model's
outputs, under the run's pattern (a global one as exact per-layer counts adding up to it), as a path beside the
Fisher stages."""
import re

from torch import nn

from .activations import check_chained, repeated_blocks
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
    """The layer start of 'max': every layer pruned towards the dense model's outputs (`admm`, exact counts adding
    up to the global one) block by block, each of the model's repeated blocks (a ResNet's residual blocks) then
    fitted to the dense block's output (tuning.layer_reconstruct); a model without repeated blocks is one block and
    is not fitted. Returns (its result, its stage report, the pruned model), or why the layer-wise driver cannot
    prune these layers."""
    layers, _ = find_prunable(model, plan.common["include"], plan.common["ignore"])
    blocker = layer_start_blocker(model, layers)
    if blocker is not None:
        return blocker
    fitted = pool.stage(0)
    pattern = plan.common["pattern"]
    per_layer = exact_layer_sparsities(layers, plan.sparsity) if pattern == "global" else plan.sparsity
    tuning = plan.tuning
    blocks, inside = _fitted_blocks(model, [layer.module for layer in layers], fitted[0], tuning)
    where = dict(blocks=[""], include=plan.common["include"], ignore=plan.common["ignore"])
    if blocks:
        where = dict(blocks=blocks, include=[f"^{re.escape(name)}$" for name in inside], ignore=(),
                     reconstruct=tuning.layer_reconstruct, reconstruct_epochs=tuning.layer_reconstruct_epochs,
                     reconstruct_step=tuning.layer_reconstruct_step)
    result = prune_layerwise(model, fitted[0], None if ":" in pattern else per_layer, "admm",
                             pattern="layer" if pattern == "global" else pattern, target="dense", **where,
                             batch_size=tuning.layer_start_batch, progress=False)
    staged = copy_model(model)
    result.apply(staged)
    if dense is not None:
        recalibrate(staged, dense, fitted[0], result)
    report = stage_report(staged, fitted, pool.held_out, plan.common["loss_fn"], plan.sparsity,
                           "admm (layer-wise, to dense)", result, 1, 1, progress, "layer")
    return result, [report], staged


def _fitted_blocks(model, layers, inputs, tuning) -> tuple:
    """(the names of the repeated blocks the layer start prunes one by one and reconstructs, the layers' names
    inside them), or ([], []) for the model as one block: no reconstruction asked, no repeated blocks, blocks that
    do not feed one another, or names inside the blocks that would pick other layers than `layers`."""
    if tuning.layer_reconstruct == "none":
        return [], []
    blocks = repeated_blocks(model, layers)
    if not blocks or not check_chained(model, blocks, ((inputs[: tuning.layer_start_batch],), {})):
        return [], []
    inside = sorted({layer[len(name) + 1:] for name, _ in blocks for layer in layers if layer.startswith(name + ".")})
    picked = {f"{name}.{local}" for name, block in blocks for local, _ in block.named_modules() if local in inside}
    if picked != set(layers):
        return [], []
    return [name for name, _ in blocks], inside
