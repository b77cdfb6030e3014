"""One way to write a file: whole or not at all.

Every file qdq and the packages above it write (checkpoints, ONNX models, engines,
reports, plots) goes through :func:`atomic_write`, so an interrupted or failed write
leaves the previous file (or none), never half of one, and every file gets the same
permissions as a plain ``open(path, "w")`` would give it (``0o666`` less the umask).

The temporary file has the final file's own name, inside a short-named temporary folder
beside it (``.qdq-XXXXXXXX/NAME``). Two things follow: any name the file system accepts
for the file works (no longer name is ever made from it), and writers that put the file
name into the file see the real one (``torch.save`` to a path uses its stem as the zip
archive's root folder, so the same object saved twice gives the same bytes).

A write that fails because the disk is full or the file-size limit (``ulimit -f``) is
reached raises :class:`DiskFullError`, which names the file, whatever the writer raised
(``torch.save`` raises a ``RuntimeError`` that names only its own archive member).

Example::

    atomic_write("summary.json", json.dumps(summary))
    atomic_write("model.pt", functools.partial(torch.save, state))
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "DiskFullError", "TEMP_PREFIX"]

#: the temporary folder's name starts with this (eight random characters follow)
TEMP_PREFIX = ".qdq-"

#: below this many free bytes a failed write is put down to a full disk
_NEARLY_FULL = 1 << 20


class DiskFullError(OSError):
    """Writing ``path`` failed for want of space (a full disk, a quota, the file-size
    limit); nothing of it was left behind. The message names the file."""

    def __init__(self, path: Path, reason: str, code: int = errno.ENOSPC) -> None:
        super().__init__(code, f"cannot write {path}: {reason}; nothing was written")
        self.filename = str(path)

    def __str__(self) -> str:
        return self.strerror


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], object],
                 *, parents: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    ``data`` is text (UTF-8), bytes, or a callable ``write(tmp_path)`` for libraries
    that save to a path themselves (``torch.save``, ``onnx.save``, ``fig.savefig``);
    ``tmp_path`` has ``path``'s name. The temporary file is created by ``os.open`` with
    mode ``0o666``, so the kernel applies the umask (``tempfile.mkstemp`` would make it
    private), flushed to disk, then renamed over ``path``. On any error the temporary
    file and folder are removed and the error propagates (as :class:`DiskFullError`
    when space ran out). ``parents=False`` refuses to create a missing folder.

    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file path")
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist (writing {path.name})")
    folder = Path(tempfile.mkdtemp(prefix=TEMP_PREFIX, dir=path.parent))
    tmp = folder / path.name
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            if callable(data):
                os.close(fd)
                fd = -1
                data(tmp)
            else:
                with os.fdopen(fd, "wb") as f:
                    fd = -1
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
            _fsync(tmp)
        finally:
            if fd >= 0:
                os.close(fd)
        os.replace(tmp, path)
        _keep_side_files(folder, path.parent)
    except Exception as err:
        full = _out_of_space(err, tmp, path.parent)
        shutil.rmtree(folder, ignore_errors=True)
        if full is not None:
            raise DiskFullError(path, *full) from err
        raise
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    folder.rmdir()
    return path


def _keep_side_files(folder: Path, target: Path) -> None:
    """Files a writer put beside the temporary one (``onnx.save``'s external data)
    belong beside the result."""
    for extra in list(folder.iterdir()):
        os.replace(extra, target / extra.name)


def _out_of_space(err: Exception, tmp: Path, folder: Path) -> tuple[str, int] | None:
    """(why, errno) when ``err`` came from running out of space, else None.

    Decided by the error number where the writer kept it, and otherwise by the state it
    left: a temporary file at the file-size limit, or a file system with (next to) no
    free space, measured before the temporary file is removed."""
    code = getattr(err, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on the device", errno.ENOSPC
    size = tmp.stat().st_size if tmp.is_file() else 0
    limit = _file_size_limit()
    if code == errno.EFBIG or (limit is not None and size >= limit - (1 << 16)):
        shown = f" ({limit} bytes)" if limit is not None else ""
        return f"the file reached the file-size limit (ulimit -f){shown}", errno.EFBIG
    try:
        stats = os.statvfs(folder)
    except OSError:
        return None
    if stats.f_bavail * stats.f_frsize < _NEARLY_FULL:
        return "no space left on the device", errno.ENOSPC
    return None


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # pragma: no cover - not on POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
