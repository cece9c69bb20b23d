"""Calibration data: whatever the user hands over, as one (X, y) pair of tensors, checked to be usable."""
import math

import numpy as np
import torch

from ..errors import BrainSurgeonError, first_line
from ..modes import evaluating

CHECK_BATCH = 128


ARRAYS = (torch.Tensor, np.ndarray)
LIST_HINT = "pass an (X, y) pair of tensors or numpy arrays (Python lists: torch.tensor(X), torch.tensor(y))"


def is_tensor_pair(calibration) -> bool:
    """An (inputs, targets) pair of tensors or numpy arrays, rather than an iterable of batches."""
    return isinstance(calibration, (tuple, list)) and len(calibration) == 2 and all(
        isinstance(t, ARRAYS) for t in calibration)


def as_tensor(array, what: str) -> torch.Tensor:
    """A tensor or a numeric numpy array as a tensor (numpy's float64 kept: the model decides what it takes)."""
    if isinstance(array, torch.Tensor):
        return array
    try:
        return torch.from_numpy(np.ascontiguousarray(array))
    except TypeError as error:
        raise BrainSurgeonError(f"{what} is a numpy array torch cannot take ({error}); pass numbers") from None


def tensor_pair(calibration) -> tuple:
    """An (inputs, targets) pair (is_tensor_pair) as two tensors."""
    return as_tensor(calibration[0], "calibration inputs"), as_tensor(calibration[1], "calibration targets")


def _as_batches(calibration, num_samples):
    if is_tensor_pair(calibration):
        return [tensor_pair(calibration)]
    try:
        iterator = iter(calibration)
    except TypeError:
        raise BrainSurgeonError(f"calibration must be an (X, y) pair of tensors or an iterable of (inputs, "
                                f"targets) batches, got {type(calibration).__name__}") from None
    batches, total = [], 0
    for batch in iterator:
        try:
            inputs, targets = batch[0], batch[1]
            batches.append((torch.as_tensor(inputs), torch.as_tensor(targets)))
        except (TypeError, IndexError, ValueError, RuntimeError, KeyError) as error:
            raise BrainSurgeonError(f"each calibration batch must be an (inputs, targets) pair of tensors "
                                    f"({first_line(error)}); {LIST_HINT}") from None
        if batches[-1][0].dim() == 0 or batches[-1][1].dim() == 0:
            raise BrainSurgeonError(f"a calibration batch has a scalar where a batch of inputs or targets should be "
                                    f"(batch {len(batches) - 1}); {LIST_HINT}")
        total += len(batches[-1][0])
        if num_samples is not None and total >= num_samples:
            break
    return batches


def collect(calibration, num_samples=None, limit=None):
    """Accept an (X, y) pair of tensors or any iterable of (inputs, targets) batches.

    Returns the first `num_samples` samples (all of them if None) as tensors, checked for NaNs; with `limit`, up to
    that many (at least `num_samples`).
    """
    limit = num_samples if limit is None else limit
    batches = _as_batches(calibration, limit)
    if not batches or not sum(len(b[0]) for b in batches):
        raise BrainSurgeonError("calibration data is empty; pass an (X, y) pair or batches of (inputs, targets)")
    try:
        inputs = torch.cat([b[0] for b in batches])
        targets = torch.cat([b[1] for b in batches])
    except RuntimeError as error:
        raise BrainSurgeonError(f"calibration batches do not fit together: {error}") from None
    if len(inputs) != len(targets):
        raise BrainSurgeonError(f"calibration inputs ({len(inputs)}) and targets ({len(targets)}) differ in length")
    if num_samples is not None:
        if len(inputs) < num_samples:
            raise BrainSurgeonError(
                f"not enough calibration samples: {num_samples} requested, {len(inputs)} given; "
                "pass more data or lower num_samples"
            )
    if limit is not None:
        inputs, targets = inputs[:limit], targets[:limit]
    if inputs.is_floating_point() and not torch.isfinite(inputs).all():
        raise BrainSurgeonError("calibration inputs contain NaN or Inf; clean or re-normalise the data")
    return inputs, targets


def mean_loss(model, inputs, targets, loss_fn) -> float:
    """Mean loss over the calibration data in eval mode, in batches (every module's mode comes back)."""
    total = 0.0
    with torch.no_grad(), evaluating(model):
        for start in range(0, len(inputs), CHECK_BATCH):
            outputs = model(inputs[start : start + CHECK_BATCH])
            total += float(loss_fn(outputs, targets[start : start + CHECK_BATCH])) * len(outputs)
    return total / len(inputs)


def per_sample_losses(model, inputs, targets, loss_fn) -> torch.Tensor:
    """Every sample's loss in eval mode (`loss_fn` on a batch of one, as the per-sample gradients take it)."""
    losses = []
    with torch.no_grad(), evaluating(model):
        for start in range(0, len(inputs), CHECK_BATCH):
            outputs, batch = model(inputs[start : start + CHECK_BATCH]), targets[start : start + CHECK_BATCH]
            losses += [float(loss_fn(outputs[i : i + 1], batch[i : i + 1])) for i in range(len(outputs))]
    return torch.tensor(losses, dtype=torch.float64)


def check_usable(model, inputs, targets, loss_fn) -> float:
    """The mean loss of `model` on the calibration data, refusing data the model cannot run on and losses that
    are not finite (e.g. every target ignored) or that the targets do not fit."""
    first = slice(0, CHECK_BATCH)
    with torch.no_grad(), evaluating(model):
        try:
            outputs = model(inputs[first])
        except Exception as error:  # any failure of the user's forward is a data/model mismatch
            raise BrainSurgeonError(
                f"the model cannot run on the calibration inputs (shape {tuple(inputs.shape[1:])}, dtype "
                f"{inputs.dtype}): {first_line(error)}; pass inputs shaped and typed as the model expects"
            ) from None
        try:
            float(loss_fn(outputs, targets[first]))
        except Exception as error:
            raise BrainSurgeonError(
                f"loss_fn cannot use the calibration targets (shape {tuple(targets.shape[1:])}, dtype "
                f"{targets.dtype}): {first_line(error)}; pass targets the loss accepts"
            ) from None
    try:
        mean = mean_loss(model, inputs, targets, loss_fn)
    except Exception as error:
        raise BrainSurgeonError(f"the calibration data fail past their first {CHECK_BATCH} samples: "
                                f"{first_line(error)}; check every sample's shape, type and target") from None
    if not math.isfinite(mean):
        raise BrainSurgeonError(f"the calibration loss is {mean} on the unpruned model (targets all ignored, "
                                "out of range, or a model that overflows); fix the targets or the loss")
    return mean


class CalibrationPool:
    """The calibration samples of a staged prune. Every stage fits `per_stage` of them: stage 0 the first ones,
    and, when the pool holds at least twice that many, the last `per_stage` are held out (never fitted) to judge
    the stages by, and each later stage fits the next unused ones, or once all are used a random subset (seeded by
    `seed` and the stage) of those not held out: never a repeat of an earlier stage's. A smaller pool has no
    held-out part: every stage fits the same samples."""

    def __init__(self, inputs: torch.Tensor, targets: torch.Tensor, per_stage: int | None = None, seed: int = 0):
        self.inputs, self.targets, self.seed = inputs, targets, seed
        self.per_stage = len(inputs) if per_stage is None else per_stage
        self.fresh = len(inputs) >= 2 * self.per_stage

    @property
    def held_out(self):
        """The held-out (inputs, targets), or None."""
        return (self.inputs[-self.per_stage:], self.targets[-self.per_stage:]) if self.fresh else None

    @property
    def judged(self):
        """The (inputs, targets) that stages and paths are judged by: the held-out ones, or without them the first
        stage's."""
        return self.held_out or self.stage(0)

    def stage(self, index: int):
        """The (inputs, targets) that stage `index` (from 0) fits."""
        if not self.fresh or index == 0:
            return self.inputs[: self.per_stage], self.targets[: self.per_stage]
        fitted = len(self.inputs) - self.per_stage
        if (index + 1) * self.per_stage <= fitted:
            rows = torch.arange(index * self.per_stage, (index + 1) * self.per_stage)
        else:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            rows = torch.randperm(fitted, generator=generator)[: self.per_stage]
        return self.inputs[rows], self.targets[rows]
