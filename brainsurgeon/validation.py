"""Checks of every value where it enters: the API and the CLI share them, so both give the same message."""
import math
import numbers
import re
from pathlib import Path

from .errors import BrainSurgeonError


def _describe(low, high, low_open, high_open) -> str:
    parts = []
    if low is not None:
        parts.append(f"{'>' if low_open else '>='} {low:g}")
    if high is not None:
        parts.append(f"{'<' if high_open else '<='} {high:g}")
    return " and ".join(parts)


def number(name: str, value, *, low=None, high=None, low_open=False, high_open=False, integer=False):
    """A finite real (or integer) in the given range, returned as float (or int); anything else is refused
    with a message naming `name`, the range and the value given."""
    kind = "an integer" if integer else "a finite number"
    wanted = f"{name} must be {kind}" + (f" {_describe(low, high, low_open, high_open)}" if low is not None or
                                           high is not None else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BrainSurgeonError(f"{wanted}, got {value!r} of type {type(value).__name__}")
    if integer and not (isinstance(value, numbers.Integral) or (math.isfinite(value) and value == int(value))):
        raise BrainSurgeonError(f"{wanted}, got {value!r}")
    if not math.isfinite(value):
        raise BrainSurgeonError(f"{wanted}, got {value!r}")
    value = int(value) if integer else float(value)
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        raise BrainSurgeonError(f"{wanted}, got {value!r}")
    return value


def positive(name: str, value) -> float:
    return number(name, value, low=0, low_open=True)


def non_negative(name: str, value) -> float:
    return number(name, value, low=0)


MAX_COUNT = 10**7  # any count option: far above every useful setting, below what would run for days
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed's range
MAX_INIT_TRIALS = 100_000  # CBS's perturbed starting masks: 2,000x the default 50
MAX_KEPT = 32_768  # joint's kept-weight system: its |S| x |S| float64 inverse fills 8 GiB at this size
MAX_REFINE = 1_000  # refinement stages: each is a full prune


def count(name: str, value, minimum: int = 1, maximum: int = MAX_COUNT) -> int:
    return number(name, value, low=minimum, high=maximum, integer=True)


def seed(value, name: str = "seed") -> int:
    return count(name, value, minimum=0, maximum=MAX_SEED)


def sparsity(value, name: str = "sparsity") -> float:
    try:
        return number(name, value, low=0, high=1, high_open=True)
    except BrainSurgeonError:
        raise BrainSurgeonError(f"{name} must be in [0, 1), got {value!r}; e.g. 0.9 prunes 90% of the weights") \
            from None


def choice(name: str, value, options) -> str:
    if value not in options:
        raise BrainSurgeonError(f"unknown {name} {value!r}; choose from {sorted(options)}")
    return value


def flag(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise BrainSurgeonError(f"{name} must be True or False, got {value!r}")
    return value


def patterns(name: str, value) -> tuple:
    """Module-type names or regexes on module names: one string is one pattern, not a list of letters."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        value = tuple(value)
    except TypeError:
        raise BrainSurgeonError(f"{name} must be a string or a list of strings, got {value!r}") from None
    for pattern in value:
        if not isinstance(pattern, str) or not pattern:
            raise BrainSurgeonError(f"{name} must hold non-empty strings (module types or name regexes), "
                                    f"got {pattern!r}")
        try:
            re.compile(pattern)
        except re.error as error:
            raise BrainSurgeonError(f"{name} pattern {pattern!r} is not a valid regular expression ({error}); "
                                    "escape special characters, e.g. 'layer1\\.0'") from None
    return value


def positive_list(name: str, values) -> tuple:
    """A non-empty sequence of finite positive numbers, sorted."""
    if isinstance(values, (str, bytes, numbers.Real)):
        values = (values,)
    try:
        values = tuple(values)
    except TypeError:
        raise BrainSurgeonError(f"{name} must be a list of positive numbers, got {values!r}") from None
    if not values:
        raise BrainSurgeonError(f"{name} must hold at least one positive number")
    return tuple(sorted(positive(f"every value of {name}", v) for v in values))


# Input files are read whole into memory: caps far above any real input, so that a device or a runaway file
# (/dev/zero, a log) is refused before it is read.
MAX_TEXT_BYTES = 256 * 2**20  # 40x the 6.2 MB Wikipedia text
MAX_MODEL_FILE_BYTES = 64 * 2**30  # a 16B-parameter float32 model; the machines this runs on have far less memory
MAX_DATA_FILE_BYTES = 4 * 2**30  # one dataset file, decompressed: 85x MNIST's training images


def input_file(path, what: str, max_bytes: int) -> Path:
    """An existing regular file of at most `max_bytes` (symlinks to one are fine); anything else is refused."""
    path = Path(path)
    if not path.exists():
        raise BrainSurgeonError(f"{what} {path} not found; pass an existing file")
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise BrainSurgeonError(f"{what} {path} is {kind}; pass a regular file")
    size = path.stat().st_size
    if size > max_bytes:
        raise BrainSurgeonError(f"{what} {path} has {size / 2**20:.0f} MiB, above the cap of {max_bytes / 2**20:.0f} "
                                "MiB; pass a smaller file")
    return path
