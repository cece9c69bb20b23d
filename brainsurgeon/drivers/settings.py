"""prune's settings besides the method's own options, in typed groups: how the Fisher objective builds its
curvature (`FisherSettings`), how the layer-wise objective prunes (`LayerSettings`), and how a run is staged
(registry.StageOptions). Each group is a frozen dataclass whose fields are checked once when it is built; prune
takes a group as an object (`fisher=FisherSettings(...)`) or its fields as keywords, and refuses a group's field
on the objective that does not use it."""
from dataclasses import dataclass, fields
from pathlib import Path

from .. import validation
from ..errors import BrainSurgeonError, warn_deprecated
from ..methods.options import MethodOptions, option
from .placement import check_device
from .reconstruct import DEFAULT_EPOCHS, DEFAULT_STEP, WINDOWS
from .registry import StageOptions
from .tuning import Tuning


@dataclass(frozen=True)
class FisherSettings(MethodOptions):
    """The Fisher objective's curvature (None: the preset's or the library's default, chosen from the model)."""

    num_samples: int = option(None, "per-sample gradients to take (default: all the calibration samples)")
    damping: float = option(None, "lambda added to the empirical Fisher's diagonal, absolute (default 1e-3)")
    structure: str = option(None, "'full', 'layer' or 'block:K' (default: full if it fits max_memory, else layer)")
    gradients: str = option(None, "'memory', 'disk' (streamed from scratch_dir) or 'auto' (default)")
    scratch_dir: str = option(None, "where streamed gradients go (default: the system's temporary folder)")
    max_memory: float = option(None, "bytes a run may plan for (default 8 GiB)")
    chunk_size: int = option(None, "samples per batch of per-sample gradients (default: from the model's size)")

    def checked(self):
        checks = dict(num_samples=lambda v: validation.count("num_samples", v),
                      damping=lambda v: validation.positive("damping", v),
                      structure=_structure,
                      gradients=lambda v: validation.choice("gradients", v, ("auto", "memory", "disk")),
                      scratch_dir=_scratch_dir,
                      max_memory=lambda v: validation.positive("max_memory (bytes)", v),
                      chunk_size=lambda v: validation.count("chunk_size", v))
        return {name: check(getattr(self, name)) for name, check in checks.items() if getattr(self, name) is not None}


def _structure(value):
    """Its form only: the blocks themselves are checked against the model (stage.fisher_regions)."""
    if not isinstance(value, str):
        raise BrainSurgeonError(f"structure must be 'full', 'layer' or 'block:K', got {value!r}")
    return value


def _scratch_dir(value):
    if not Path(value).is_dir():
        raise BrainSurgeonError(f"scratch_dir {value} is not a directory; create it or leave it unset")
    return value


@dataclass(frozen=True)
class LayerSettings(MethodOptions):
    """The layer-wise objective's settings (None: sequential.prune_layerwise's default)."""

    relative_damping: float = option(None, "added to H's diagonal as a fraction of mean(diag H) (default 0.01)")
    target: str = option(None, "'layer' (default): each layer keeps its own output; 'dense': the dense model's")
    blocks: object = option(None, "names of the blocks to prune in turn (default: the largest nn.ModuleList)")
    batch_size: int = option(None, "calibration inputs per forward (default 8)")
    reconstruct: str = option(None, "'none' (default), 'block' or 'sublayer': fit each pruned block (or its "
                                    "attention and MLP) to the dense one's outputs")
    reconstruct_epochs: int = option(None, f"with reconstruct: at most this many passes (default {DEFAULT_EPOCHS})")
    reconstruct_step: float = option(None, "with reconstruct: Adam's step per layer, times its weight RMS "
                                           f"(default {DEFAULT_STEP:g})")
    device: object = option(None, "where each block is pruned, moved there only while it is, such as 'cuda:0' "
                                  "(default: where the model is)")

    def checked(self):
        checks = dict(relative_damping=lambda v: validation.positive("relative_damping", v),
                      target=lambda v: validation.choice("target", v, ("layer", "dense")),
                      batch_size=lambda v: validation.count("batch_size", v),
                      reconstruct=lambda v: validation.choice("reconstruct", v, WINDOWS),
                      reconstruct_epochs=lambda v: validation.count("reconstruct_epochs", v),
                      reconstruct_step=lambda v: validation.positive("reconstruct_step", v),
                      device=lambda v: check_device(v) and v)  # a torch.device, or a name the driver maps per rank
        return {name: check(getattr(self, name)) for name, check in checks.items() if getattr(self, name) is not None}


GROUPS = {"fisher": FisherSettings, "layer": LayerSettings, "staging": StageOptions, "tuning": Tuning}
USED_ON_LAYER = ("bn_recalibration",)  # the one staging field the layer objective takes too


def given(group: MethodOptions) -> dict:
    """The fields of `group` that differ from their defaults (None, for most: the preset's or library's default)."""
    return {f.name: getattr(group, f.name) for f in fields(group) if getattr(group, f.name) != f.default}


def split_settings(objective: str, options: dict, objects: dict) -> tuple:
    """(FisherSettings, LayerSettings, StageOptions, Tuning, the method's options) from prune's keywords and group
    objects; a field given both ways, or a group's field on the objective that does not use it, is refused."""
    groups = {}
    for name, cls in GROUPS.items():
        obj = objects.get(name)
        if obj is not None and not isinstance(obj, cls):
            raise BrainSurgeonError(f"{name} must be a {cls.__name__} (or its fields as keywords), got {obj!r}")
        keywords = {key: options.pop(key) for key in cls.names() if key in options}
        twice = sorted(set(keywords) & set(given(obj) if obj is not None else {}))
        if twice:
            raise BrainSurgeonError(f"{', '.join(twice)} given both as a keyword and in {name}=; give each once")
        groups[name] = cls(**{**(given(obj) if obj is not None else {}), **keywords})
    if objective == "layer":
        unused = [*given(groups["fisher"]), *(k for k in given(groups["staging"]) if k not in USED_ON_LAYER),
                  *given(groups["tuning"])]
    else:
        unused = list(given(groups["layer"]))
    if unused:
        other = "fisher" if objective == "layer" else "layer"
        hint = ("; its damping is relative_damping, a fraction of mean(diag H)" if "damping" in unused
                and objective == "layer" else "")
        raise BrainSurgeonError(f"objective={objective!r} does not use {', '.join(unused)} (settings of the {other} "
                                f"objective); drop them, or prune with objective={other!r}{hint}")
    return groups["fisher"], groups["layer"], groups["staging"], groups["tuning"], options


def deprecated_scope(scope, pattern):
    """scope='global' or 'layer', the old name of those patterns: the pattern, with a FutureWarning."""
    if pattern is not None:
        raise BrainSurgeonError("scope and pattern both given; pass pattern only (scope is its old name)")
    scope = validation.choice("scope", scope, ("global", "layer"))
    warn_deprecated(f"scope is deprecated: pass pattern={scope!r} (one budget type for both objectives: 'global', "
                    "'layer', 'row' or 'N:M')")
    return scope
