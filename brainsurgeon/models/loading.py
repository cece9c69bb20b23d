"""Reading files that users hand over without running code stored in them.

Checkpoints load with torch.load(weights_only=True): tensors, plain containers and numbers, plus references
to torch's own optimizer and scheduler classes, which the WoodFisher checkpoints store by name (references,
never instances built from the file's data). Dataset pickles go through an unpickler that admits only
numeric numpy arrays, lists, dicts, tuples, bytes, str and numbers. Anything else is refused with an error
naming TRUST_PICKLE_FLAG, the explicit opt-in to full unpickling, which runs whatever code the file holds.
"""
import codecs
import inspect
import io
import pickle
import re

import numpy as np
import torch
import torch.optim.lr_scheduler

from .. import validation
from ..errors import BrainSurgeonError, first_line

try:  # numpy >= 2 moved it; pickles name either module
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct

TRUST_PICKLE_FLAG = "--trust-pickle"
TRUST_PICKLE_HELP = ("load checkpoints and dataset pickles with full unpickling: this RUNS ANY CODE stored in the "
                     "files; only for files you trust (default: tensors and plain data only)")


def _torch_classes_stored_by_name() -> list:
    """Optimizer and LR-scheduler classes: checkpoints save them as a reference ('type': SGD)."""
    modules = (torch.optim, torch.optim.lr_scheduler)
    bases = (torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler)
    return [cls for module in modules for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, bases)]


def _refused(path, what: str, detail: str) -> BrainSurgeonError:
    return BrainSurgeonError(f"{what} {path} holds Python objects that only full unpickling can rebuild ({detail}); "
                             f"brainsurgeon loads plain data only. If you trust the file, pass {TRUST_PICKLE_FLAG} "
                             "(API: trust_pickle=True), which runs code stored in it")


def load_torch_file(path, trust_pickle: bool = False):
    """torch.load on the CPU; weights only unless `trust_pickle`."""
    path = validation.input_file(path, "checkpoint", validation.MAX_MODEL_FILE_BYTES)
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_torch_classes_stored_by_name()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL ([\w.]+)|Unsupported class ([\w.]+)", str(error))
        if found:
            raise _refused(path, "checkpoint", f"it needs {next(g for g in found.groups() if g)}") from None
        raise BrainSurgeonError(f"cannot read checkpoint {path}: not a torch.save file of tensors and plain data "
                                f"({first_line(error)[:200]}); if it is a pickle you trust, pass "
                                f"{TRUST_PICKLE_FLAG}") from None
    except Exception as error:  # torch raises many kinds for truncated or foreign files
        raise BrainSurgeonError(f"cannot read checkpoint {path}: {first_line(error)}; pass a file written by "
                                "torch.save") from None


def _numpy_dtype(*args, **kwargs):
    dtype = np.dtype(*args, **kwargs)
    if dtype.hasobject:
        raise pickle.UnpicklingError("numpy arrays of Python objects are not plain data")
    return dtype


def _latin1_encode(text, encoding="utf-8", errors="strict"):
    if codecs.lookup(encoding).name != "iso8859-1":  # how protocol 2 stores bytes: encode(str, 'latin1')
        raise pickle.UnpicklingError(f"codec {encoding!r} is not used for plain bytes")
    return codecs.encode(text, encoding, errors)


_PLAIN_GLOBALS = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("_codecs", "encode"): _latin1_encode,
}


class PlainDataUnpickler(pickle.Unpickler):
    """Rebuilds numpy arrays, lists, dicts, tuples, bytes, str and numbers; refuses every other global."""

    def find_class(self, module, name):
        try:
            return _PLAIN_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name}") from None


def load_plain_pickle(path, trust_pickle: bool = False, what: str = "file"):
    """Unpickle a data file (e.g. a CIFAR-10 batch) without running code from it, unless `trust_pickle`."""
    path = validation.input_file(path, what, validation.MAX_DATA_FILE_BYTES)
    raw = path.read_bytes()
    try:
        if trust_pickle:
            return pickle.loads(raw, encoding="bytes")
        return PlainDataUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except pickle.UnpicklingError as error:
        if str(error).startswith(("global ", "numpy arrays of", "codec ")):
            raise _refused(path, what, str(error)) from None
        raise BrainSurgeonError(f"{what} {path} is not a readable pickle ({error}); it may be truncated") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as error:
        raise BrainSurgeonError(f"{what} {path} is not a readable pickle ({first_line(error)}); "
                                "it may be truncated or corrupt") from None
