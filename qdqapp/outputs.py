"""Where commands write: checked before any work, and cleaned up when a command fails.

Output paths are refused up front when they cannot work (a folder where a file is
asked for, a file where a folder is asked for, a missing or read-only parent). A
command writes inside :class:`OutputFolder`, which creates the folder and, when the
command fails, removes every file that was not there before and every folder it created,
so a failed command leaves nothing behind. Files named in ``keep`` (a sweep's
``rows.jsonl``, written as measurements finish, and what they were measured with) survive
a failure when the first of them holds something, so the same command resumes where it
stopped.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from qdqapp.errors import CliError

__all__ = ["check_output_file", "check_output_folder", "OutputFolder", "NewFiles"]


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if parent.exists():
            return parent
    return Path(".")


def check_output_file(path: str | os.PathLike, what: str = "--out") -> Path:
    """A file to write: not a folder, its folder exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise CliError(f"{what} {path}: is a folder; give a file path")
    parent = path.parent
    if not parent.exists():
        raise CliError(f"{what} {path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise CliError(f"{what} {path}: {parent} is not a folder")
    if not os.access(parent, os.W_OK):
        raise CliError(f"{what} {path}: folder {parent} is not writable")
    return path


def check_output_folder(path: str | os.PathLike, what: str = "--out") -> Path:
    """A folder to write into: a folder or nothing yet, under a writable folder."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise CliError(f"{what} {path}: is a file, not a folder")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise CliError(f"{what} {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK):
        raise CliError(f"{what} {path}: {base} is not writable")
    return path


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()} \
        if root.is_dir() else set()


class OutputFolder:
    """``with OutputFolder(path) as out:`` creates ``path``; on an exception inside,
    removes what appeared in it (except non-empty ``keep`` files) and the folders it
    created."""

    def __init__(self, path: str | os.PathLike, keep: tuple[str, ...] = ()) -> None:
        self.path = check_output_folder(path)
        self.keep = keep
        self._created: Path | None = None
        self._before: set[Path] = set()

    def __enter__(self) -> Path:
        missing = [p for p in [self.path, *self.path.parents] if not p.exists()]
        self._created = missing[-1] if missing else None
        self._before = _files(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    def _kept(self, p: Path) -> bool:
        progress = self.path / self.keep[0] if self.keep else None
        return (p.parent == self.path and p.name in self.keep and progress is not None
                and progress.is_file() and progress.stat().st_size > 0)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        new = [p for p in _files(self.path) - self._before if not self._kept(p)]
        for p in new:
            p.unlink(missing_ok=True)
        for folder in sorted((p for p in self.path.rglob("*") if p.is_dir()),
                             key=lambda p: len(p.parts), reverse=True):
            if not any(folder.iterdir()):
                folder.rmdir()
        if self._created is not None and self.path.exists() and not _files(self._created):
            shutil.rmtree(self._created, ignore_errors=True)


class NewFiles:
    """``with NewFiles([a, b]):`` removes those of the files that did not exist before
    when the block fails (a command that writes single files, like ``qdq export``)."""

    def __init__(self, paths: list[Path | None]) -> None:
        self.paths = [Path(p) for p in paths if p is not None]
        self._new: list[Path] = []

    def __enter__(self) -> NewFiles:
        self._new = [p for p in self.paths if not p.exists()]
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            for p in self._new:
                p.unlink(missing_ok=True)
