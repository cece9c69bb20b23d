"""Calibration data: whatever the user hands over, as one (X, y) pair of tensors."""
import torch

from .errors import BrainSurgeonError


def collect(calibration, num_samples=None):
    """Accept an (X, y) pair of tensors or any iterable of (inputs, targets) batches.

    Returns the first `num_samples` samples (all of them if None) as tensors, checked for NaNs.
    """
    if isinstance(calibration, (tuple, list)) and len(calibration) == 2 and all(
        isinstance(t, torch.Tensor) for t in calibration
    ):
        batches = [tuple(calibration)]
    else:
        batches = []
        total = 0
        for batch in calibration:
            inputs, targets = batch[0], batch[1]
            batches.append((torch.as_tensor(inputs), torch.as_tensor(targets)))
            total += len(inputs)
            if num_samples is not None and total >= num_samples:
                break
    if not batches:
        raise BrainSurgeonError("calibration data is empty; pass an (X, y) pair or batches of (inputs, targets)")
    inputs = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches])
    if len(inputs) != len(targets):
        raise BrainSurgeonError(f"calibration inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
    if num_samples is not None:
        if len(inputs) < num_samples:
            raise BrainSurgeonError(
                f"not enough calibration samples: {num_samples} requested, {len(inputs)} given; "
                "pass more data or lower num_samples"
            )
        inputs, targets = inputs[:num_samples], targets[:num_samples]
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise BrainSurgeonError("calibration inputs contain NaN or Inf; clean or re-normalise the data")
    return inputs, targets
