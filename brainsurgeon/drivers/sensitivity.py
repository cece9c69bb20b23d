"""How much the calibration loss cares about an error added to each block's output: the mean over tokens of the
squared norm of the loss's gradient with respect to the block's output hidden states.

To second order, an error d added to a block's output raises the loss by about (1/2) d^T F d, F the Fisher of
that output; for an error spread over all directions this is |d|^2 mean|g|^2 / width. So a consumer's
layer-wise error curve times its block's mean|g|^2 puts the errors of all blocks on the scale of the loss (the
empirical-Fisher reading of OBD's saliency, applied per block instead of per weight). It needs a loss: the
next-token cross-entropy of a causal language model called on token ids.
"""
import torch
from torch import nn
from torch.nn import functional

from ..errors import BrainSurgeonError
from ..models.surgery import sequence_of

SENSITIVITY_SEQUENCES = 16  # calibration sequences whose gradients are averaged (docs/decisions.md)


def _hidden(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def block_sensitivities(model: nn.Module, found: list, calls: list) -> dict:
    """block name -> mean over tokens of |dL/dh|^2 for its output h, on the first SENSITIVITY_SEQUENCES
    sequences of `calls`; the model's parameters and gradients are left as they were."""
    kept, sequences = [], 0
    for args, kwargs in calls:
        if sequences >= SENSITIVITY_SEQUENCES:
            break
        if not args or not torch.is_tensor(args[0]) or args[0].is_floating_point() or args[0].dim() != 2:
            raise BrainSurgeonError("allocation='loss' needs a causal language model called on token ids "
                                    "(num_seqs x seq_len); use allocation='errors' for other models")
        for row in range(min(args[0].shape[0], SENSITIVITY_SEQUENCES - sequences)):  # one per backward: its memory
            kept.append(sequence_of(args, kwargs, row))
            sequences += 1
    captured, sums, tokens = {}, dict.fromkeys(name for name, _ in found), 0

    def keep(name):
        def hook(module, inputs, output):
            hidden = _hidden(output)
            hidden.retain_grad()
            captured[name] = hidden
        return hook

    handles = [block.register_forward_hook(keep(name)) for name, block in found]
    saved = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    try:
        with torch.enable_grad():
            for p in model.parameters():
                p.requires_grad_(True)
            for args, kwargs in kept:
                ids = args[0]
                logits = getattr(model(*args, **kwargs), "logits", None)
                if logits is None:
                    raise BrainSurgeonError("allocation='loss' needs a causal language model whose output has "
                                            "logits; use allocation='errors' for other models")
                loss = functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                reduction="sum")
                loss.backward()
                for name, hidden in captured.items():
                    total = float(hidden.grad.double().pow(2).sum())
                    sums[name] = total if sums[name] is None else sums[name] + total
                tokens += ids.numel()
                captured.clear()
                model.zero_grad(set_to_none=True)
    finally:
        for handle in handles:
            handle.remove()
        for p, requires_grad, grad in saved:
            p.requires_grad_(requires_grad)
            p.grad = grad
    return {name: total / tokens for name, total in sums.items()}
