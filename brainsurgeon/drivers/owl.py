"""OWL's per-block sparsities (Yin et al., ICML 2024), the baseline allocation of the layer-wise driver (issue 24).

OWL gives blocks with more outlier weights a lower sparsity. On the dense model, each block's layers are scored as
Wanda scores them, |W_ij| ||X_j||, all of the block's scores pooled; the block's outlier ratio is the fraction above
`outlier_multiple` times their mean. The ratios are mapped linearly onto [0, 2 `spread`], centred, and each
block's density is 1 - sparsity plus its centred value. The published rule is M = 5, lambda = 0.08.

The sparsities are then turned into whole counts per layer that add up to exactly round(sparsity x all the
pruned weights) (largest remainders), so the global count is the one asked for.
"""
import math

import torch

from .. import validation
from ..errors import BrainSurgeonError
from ..methods.budget import num_to_prune
from ..modes import evaluating
from .activations import (
    capture_block_inputs,
    layer_inputs,
    model_calls,
    run_block,
    with_first,
)

OUTLIER_MULTIPLE = 5.0  # OWL's M
SPREAD = 0.08  # OWL's lambda


def input_norms(model, calibration, per_block, blocks, batch_size: int = 8) -> list:
    """On the dense model, each pruned layer's input column norms ||X_j|| (Wanda's), one {module name: norms} per
    block. `per_block`: the pruned layers of each block as (module name, full name, ...)
    (sequential.plan_layerwise)."""
    norms = []
    with torch.no_grad(), evaluating(model):
        inputs = capture_block_inputs(model, blocks[0][1], model_calls(model, calibration, batch_size))
        for (_, block), layers in zip(blocks, per_block):
            modules = {name: block.get_submodule(name) for name, *_ in layers}
            squares = dict.fromkeys(modules, 0.0)

            def record(name):
                def hook(module, args, output):
                    squares[name] = squares[name] + layer_inputs(module, args[0].detach()).double().pow(2).sum(0)
                return hook

            handles = [module.register_forward_hook(record(name)) for name, module in modules.items()]
            try:
                outputs = run_block(block, inputs)
            finally:
                for handle in handles:
                    handle.remove()
            norms.append({name: torch.as_tensor(squares[name]).sqrt() for name in modules})
            inputs = with_first(inputs, outputs)
    return norms


def wanda_scores(module, norms: torch.Tensor) -> torch.Tensor:
    """|W_ij| ||X_j||, rows x inputs."""
    return module.weight.detach().double().flatten(1).abs() * norms


def outlier_ratios(model, calibration, per_block, blocks, outlier_multiple: float = OUTLIER_MULTIPLE,
                   batch_size: int = 8) -> list:
    """Each block's outlier ratio on the dense model: the fraction of its layers' Wanda scores |W_ij| ||X_j||
    above `outlier_multiple` times their mean."""
    ratios = []
    for (_, block), block_norms in zip(blocks, input_norms(model, calibration, per_block, blocks, batch_size)):
        scores = torch.cat([wanda_scores(block.get_submodule(name), norms).flatten()
                            for name, norms in block_norms.items()])
        ratios.append(float((scores > outlier_multiple * scores.mean()).double().mean()) if len(scores) else 0.0)
    return ratios


def block_sparsities(ratios: list, sparsity: float, spread: float = SPREAD) -> list:
    """OWL's rule: the ratios mapped onto [0, 2 spread], centred, subtracted from `sparsity`."""
    ratios = torch.tensor(ratios, dtype=torch.float64)
    width = float(ratios.max() - ratios.min())
    scaled = (ratios - ratios.min()) / width * 2 * spread if width > 0 else torch.zeros_like(ratios)
    return (sparsity - (scaled - scaled.mean())).tolist()


def exact_counts(sparsities: dict, sizes: dict, sparsity: float) -> dict:
    """Per-layer sparsities whose counts add up to exactly round(sparsity x sum(sizes)): the sparsities shifted
    by one constant to that total (blocks of unequal sizes move the weighted mean), each layer's count the floor of
    its share, and the layers with the largest remainders one more."""
    total = num_to_prune(sparsity, sum(sizes.values()))
    shift = (total - sum(sparsities[name] * sizes[name] for name in sizes)) / sum(sizes.values())
    wanted = {name: (sparsities[name] + shift) * sizes[name] for name in sizes}
    if any(not 0 <= value <= size - 1 for value, size in zip(wanted.values(), sizes.values())):
        raise BrainSurgeonError(f"the chosen sparsities around {sparsity:g} leave a layer with every weight or none "
                                "pruned; lower the sparsity (or OWL's spread)")
    counts = {name: math.floor(value) for name, value in wanted.items()}
    by_remainder = sorted(sizes, key=lambda name: wanted[name] - counts[name], reverse=True)
    for name in by_remainder[: total - sum(counts.values())]:
        counts[name] += 1
    return {name: counts[name] / sizes[name] for name in sizes}


def owl_allocation(model, calibration, sparsity: float, per_block, blocks, outlier_multiple: float = OUTLIER_MULTIPLE,
                   spread: float = SPREAD, batch_size: int = 8) -> dict:
    """{layer full name: sparsity} by OWL's rule, with the global count exact (module docstring)."""
    sparsity = validation.sparsity(sparsity)
    outlier_multiple = validation.positive("outlier_multiple", outlier_multiple)
    spread = validation.number("spread", spread, low=0, high=min(sparsity, 1 - sparsity))
    ratios = outlier_ratios(model, calibration, per_block, blocks, outlier_multiple, batch_size)
    per_block_sparsity = block_sparsities(ratios, sparsity, spread)
    modules = dict(model.named_modules())
    sizes = {full: modules[full].weight.numel() for layers in per_block for _, full, *_ in layers}
    wanted = {full: value for value, layers in zip(per_block_sparsity, per_block) for _, full, *_ in layers}
    return exact_counts(wanted, sizes, sparsity)
