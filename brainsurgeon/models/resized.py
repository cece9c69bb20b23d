"""A structurally pruned nn.Module on disk without pickle: one safetensors file whose metadata lists the shape of
every nn.Linear, nn.Conv2d and BatchNorm layer that differs from the dense architecture's, so the weights load into
a fresh instance of the architecture once those layers are rebuilt at their shrunk sizes.

    save_resized(pruned, dense, "resnet20_channels.safetensors")
    model = load_resized(resnet20(), "resnet20_channels.safetensors")   # any fresh dense instance

A language model goes to a Hugging Face folder instead (models/shrunk.py)."""
import copy
import json
from pathlib import Path

from torch import nn

from .. import validation
from ..errors import BrainSurgeonError, first_line

SHAPES_KEY = "brainsurgeon_shapes"
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
MAX_FILE_BYTES = 2**36


def _shape(module: nn.Module):
    if isinstance(module, nn.Linear):
        return ["linear", module.in_features, module.out_features, module.bias is not None]
    if isinstance(module, nn.Conv2d):
        return ["conv2d", module.in_channels, module.out_channels, module.bias is not None]
    if isinstance(module, BATCHNORMS):
        return ["batchnorm", module.num_features, module.num_features, module.affine]
    return None


def shapes(model: nn.Module) -> dict:
    return {name: shape for name, module in model.named_modules() if (shape := _shape(module)) is not None}


def shape_map(model: nn.Module, dense: nn.Module) -> dict:
    """The layers of `model` whose shape differs from `dense`'s: name -> [kind, in, out, has bias]."""
    before = shapes(dense)
    return {name: shape for name, shape in shapes(model).items() if before.get(name) != shape}


def save_resized(model: nn.Module, dense: nn.Module, path) -> None:
    """Write `model`'s state (tensors only) to the safetensors file `path`, with its shape map against the dense
    architecture `dense` in the metadata. The caller stages `path` (atomic.outputs)."""
    from safetensors.torch import save_file

    state = {name: tensor.detach().contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(path), metadata={SHAPES_KEY: json.dumps(shape_map(model, dense))})


def _rebuilt(module: nn.Module, shape: list) -> nn.Module:
    """A layer of `module`'s kind and settings with the widths and bias of `shape`."""
    kind, width_in, width_out, bias = shape
    if kind == "linear" and isinstance(module, nn.Linear):
        return nn.Linear(width_in, width_out, bias=bias)
    if kind == "conv2d" and isinstance(module, nn.Conv2d) and module.groups == 1:
        return nn.Conv2d(width_in, width_out, module.kernel_size, module.stride, module.padding, module.dilation,
                         bias=bias, padding_mode=module.padding_mode)
    if kind == "batchnorm" and isinstance(module, BATCHNORMS) and bias == module.affine:
        return type(module)(width_out, module.eps, module.momentum, module.affine, module.track_running_stats)
    return None


def _read_shapes(metadata, path) -> dict:
    try:
        found = json.loads((metadata or {})[SHAPES_KEY])
    except (KeyError, ValueError):
        raise BrainSurgeonError(f"{path} holds no shape map of brainsurgeon's; pass a file save_resized wrote "
                                "(a Hugging Face folder loads with brainsurgeon.load_pruned)") from None
    valid = isinstance(found, dict) and all(
        isinstance(shape, list) and len(shape) == 4 and shape[0] in ("linear", "conv2d", "batchnorm")
        and all(type(n) is int and 0 < n <= validation.MAX_COUNT for n in shape[1:3]) and isinstance(shape[3], bool)
        for shape in found.values())
    if not valid:
        raise BrainSurgeonError(f"the shape map in {path} is not a mapping of layer names to [kind, in, out, bias]; "
                                "pass a file save_resized wrote")
    return found


def load_resized(model: nn.Module, path) -> nn.Module:
    """A copy of `model` (a fresh instance of the dense architecture) with the layers of the file's shape map
    rebuilt at their sizes and every tensor loaded from the safetensors file `path`, each shape checked, nothing
    missing or unexpected. No code runs from the file."""
    from safetensors import safe_open

    path = validation.input_file(Path(path), "pruned model", MAX_FILE_BYTES)
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
            state = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as error:  # safetensors' own error types
        raise BrainSurgeonError(f"cannot read {path}: {first_line(error)}; pass a file save_resized wrote") from None
    resized = copy.deepcopy(model)
    for name, shape in _read_shapes(metadata, path).items():
        parent_name, _, child = name.rpartition(".")
        try:
            parent = resized.get_submodule(parent_name) if parent_name else resized
            rebuilt = _rebuilt(getattr(parent, child), shape)
        except AttributeError:
            rebuilt = None
        if rebuilt is None:
            raise BrainSurgeonError(f"the shape map in {path} names {name} as a {shape[0]}, which the model given "
                                    "does not have there; pass the dense architecture the file was pruned from")
        setattr(parent, child, rebuilt)
    own = resized.state_dict()
    wrong = sorted(set(own) ^ set(state)) or [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        raise BrainSurgeonError(f"the tensors in {path} do not fit the model given ({wrong[0]}); pass the dense "
                                "architecture the file was pruned from")
    resized.load_state_dict(state)
    return resized.eval()
