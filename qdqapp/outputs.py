"""Where commands write: checked before any work, owned by the command that made it, and
cleaned up when a command fails.

:func:`parse_output` turns ``--out`` (and the other output flags) into an
:class:`OutputSpec`, refusing up front what cannot work: a folder where a file is asked
for, a file where a folder is asked for, a missing or read-only parent, a name longer
than the file system allows (``os.pathconf``: ``PC_NAME_MAX`` per name, ``PC_PATH_MAX``
for the path with the files written inside), and another command's folder.

Ownership: an output folder holds :data:`MARKER` (``{"command": "calibrate"}``), written
when the command creates or takes the folder. A command refuses to write into a folder
another command owns (``qdq run --out`` a calibrate folder would replace its
``quantized.pt``; ``qdq calibrate --out`` a run folder would break the run's resume), and
a single-file command refuses to replace a file in such a folder, unless ``--force``.
The same command into its own folder is a re-run (``qdq run`` and ``qdq sensitivity``
resume, ``qdq calibrate`` replaces its results). Folders that qdq wrote before the marker
existed are recognised by their files (:data:`SIGNATURES`); a folder of the user's own
files belongs to no one.

A command writes inside :class:`OutputFolder`, which creates the folder and, when the
command fails, removes every file that was not there before and every folder it created,
so a failed command leaves nothing behind. Files named in ``keep`` (a sweep's
``rows.jsonl``, written as measurements finish, and what they were measured with) survive
a failure when the first of them holds something, so the same command resumes where it
stopped.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from qdq.fileio import TEMP_PREFIX, atomic_write
from qdqapp.errors import CliError

__all__ = ["OutputSpec", "parse_output", "check_output_file", "check_output_folder",
           "check_name_lengths", "owner_of", "mark", "MARKER", "SIGNATURES", "OutputFolder",
           "NewFiles"]

#: the file in an output folder that names the command owning it
MARKER = ".qdq-owner.json"
#: files by which a folder written before :data:`MARKER` existed shows its command, in
#: the order they are looked for (a run folder has no calibration.json; a sensitivity
#: folder has one)
SIGNATURES = (("state.json", "run"), ("sweep.json", "sensitivity"),
              ("rows.jsonl", "sensitivity"), ("calibration.json", "calibrate"))
#: room for the names commands write inside their folders (``sensitivity/rows.jsonl``)
#: and atomic_write's temporary folder
_INNER = 48 + len(TEMP_PREFIX) + 10


@dataclass(frozen=True)
class OutputSpec:
    """Where a command writes: a folder (``folder``) or one file, checked; ``command``
    is the ``qdq`` command that writes there (and will own the folder)."""

    path: Path
    command: str
    folder: bool = True
    force: bool = False


def _nearest_existing(path: Path) -> Path:
    for parent in [path, *path.parents]:
        if os.path.exists(parent):  # False, not an error, for a name too long to look up
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


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return int(os.pathconf(path, name))
    except (OSError, ValueError):
        return default


def check_name_lengths(path: str | os.PathLike, what: str = "--out", inner: int = 0) -> None:
    """Every name of ``path`` still to be created fits the file system's name limit, and
    the whole path, with ``inner`` more bytes for what goes inside, its path limit."""
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    base = _nearest_existing(absolute)
    limit = _pathconf(base, "PC_NAME_MAX", 255)
    for part in absolute.relative_to(base).parts:
        size = len(os.fsencode(part))
        if size > limit:
            shown = part if len(part) <= 40 else f"{part[:18]}...{part[-18:]}"
            raise CliError(f"{what} {path}: the name {shown!r} is {size} bytes long; this "
                           f"file system allows at most {limit}")
    longest = _pathconf(base, "PC_PATH_MAX", 4096)
    size = len(os.fsencode(str(absolute))) + inner
    if size >= longest:
        raise CliError(f"{what} {path}: the path is too long for this file system "
                       f"({size} bytes with what is written inside; at most {longest - 1})")


def _marked(folder: Path) -> str | None:
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        command = json.loads(marker.read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        command = None
    return command if isinstance(command, str) and command else "(unreadable marker)"


def owner_of(folder: str | os.PathLike) -> str | None:
    """The command that owns ``folder``: its marker, else the files an older qdq left
    there, else the marker of the nearest folder above it; None for nobody's folder."""
    folder = Path(os.path.abspath(folder))
    if folder.is_dir():
        owner = _marked(folder)
        if owner is not None:
            return owner
        for name, command in SIGNATURES:
            if (folder / name).is_file():
                return command
    for parent in folder.parents:
        owner = _marked(parent)
        if owner is not None:
            return owner
    return None


def parse_output(path: str | os.PathLike, command: str, *, folder: bool = True,
                 what: str = "--out", force: bool = False) -> OutputSpec:
    """``--out`` (or another output flag, ``what``) of ``qdq command``, checked: the path,
    its names' lengths, and that no other command's folder is written into (unless
    ``force``)."""
    path = Path(path)
    check_name_lengths(path, what, _INNER if folder else len(TEMP_PREFIX) + 10)
    if folder:
        check_output_folder(path, what)
    else:
        check_output_file(path, what)
    owner = owner_of(path if folder else path.parent)
    if owner is not None and owner != command and not force:
        if folder:
            raise CliError(f"{what} {path}: a qdq {owner} folder; qdq {command} would "
                           "replace or break its files (pass --force to write there "
                           f"anyway, or choose another {what})")
        if path.exists():
            raise CliError(f"{what} {path}: the file belongs to the qdq {owner} folder "
                           f"{path.parent} (pass --force to replace it, or choose another "
                           f"{what})")
    return OutputSpec(path, command, folder, force)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()} \
        if root.is_dir() else set()


def mark(folder: Path, command: str) -> None:
    """Record that ``command`` owns ``folder`` (unless it says so already)."""
    if _marked(folder) != command:
        atomic_write(folder / MARKER, json.dumps({"command": command}) + "\n")


class OutputFolder:
    """``with OutputFolder(spec) as out:`` creates the folder and marks it as the spec's
    command's; on an exception inside, removes what appeared in it (except non-empty
    ``keep`` files) and the folders it created. A plain path is checked here and
    left unmarked."""

    def __init__(self, spec: OutputSpec | str | os.PathLike,
                 keep: tuple[str, ...] = ()) -> None:
        if isinstance(spec, OutputSpec):
            self.path, self.command = spec.path, spec.command
        else:
            self.path, self.command = check_output_folder(spec), None
        self.keep = keep
        self._created: Path | None = None
        self._before: set[Path] = set()

    def __enter__(self) -> Path:
        missing = [p for p in [self.path, *self.path.parents] if not p.exists()]
        self._created = missing[-1] if missing else None
        self._before = _files(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if self.command is not None:
            mark(self.path, self.command)
        return self.path

    def _kept(self, p: Path) -> bool:
        progress = self.path / self.keep[0] if self.keep else None
        return (p.parent == self.path and p.name in self.keep and progress is not None
                and progress.is_file() and progress.stat().st_size > 0)

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        new = [p for p in _files(self.path) - self._before if not self._kept(p)]
        if any(self._kept(p) for p in _files(self.path)):
            new = [p for p in new if p.name != MARKER]  # what resumes stays owned
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
