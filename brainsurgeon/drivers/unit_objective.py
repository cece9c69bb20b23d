"""A consumer's layer-wise problem in a structured prune (drivers/structured.py): its input statistics, the
matrix and H each method works on (with the bias column, the dense target and a following BatchNorm's factors),
and the new weights of the columns it keeps."""
import torch
from torch import nn

from ..methods import units
from ..models.surgery import BATCHNORM, matrix_of, output_scales, sequence_of
from .activations import HessianRecorder, run_block_until
from .tp_importance import torch_pruning_scores

REFITTED = ("obs", "swaps")  # the methods whose kept columns are refitted (the others keep them as they were)


def statistics(block, consumer: str, inputs) -> tuple:
    """X X^T / N and the mean of the consumer's inputs, the block run on `inputs` as it is now, up to the
    consumer."""
    recorder = HessianRecorder({consumer: block.get_submodule(consumer)})
    try:
        run_block_until(block, block.get_submodule(consumer), inputs)
    finally:
        recorder.close()
    return recorder.hessian(consumer), recorder.mean(consumer)


class UnitObjective:
    """A consumer's layer-wise problem for `method`: its matrix and damped H, extended by the bias column where
    the refit or FLAP's compensation goes through a bias (`biases`), and the new kept columns. When a BatchNorm
    takes the consumer's output, the rows are multiplied by its factors, so that errors, and the units chosen,
    are measured after it, where they join the stream; `unscaled` divides them out of the new weights."""

    def __init__(self, method: str, biases: str, relative_damping: float, output_scales=None):
        self.method, self.biases, self.relative_damping = method, biases, relative_damping
        # a following BatchNorm's per-channel factors, used by the refitted methods only: the baselines rank the
        # weights as their papers do
        if output_scales is not None and method in REFITTED:
            tiny = 1e-12 * float(output_scales.abs().max().clamp_min(1e-300))
            output_scales = torch.where(output_scales.abs() < tiny, tiny, output_scales)
        self.output_scales = output_scales if method in REFITTED else None

    def unscaled(self, new: torch.Tensor) -> torch.Tensor:
        return new if self.output_scales is None else new / self.output_scales[:, None]

    def problem(self, consumer: nn.Module, hessian: torch.Tensor, mean: torch.Tensor, towards=None) -> tuple:
        """(W, damped H, the bias column's index as a 0- or 1-element tensor). With `towards` = (C, dense mean),
        C = X_p X_d^T / N, W is the target W* = W + W (C - H)^T H_damped^-1 whose objective on the pruned inputs
        X_p is |W X_d - W' X_p|^2 up to a constant (the dense model's output as the target; W* = W where the
        streams agree)."""
        weight = matrix_of(consumer).detach().double()
        raw, bias_column = hessian.double(), torch.zeros(0, dtype=torch.long)
        cross = None if towards is None else towards[0].double()
        if not (self.biases == "existing" and consumer.bias is None or self.method not in (*REFITTED, "flap")):
            bias = consumer.bias.detach().double() if consumer.bias is not None else weight.new_zeros(len(weight))
            weight, raw, bias_column = (torch.cat([weight, bias[:, None]], 1), units.augmented(raw, mean),
                                        torch.tensor([weight.shape[1]]))
            if cross is not None:
                cross = units.augmented(cross, mean, towards[1])
        damped = units.damped(raw, self.relative_damping)
        if cross is not None:
            weight = weight + torch.linalg.solve(damped, (cross - raw) @ weight.T).T
        if self.output_scales is not None:  # rows weighted: the refit of each row is the same, the error is not
            weight = weight * self.output_scales[:, None]
        return weight, damped, bias_column

    def update(self, weight, hessian, kept, mean, removed_columns) -> torch.Tensor:
        """The kept columns' new weights (the bias column last when kept): the exact refit, FLAP's compensation,
        or the columns as they were."""
        if self.method in REFITTED:
            return units.refit(weight, hessian, kept)
        new = weight[:, kept].clone()
        if self.method == "flap" and weight.shape[1] > len(mean):
            new[:, -1] += weight[:, removed_columns] @ mean.double()[removed_columns]
        return new


class OutputScales:
    """Each consumer's output_scales (models/surgery.py), probed on its block's first call the first time; None
    for every consumer when not `weighted` (the rows as they are, as the structured-OBS papers have them)."""

    def __init__(self, weighted: bool = True):
        self.weighted, self.found = weighted, {}

    def __call__(self, name, block, group, inputs):
        if not self.weighted:
            return None
        key = f"{name}.{group.consumer}"
        if key not in self.found:
            self.found[key] = output_scales(block, group.consumer, *inputs[0])
        return self.found[key]


def given_scores(method: str, block: nn.Module, group, inputs, hessian, mean):
    """The per-unit scores of the methods that rank what the consumer alone does not show: the L1 norm of each
    unit's producer rows (a convolution's filter), Torch-Pruning's importance, or FLAP's fluctuation."""
    if method == "flap":
        consumer = matrix_of(block.get_submodule(group.consumer)).detach()
        return units.fluctuation_scores(consumer, hessian, mean)[group.columns].sum(1)
    if method == "l1":
        layers = [block.get_submodule(name) for name in group.producers]
        return sum(layer.weight.detach().double().flatten(1).abs().sum(1) for layer in layers
                   if not isinstance(layer, BATCHNORM))
    if method == "tp":
        return torch_pruning_scores(block, group, *sequence_of(*inputs[0]))
    return None
