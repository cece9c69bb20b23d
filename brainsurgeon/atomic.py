"""Atomic file output: a run either writes the whole file or leaves nothing behind."""
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import BrainSurgeonError


def check_writable(path) -> Path:
    """Fail before any work if `path` cannot be written (missing or read-only directory)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise BrainSurgeonError(f"cannot write {path}: directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise BrainSurgeonError(f"cannot write {path}: directory {parent} is not writable; choose another output path")
    if path.is_dir():
        raise BrainSurgeonError(f"cannot write {path}: it is a directory; give a file name")
    return path


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
