"""PruneResult: masks, new weights and the figures of one pruning run; apply, export, save, load."""
import json
from dataclasses import dataclass, field

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import prune as torch_prune

from .. import validation
from ..atomic import atomic_path
from ..errors import BrainSurgeonError, first_line
from .packed_masks import PackedMasks

REPORT_KEY = "brainsurgeon"  # the safetensors metadata entry holding the report
MASK_SUFFIX = "_mask"  # "fc1.weight" -> "fc1.weight_mask", the buffer name torch.nn.utils.prune uses


def _weight_holder(name: str, params: dict, modules: dict):
    """(tensor holding weight `name`, its module if torch.nn.utils.prune reparametrises it, else None)."""
    module_name, _, attr = name.rpartition(".")
    module = modules.get(module_name)
    if module is not None and hasattr(module, f"{attr}_orig"):
        return getattr(module, f"{attr}_orig"), module
    return params.get(name), None


@dataclass
class PruneResult:
    masks: dict  # parameter name -> bool tensor, True where the weight is kept (held packed: PackedMasks)
    weights: dict  # parameter name -> new weight tensor, exact zeros where pruned
    settings: dict  # resolved method, options, seed, damping, samples, ...
    selection_objective: float | None = None  # CBS-S f(P) = u^T H u of the pruned set, without update
    predicted_loss_increase: float | None = None  # 1/2 d^T H d of the applied change
    timings: dict = field(default_factory=dict)  # seconds per phase
    stats: dict = field(default_factory=dict)  # method-specific figures (cbs passes, swaps, ...)
    dense_layers: dict = field(default_factory=dict)  # module name -> why it was left dense
    buffers: dict = field(default_factory=dict)  # re-estimated BatchNorm statistics (bn_recalibration), by name

    def __post_init__(self):
        if not isinstance(self.masks, PackedMasks):
            self.masks = PackedMasks(self.masks)

    @property
    def num_weights(self) -> int:
        return sum(torch.Size(self.masks.shape(name)).numel() for name in self.masks)

    @property
    def num_pruned(self) -> int:
        return sum(int((~mask).sum()) for mask in self.masks.values())

    @property
    def sparsity(self) -> float:
        return self.num_pruned / self.num_weights

    @property
    def layer_sparsity(self) -> dict:
        return {name: float((~mask).float().mean()) for name, mask in self.masks.items()}

    def apply(self, model: nn.Module) -> nn.Module:
        """Write the new weights (zeros included) into `model` in place. A layer carrying a torch.nn.utils.prune
        mask gets the new weights in `weight_orig` and the new mask (which keeps its old zeros) in `weight_mask`."""
        params, modules = dict(model.named_parameters()), dict(model.named_modules())
        targets = {name: _weight_holder(name, params, modules) for name in self.weights}
        missing = [name for name, (target, _) in targets.items() if target is None]
        if missing:
            raise BrainSurgeonError(f"model has no parameter {missing}; apply the result to the model it came from")
        with torch.no_grad():
            for name, weight in self.weights.items():
                target, module = targets[name]
                if target.shape != weight.shape:
                    raise BrainSurgeonError(f"{name}: model shape {tuple(target.shape)} != result "
                                            f"{tuple(weight.shape)}")
                target.copy_(weight)
                if module is not None:
                    attr = name.rpartition(".")[2]
                    mask = getattr(module, f"{attr}_mask")
                    mask.copy_(self.masks[name].to(mask.dtype))
                    setattr(module, attr, target * mask)  # what torch's pruning hook computes at the next forward
            buffers = dict(model.named_buffers())
            for name, value in self.buffers.items():
                if name not in buffers:
                    raise BrainSurgeonError(f"model has no buffer {name}; apply the result to the model it came from")
                buffers[name].copy_(value)
        return model

    def apply_masks(self, model: nn.Module) -> nn.Module:
        """Apply the new weights, then attach the masks with torch.nn.utils.prune.custom_from_mask (layers that
        carry a mask already have it updated by `apply`)."""
        self.apply(model)
        modules = dict(model.named_modules())
        for name, mask in self.masks.items():
            module_name, _, attr = name.rpartition(".")
            if not hasattr(modules[module_name], f"{attr}_orig"):
                torch_prune.custom_from_mask(modules[module_name], attr, mask)
        return model

    def report(self) -> dict:
        return {
            "sparsity": self.sparsity,
            "num_weights": self.num_weights,
            "num_pruned": self.num_pruned,
            "layer_sparsity": self.layer_sparsity,
            "dense_layers": self.dense_layers,
            "recalibrated_buffers": sorted(self.buffers),
            "selection_objective": self.selection_objective,
            "predicted_loss_increase": self.predicted_loss_increase,
            "timings": self.timings,
            "stats": self.stats,
            "settings": self.settings,
        }

    def save(self, path, model: nn.Module | None = None, overwrite: bool = False) -> None:
        """Write safetensors: new weights, masks ("<param>_mask", uint8) and the report as metadata.

        With `model` (the one this result came from: every pruned weight and re-estimated buffer must be in it,
        with the same shape), its other tensors are included too, so the file is a whole pruned state_dict.
        An existing `path` is refused unless `overwrite`.
        """
        tensors = {}
        if model is not None:
            state = model.state_dict()
            self._check_matches(state)
            tensors.update({k: v.detach().clone() for k, v in state.items()})
        tensors.update({name: weight.contiguous() for name, weight in self.weights.items()})
        tensors.update({name: value.contiguous() for name, value in self.buffers.items()})
        tensors.update({name + MASK_SUFFIX: mask.to(torch.uint8) for name, mask in self.masks.items()})
        metadata = {REPORT_KEY: json.dumps(self.report())}
        with atomic_path(path, overwrite) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)

    def _check_matches(self, state: dict) -> None:
        """Refuse a state_dict that is not of the model this result came from (a file mixing two models)."""
        for name, tensor in [*self.weights.items(), *self.buffers.items()]:
            found = state.get(name, state.get(f"{name}_orig"))  # torch.nn.utils.prune keeps weight_orig
            if found is None or tuple(found.shape) != tuple(tensor.shape):
                what = "has no tensor" if found is None else f"has shape {tuple(found.shape)} for"
                raise BrainSurgeonError(f"the model {what} {name} (the result's is {tuple(tensor.shape)}); save the "
                                        "result with the model it came from, or without a model")

    @classmethod
    def load(cls, path) -> "PruneResult":
        """A result written by `save`; any other file is refused in one line."""
        from safetensors import safe_open

        path = validation.input_file(path, "pruning result", validation.MAX_MODEL_FILE_BYTES)
        foreign = f"pruning result {path} was not written by PruneResult.save"
        try:
            with safe_open(str(path), framework="pt") as handle:
                report = json.loads((handle.metadata() or {})[REPORT_KEY])
            tensors = load_file(str(path))
            masks = {k[: -len(MASK_SUFFIX)]: v.bool() for k, v in tensors.items() if k.endswith(MASK_SUFFIX)}
            weights = {name: tensors[name] for name in masks}
            buffers = {name: tensors[name] for name in report.get("recalibrated_buffers", [])}
            result = cls(masks=masks, weights=weights, settings=dict(report["settings"]),
                         selection_objective=report["selection_objective"],
                         predicted_loss_increase=report["predicted_loss_increase"], timings=report["timings"],
                         stats=report["stats"], dense_layers=report["dense_layers"], buffers=buffers)
        except KeyError as error:
            raise BrainSurgeonError(f"{foreign} (it lacks {error}); load a file that save wrote") from None
        except Exception as error:  # safetensors, json and torch each raise their own kinds for a foreign file
            raise BrainSurgeonError(f"{foreign} ({first_line(error)[:200]}); load a file that save wrote") from None
        bad = [name for name in masks if masks[name].shape != weights[name].shape]
        if not masks or bad:
            raise BrainSurgeonError(f"{foreign} ({'no masks' if not masks else f'mask shapes differ for {bad[:3]}'}); "
                                    "load a file that save wrote")
        return result
