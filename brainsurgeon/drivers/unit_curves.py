"""The first pass of a structured prune's allocation (drivers/structured.py): every consumer's curve on the dense
model, and the cost of its units in parameters or multiply-accumulates per input."""
import torch
from torch import nn

from ..methods import units
from ..models.surgery import find_unit_groups, matrix_of
from ..progress import progress_bar
from .activations import HessianRecorder, run_block, with_first
from .unit_objective import OutputScales


class UnitGroups:
    """Each block's unit groups (models/surgery.find_unit_groups), probed on its first call. Blocks alike in
    structure (module types, parameter names and shapes: a model's repeated layers) run the same code on the same
    shapes, so their groups are probed once and shared; probing is several block forwards per consumer."""

    def __init__(self):
        self.of_block, self._of_structure = {}, {}

    def __call__(self, name, block, inputs, units_of) -> list:
        """The block's groups of the kinds asked."""
        if name not in self.of_block:
            structure = (type(block), tuple((sub, type(module)) for sub, module in block.named_modules()),
                         tuple((sub, tuple(p.shape)) for sub, p in block.named_parameters()))
            if structure not in self._of_structure:
                self._of_structure[structure] = find_unit_groups(block, *inputs[0])
            self.of_block[name] = self._of_structure[structure]
        return [group for group in self.of_block[name] if group.kind in units_of]


def block_layers(found) -> dict:
    """Every nn.Linear and nn.Conv2d inside the blocks, by its name in the model."""
    return {f"{name}.{sub}".strip("."): module for name, block in found for sub, module in block.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv2d))}


def error_curves(found, inputs, units_of, relative_damping: float, progress: bool, groups_of: UnitGroups,
                 scales: dict = None, cost: str = "parameters", objective_of=None,
                 allocation: str = "errors", scales_of: OutputScales = None) -> tuple:
    """Every consumer's curve on the dense model (to one unit left) and the `cost` of one of its units
    (parameters, or multiply-accumulates per input). For 'errors' and 'loss', the structured-OBS error curve of
    `objective_of(output scales)` (a UnitObjective), multiplied by the consumer's loss sensitivity (`scales`,
    drivers/sensitivity.py), or without them divided by the median over positions of the squared norm of its
    block's output; for 'fluctuation' (FLAP's adaptive structure), each column's fluctuation standardised over
    the consumer's columns, averaged over the unit's, sorted, times the unit's cost and summed, so that allocate
    removes the lowest across the model. The blocks are left as they were."""
    curves, costs = {}, {}
    for name, block in progress_bar(found, "error curves", progress):
        groups = groups_of(name, block, inputs, units_of)
        recorder = HessianRecorder({g.consumer: block.get_submodule(g.consumer) for g in groups})
        positions = Positions(block, groups)
        try:
            outputs = run_block(block, inputs)
        finally:
            recorder.close()
            positions.close()
        energy = float(torch.cat([position_energies(o) for o in outputs]).median())
        for group in groups:
            full = f"{name}.{group.consumer}".strip(".")
            consumer = block.get_submodule(group.consumer)
            raw, mean = recorder.hessian(group.consumer), recorder.mean(group.consumer)
            costs[full] = (group.macs_per_unit(block, positions.per_input) if cost == "macs"
                           else group.parameters_per_unit(block))
            if allocation == "fluctuation":
                scores = units.fluctuation_scores(matrix_of(consumer).detach(), raw, mean)
                standard = ((scores - scores.mean()) / scores.std().clamp_min(1e-300))[group.columns].mean(1)
                curves[full] = torch.cumsum(torch.sort(standard).values[: group.units - 1] * costs[full], 0)
                continue
            objective = objective_of(scales_of(name, block, group, inputs))
            weight, hessian, _ = objective.problem(consumer, raw, mean)
            _, errors = units.unit_path(weight, hessian, group.columns, group.units - 1)
            curves[full] = errors * scales[full] if scales else errors / max(energy, 1e-300)
        inputs = with_first(inputs, outputs)
    return curves, costs


def position_energies(output: torch.Tensor) -> torch.Tensor:
    """The squared norm of the output's feature vector at every position: a token's hidden state, a pixel's
    channels (dimension 1 of an image batch)."""
    squares = output.double().pow(2)
    return (squares.sum(1) if output.dim() == 4 else squares.sum(-1)).flatten()


class Positions:
    """Forward hooks that record, for each member of the groups, at how many positions per input its weights are
    applied (a convolution's output pixels, a transformer's tokens)."""

    def __init__(self, block, groups):
        self.per_input = {}
        members = {name for group in groups for name in [group.consumer, *group.producers]}
        self.handles = [block.get_submodule(name).register_forward_hook(self._hook(name)) for name in members]

    def _hook(self, name):
        def record(module, args, output):
            self.per_input.setdefault(name, output[0].numel() // output.shape[-1 if output.dim() == 3 else 1])
        return record

    def close(self):
        for handle in self.handles:
            handle.remove()
