"""One way to write a file: whole or not at all.

Every file qdq and the packages above it write (checkpoints, ONNX models, engines,
reports, plots) goes through :func:`atomic_write`, so an interrupted or failed write
leaves the previous file (or none), never half of one, and every file gets the same
permissions as a plain ``open(path, "w")`` would give it (``0o666`` less the umask).

Example::

    atomic_write("summary.json", json.dumps(summary))
    atomic_write("model.pt", functools.partial(torch.save, state))
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, data: str | bytes | Callable[[Path], object],
                 *, parents: bool = True) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder.

    ``data`` is text (UTF-8), bytes, or a callable ``write(tmp_path)`` for libraries
    that save to a path themselves (``torch.save``, ``onnx.save``, ``fig.savefig``).
    The temporary file is created by ``os.open`` with mode ``0o666``, so the kernel
    applies the umask (``tempfile.mkstemp`` would make it private), flushed to disk,
    then renamed over ``path``. On any error the temporary file is removed and the
    error propagates. ``parents=False`` refuses to create a missing folder.

    Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder, not a file path")
    if parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    elif not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist (writing {path.name})")
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
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
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    return path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
