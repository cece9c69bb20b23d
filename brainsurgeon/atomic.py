"""File output: a run writes each output whole, as a regular file with the usual permissions, or leaves nothing."""
import os
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import BrainSurgeonError


def check_writable(path) -> Path:
    """Fail before any work unless `path` can become a regular file: its directory exists and is writable, and
    it is not a directory, a device, a pipe or a symlink (replacing a symlink would not write where it points,
    and as root replacing /dev/full would destroy the device)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_symlink():
        raise BrainSurgeonError(f"cannot write {path}: it is a symbolic link; give the path it points to "
                                f"({os.path.realpath(path)}) or another file name")
    if path.exists() and not stat.S_ISREG(path.stat().st_mode):
        kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise BrainSurgeonError(f"cannot write {path}: it is {kind}; give a file name")
    if not parent.is_dir():
        raise BrainSurgeonError(f"cannot write {path}: directory {parent} does not exist; create it or choose another path")
    if not os.access(parent, os.W_OK):
        raise BrainSurgeonError(f"cannot write {path}: directory {parent} is not writable; choose another output path")
    return path


def check_outputs(*paths) -> None:
    """Every given output path writable, and no two the same file (one would overwrite the other)."""
    seen = {}
    for path in filter(None, paths):
        check_writable(path)
        real = os.path.realpath(path)
        if real in seen:
            raise BrainSurgeonError(f"two outputs go to the same file {path} (also given as {seen[real]}); "
                                    "give each output its own path")
        seen[real] = path


def _creation_mode() -> int:
    """0o666 less the process umask: what open() would give a new file (mkstemp gives 0o600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


@contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; rename it over `path` only if the block succeeds. The temporary
    file is removed on any exit, SIGTERM included (the CLI turns it into an exception)."""
    path = check_writable(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        try:
            yield Path(tmp)
            os.chmod(tmp, _creation_mode())
            os.replace(tmp, path)
        except OSError as error:  # a full disk, a quota, a vanished directory
            raise BrainSurgeonError(f"cannot write {path}: {error.strerror or error}; free space or choose "
                                    "another path") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
