"""File and folder outputs. A run never deletes or replaces what it did not write: an existing output is refused
unless the caller passes `overwrite`, and even then a folder is replaced only when a marker file shows that
brainsurgeon wrote it and it holds nothing else. Every output of a run is built in scratch beside its target and
renamed into place together at the end; on any failure (SIGTERM included: the CLI turns it into an exception)
the scratch is removed and every pre-existing file is left as it was. Modes follow the umask."""
import errno
import json
import os
import shutil
import stat
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from .errors import BrainSurgeonError, first_line

MARKER = ".brainsurgeon-output.json"  # in every folder this library writes: what it wrote there
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)  # a full disk or quota, a read-only disk
OVERWRITE_HINT = "choose a new path, or pass --overwrite (API: overwrite=True) to replace it"


def write_errors() -> tuple:
    """Exception types that mean a write failed (a full disk, a quota): OSError, and safetensors' own error,
    which is not an OSError."""
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - safetensors is a dependency
        return (OSError,)
    return (OSError, SafetensorError)


def _parent(path: Path) -> Path:
    return path.parent if str(path.parent) else Path(".")


def _check_place(path: Path, what: str) -> None:
    """`path` may become a new `what`: not a symlink, its directory exists and is writable."""
    if path.is_symlink():
        raise BrainSurgeonError(f"cannot write {path}: it is a symbolic link; give the path it points to "
                                f"({os.path.realpath(path)}) or another {what} name")
    parent = _parent(path)
    if not parent.is_dir():
        raise BrainSurgeonError(f"cannot write {path}: directory {parent} does not exist; create it or choose "
                                "another path")
    if not os.access(parent, os.W_OK):
        raise BrainSurgeonError(f"cannot write {path}: directory {parent} is not writable; choose another path")


def check_writable(path, overwrite: bool = False) -> Path:
    """Fail before any work unless `path` can become a regular file: its directory exists and is writable; it is
    not a directory, a device, a pipe or a symlink (replacing a symlink would not write where it points, and as
    root replacing /dev/full would destroy the device); and it does not exist, unless `overwrite`."""
    path = Path(path)
    _check_place(path, "file")
    if path.exists():
        if not stat.S_ISREG(path.stat().st_mode):
            kind = "a directory" if path.is_dir() else "not a regular file (a device, pipe or socket)"
            raise BrainSurgeonError(f"cannot write {path}: it is {kind}; give a file name")
        if not overwrite:
            raise BrainSurgeonError(f"cannot write {path}: the file exists; {OVERWRITE_HINT}")
    return path


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_folder(target, inputs=(), overwrite: bool = False) -> Path:
    """Fail before any work unless `target` can become a folder of outputs: a new folder, or with `overwrite` one
    that brainsurgeon wrote and that holds only what it wrote; never one that holds or lies inside an input
    (`inputs`: files or folders the run reads) or the current directory."""
    target = Path(target)
    _check_place(target, "folder")
    real = os.path.realpath(target)
    for given in [*inputs, "."]:
        source = os.path.realpath(given)
        if _inside(source, real) or (given != "." and _inside(real, source)):
            kind = "the current directory" if given == "." else f"the input {given}"
            raise BrainSurgeonError(f"cannot write folder {target}: it overlaps {kind}, which must stay as it is; "
                                    "choose a new folder outside it")
    if target.exists():
        if not target.is_dir():
            raise BrainSurgeonError(f"cannot write folder {target}: a file of that name exists; choose another path")
        if not overwrite:
            raise BrainSurgeonError(f"cannot write folder {target}: it exists; {OVERWRITE_HINT} (only a folder "
                                    "brainsurgeon wrote is replaced)")
        _check_written_here(target)
    return target


def _check_written_here(folder: Path) -> None:
    """Refuse to replace `folder` unless its marker lists exactly what it holds."""
    try:
        listed = set(json.loads((folder / MARKER).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise BrainSurgeonError(f"cannot replace folder {folder}: brainsurgeon did not write it (no valid {MARKER}); "
                                "choose a new folder") from None
    found = {str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir()} - {MARKER}
    extra = sorted(found - listed)
    if extra:
        raise BrainSurgeonError(f"cannot replace folder {folder}: it holds files brainsurgeon did not write "
                                f"({', '.join(extra[:3])}{' ...' if len(extra) > 3 else ''}); move them or choose "
                                "a new folder")


def _umask() -> int:
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


def _finish_folder(folder: Path) -> None:
    """Write the marker and give every file and folder the modes open() and mkdir() would (mkdtemp gives 0700,
    and some writers 0600)."""
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if not path.is_dir())
    (folder / MARKER).write_text(json.dumps({"written_by": "brainsurgeon", "files": files}, indent=1) + "\n")
    umask = _umask()
    for path in [folder, *folder.rglob("*")]:
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


class Outputs:
    """The outputs of one run, staged in scratch beside their targets and published together by `commit`."""

    def __init__(self, overwrite: bool = False):
        self.overwrite = overwrite
        self.staged = []  # (target, scratch, the inputs a folder must not overlap; None for a file)

    def file(self, path) -> Path:
        """A scratch path to write the file `path` to."""
        path = check_writable(path, self.overwrite)
        self._check_distinct(path, False)
        scratch = _parent(path) / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
        self.staged.append((path, scratch, None))
        return scratch

    def folder(self, path, inputs=()) -> Path:
        """A scratch folder (created) to build the folder `path` in."""
        path = check_folder(path, inputs, self.overwrite)
        self._check_distinct(path, True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=_parent(path)))
        self.staged.append((path, scratch, tuple(inputs)))
        return scratch

    def _check_distinct(self, path: Path, is_folder: bool) -> None:
        """No two outputs on one path, and none inside an output folder (it is built elsewhere and renamed)."""
        real = os.path.realpath(path)
        for other, _, other_inputs in self.staged:
            other_real, other_is_folder = os.path.realpath(other), other_inputs is not None
            if other_real == real:
                raise BrainSurgeonError(f"two outputs go to the same path {path} (also given as {other}); give each "
                                        "output its own path")
            if (other_is_folder and _inside(real, other_real)) or (is_folder and _inside(other_real, real)):
                inner, outer = (path, other) if other_is_folder else (other, path)
                raise BrainSurgeonError(f"output {inner} lies inside the output folder {outer}; put it beside the "
                                        "folder")

    def commit(self) -> None:
        """Rename every scratch into place; if one rename fails, put back what was there before. Each target is
        checked again first: what appeared there during the run is the user's, and is refused like any other."""
        umask = _umask()
        for target, scratch, inputs in self.staged:
            if inputs is not None:
                _finish_folder(scratch)
            elif scratch.exists():
                os.chmod(scratch, 0o666 & ~umask)
        published, moved_aside = [], []  # what this commit renamed into place; (target, its previous content)
        try:
            for target, scratch, inputs in self.staged:
                if not scratch.exists():
                    continue  # a writer that chose not to write (nothing to plot)
                if inputs is None:
                    check_writable(target, self.overwrite)
                else:
                    check_folder(target, inputs, self.overwrite)
                if target.exists():  # only with overwrite, and for a folder only one this library wrote whole
                    aside = _parent(target) / f".{target.name}.{uuid.uuid4().hex[:8]}.old"
                    target.rename(aside)
                    moved_aside.append((target, aside))
                scratch.rename(target)
                published.append(target)
        except BaseException:
            for target in published:
                _remove(target)
            for target, aside in moved_aside:
                aside.rename(target)
            raise
        for _, aside in moved_aside:
            _remove(aside)
        self.staged = []

    def wrote(self, error: BaseException) -> bool:
        """Whether `error` is a failed write of an output: safetensors' own error, a full disk or quota, a
        read-only file system, or an OSError naming a scratch path (not one raised while reading an input)."""
        if not isinstance(error, OSError) or error.errno in WRITE_ERRNOS:
            return True
        if error.filename is None:
            return error.errno is None  # a library's write error, passed on as OSError(message) (models/hf.py)
        named = os.path.realpath(error.filename)
        return any(_inside(named, os.path.realpath(scratch)) for _, scratch, _ in self.staged)

    def discard(self) -> None:
        for _, scratch, _ in self.staged:
            _remove(scratch)
        self.staged = []


def _remove(path: Path) -> None:
    """Remove a file or folder this library wrote (scratch, or an output being rolled back)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def outputs(overwrite: bool = False):
    """`with outputs() as out:` stage with out.file(path) / out.folder(path); all are published when the block
    ends without an error, none otherwise. A write that fails (a full disk) is one BrainSurgeonError."""
    staged = Outputs(overwrite)
    try:
        yield staged
        staged.commit()
    except write_errors() as error:
        if not staged.wrote(error):  # reading an input failed: the caller reports it as such
            staged.discard()
            raise
        targets = ", ".join(str(target) for target, _, _ in staged.staged) or "the outputs"
        staged.discard()
        raise BrainSurgeonError(f"cannot write {targets}: {_reason(error)}; free space or choose another "
                                "path") from None
    except BaseException:
        staged.discard()
        raise


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = first_line(error)
    return "No space left on device" if "StorageFull" in text or "No space" in text else text


@contextmanager
def atomic_path(path, overwrite: bool = False):
    """Yield a scratch path beside `path`, renamed over it only if the block succeeds."""
    with outputs(overwrite) as staged:
        yield staged.file(path)


def write_text(path, text: str, overwrite: bool = False) -> None:
    with atomic_path(path, overwrite) as tmp:
        tmp.write_text(text)


def check_outputs(*paths, overwrite: bool = False) -> None:
    """Every given output file writable, and no two the same path (one would overwrite the other)."""
    staged = Outputs(overwrite)
    for path in filter(None, paths):
        staged.file(path)
