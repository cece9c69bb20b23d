"""A structurally pruned language model on disk: a Hugging Face folder with a width map, and the one function that
loads it.

save_pretrained writes the shrunk weights (safetensors) and the config. When every block kept one width, the
config says so (intermediate_size) and plain transformers reloads the folder. When the widths differ per block,
no config field can hold them: brainsurgeon_widths.json lists every nn.Linear whose shape differs from the one the
config builds, and load_pruned builds the model from the config, replaces those modules by nn.Linear of the
listed shapes and loads the weights without pickle, refusing any tensor that is missing, unexpected or
misshapen. Plain transformers refuses such a folder (its shapes do not fit the config) rather than load it wrong.
"""
import copy
import json
from pathlib import Path

import torch
from torch import nn

from .. import validation
from ..atomic import outputs
from ..errors import BrainSurgeonError, first_line
from .hf import (
    _check_model_folder,
    _library_output,
    _transformers,
    check_causal,
    load_causal_lm,
    save_model_folder,
)

WIDTHS_FILE = "brainsurgeon_widths.json"
REPORT_FILE = "brainsurgeon_report.json"
MAX_WIDTHS_BYTES = 16 * 2**20
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _linear_shapes(model: nn.Module) -> dict:
    return {name: [m.out_features, m.in_features, m.bias is not None]
            for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def _built(config) -> nn.Module:
    """The causal language model `config` builds, on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        return _transformers().AutoModelForCausalLM.from_config(config)


def width_map(model: nn.Module) -> dict:
    """Every nn.Linear of `model` whose shape differs from the one its config builds: name -> [out, in, bias]."""
    built = _linear_shapes(_built(model.config))
    return {name: shape for name, shape in _linear_shapes(model).items() if built.get(name) != shape}


def _built_biases(config, model_type=None) -> set:
    """The nn.Linear names the config builds with a bias (None when it builds a model of another class)."""
    try:
        reference = _built(config)
    except ValueError:  # not a causal language model's config
        return None
    if model_type is not None and type(reference) is not model_type:
        return None
    return {name for name, shape in _linear_shapes(reference).items() if shape[2]}


def match_config_biases(model: nn.Module) -> list:
    """Turn on the config's bias switches (its boolean fields named like 'mlp_bias', 'attention_bias') that build
    the biases a structured prune added to a causal language model, and give every other layer a switch builds
    a zero bias, so the config rebuilds the model and plain transformers loads it. Returns the switches turned on;
    biases no switch builds stay for the width map."""
    config = model.config
    built = _built_biases(config, type(model))
    if built is None:
        return []
    have = {name for name, shape in _linear_shapes(model).items() if shape[2]}
    needed, switched = have - built, []
    for flag in [key for key, value in config.to_dict().items() if "bias" in key and value is False]:
        if not needed:
            break
        trial = copy.deepcopy(config)
        setattr(trial, flag, True)
        gained = _built_biases(trial) - built
        if gained & needed:
            setattr(config, flag, True)
            switched.append(flag)
            for name in gained - have:
                layer = model.get_submodule(name)
                layer.bias = nn.Parameter(layer.weight.new_zeros(layer.out_features))
            needed -= gained
    return switched


def save_shrunk(model: nn.Module, tokenizer, target, report: dict, overwrite: bool = False, inputs=()) -> Path:
    """Write the shrunk model's folder `target` whole: save_pretrained, the tokenizer, the width map when the
    config alone cannot rebuild the model, and the report."""
    with outputs(overwrite) as staged:
        write_shrunk_folder(staged.folder(target, inputs), model, tokenizer, report)
    return Path(target)


def write_shrunk_folder(folder: Path, model: nn.Module, tokenizer, report: dict) -> None:
    widths = width_map(model)
    save_model_folder(folder, model, tokenizer)
    if widths:
        (folder / WIDTHS_FILE).write_text(json.dumps(widths, indent=1) + "\n")
    (folder / REPORT_FILE).write_text(json.dumps(dict(report, width_map=bool(widths)), indent=2) + "\n")


def _read_widths(path: Path) -> dict:
    validation.input_file(path, "width map", MAX_WIDTHS_BYTES)
    try:
        widths = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise BrainSurgeonError(f"cannot read the width map {path}: {first_line(error)}; pass the folder "
                                "brainsurgeon wrote") from None
    valid = isinstance(widths, dict) and all(
        isinstance(shape, list) and len(shape) == 3 and all(type(n) is int and 0 < n <= validation.MAX_COUNT
                                                             for n in shape[:2]) and isinstance(shape[2], bool)
        for shape in widths.values())
    if not valid:
        raise BrainSurgeonError(f"the width map {path} is not a mapping of module names to [out, in, bias]; pass the "
                                "folder brainsurgeon wrote")
    return widths


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise BrainSurgeonError(f"{folder} holds no .safetensors weights; pass the folder brainsurgeon wrote")
    state = {}
    for path in files:
        try:
            state.update(load_file(str(path)))
        except Exception as error:  # safetensors' own error type
            raise BrainSurgeonError(f"cannot load {path}: {first_line(error)}; pass the folder brainsurgeon "
                                    "wrote") from None
    return state


def load_pruned(folder, progress: bool = False):
    """(model, tokenizer) of a folder written by a structured prune (or any save_pretrained folder): with a width
    map, the config's model with the listed modules resized and every weight loaded from safetensors (the
    tokenizer is None when the folder holds none)."""
    folder = Path(folder)
    _check_model_folder(folder)
    if not (folder / WIDTHS_FILE).exists():
        return load_causal_lm(folder, progress)
    widths = _read_widths(folder / WIDTHS_FILE)
    transformers = _transformers(progress)
    try:
        with _library_output(progress):
            config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
            tokenizer = (transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
                         if any((folder / name).exists() for name in TOKENIZER_FILES) else None)
    except Exception as error:
        raise BrainSurgeonError(f"cannot load the model in {folder}: {first_line(error)[:300]}; pass the folder "
                                "brainsurgeon wrote") from None
    for name, (rows, columns, bias) in widths.items():
        try:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            if not isinstance(getattr(parent, child), nn.Linear):
                raise AttributeError
        except AttributeError:
            raise BrainSurgeonError(f"the width map names {name}, which is no nn.Linear of the config's model; pass "
                                    "the folder brainsurgeon wrote") from None
        setattr(parent, child, nn.Linear(columns, rows, bias=bias))
    _load_state(model, _weights(folder), folder)
    model.eval()
    check_causal(model, str(folder))
    return model, tokenizer


def _load_state(model: nn.Module, state: dict, folder: Path) -> None:
    """Every tensor loaded with its shape checked; a parameter absent from the files is allowed only when tied to
    one that is present (the output head tied to the embedding)."""
    own = model.state_dict()
    misshapen = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    unexpected = [k for k in state if k not in own]
    if misshapen or unexpected:
        bad = (misshapen + unexpected)[0]
        raise BrainSurgeonError(f"the weights in {folder} do not fit its config and width map ({bad}); pass the "
                                "folder brainsurgeon wrote")
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {id(p) for name, p in model.named_parameters(remove_duplicate=False) if name in state}
    missing = [name for name, p in model.named_parameters(remove_duplicate=False)
               if name not in state and id(p) not in loaded]
    if missing:
        raise BrainSurgeonError(f"the weights in {folder} do not fit its config and width map: {len(missing)} "
                                f"tensors are missing (e.g. {missing[0]}); pass the folder brainsurgeon wrote")
