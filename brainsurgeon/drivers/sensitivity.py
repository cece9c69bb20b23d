"""How much the calibration loss cares about an error added to each layer's output: the squared norm of the loss's
gradient with respect to that output, summed over its positions (tokens, pixels), per sample and output channel.

To second order, an error d added to a layer's output at one position raises the loss by about (1/2) d^T F d, F
the Fisher of that output; for an error spread over all directions this is |d|^2 mean|g|^2 / width. A consumer's
layer-wise error curve (a mean over its rows, the positions of all samples) times positions x mean|g|^2 / width
is on the scale of one sample's loss, whatever the layer's depth, width or resolution (the empirical-Fisher reading
of OBD's saliency, applied per layer instead of per weight). The loss is the next-token cross-entropy of a causal
language model called on token ids, or for a classifier (a model returning samples x classes) the cross-entropy
against its own predictions, so no labels are needed.
"""
import torch
from torch import nn
from torch.nn import functional

from ..errors import BrainSurgeonError
from ..models.surgery import sequence_of

SENSITIVITY_SEQUENCES = 16  # language-model calibration sequences whose gradients are averaged (docs/decisions.md)


def _pieces(calls: list) -> list:
    """The calls whose gradients are taken: the first SENSITIVITY_SEQUENCES token sequences, one per call (one
    backward's memory), or every batch of images."""
    kept, sequences = [], 0
    for args, kwargs in calls:
        if not args or not torch.is_tensor(args[0]):
            raise BrainSurgeonError("allocation='loss' needs a model called on a tensor: token ids or images; use "
                                    "allocation='errors'")
        if args[0].is_floating_point():
            kept.append((args, kwargs))
            continue
        for row in range(min(args[0].shape[0], SENSITIVITY_SEQUENCES - sequences)):
            kept.append(sequence_of(args, kwargs, row))
            sequences += 1
    return kept


def _loss(model: nn.Module, args, kwargs) -> torch.Tensor:
    output = model(*args, **kwargs)
    logits = getattr(output, "logits", None)
    if logits is not None and not args[0].is_floating_point():
        ids = args[0]
        return functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
    if torch.is_tensor(output) and output.dim() == 2:
        return functional.cross_entropy(output.float(), output.detach().argmax(1), reduction="sum")
    raise BrainSurgeonError("allocation='loss' needs a causal language model whose output has logits, or a "
                            "classifier returning samples x classes; use allocation='errors' for other models")


def layer_sensitivities(model: nn.Module, layers: dict, calls: list) -> dict:
    """name -> sum over the layer's output positions of |dL/dy|^2, per sample and per output channel, for each
    of `layers` (name -> module), on the calls _pieces keeps; the model's parameters and gradients are left as
    they were."""
    captured, sums, samples = {}, dict.fromkeys(layers, 0.0), 0

    def keep(name):
        def hook(module, inputs, output):
            output.retain_grad()
            captured[name] = output
        return hook

    handles = [module.register_forward_hook(keep(name)) for name, module in layers.items()]
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            for args, kwargs in _pieces(calls):
                _loss(model, args, kwargs).backward()
                for name, output in captured.items():
                    sums[name] += float(output.grad.double().pow(2).sum())
                samples += args[0].shape[0]
                captured.clear()
                model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    return {name: total / samples / _width(layers[name]) for name, total in sums.items()}


def _width(module: nn.Module) -> int:
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features
