"""The run folder: every artifact of ``qdq run`` plus ``state.json``, which records the
stages that finished (so a re-run skips them) and the files the run wrote.

Creating a :class:`RunFolder` only checks (the path, an earlier run's config); nothing is
written until :meth:`RunFolder.open`, which marks the folder as a run's
(:mod:`qdqapp.outputs`: other commands then refuse to write into it). Files are written
atomically, and a stage is marked done only after its files exist. ``restart`` deletes
only the files an earlier run recorded as its own, never anything else in the folder; a
run that fails before any stage finished removes what it wrote (:meth:`RunFolder.discard`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from qdq.fileio import atomic_write
from qdqapp.errors import CliError, first_line
from qdqapp.logs import OwnInfo
from qdqapp.outputs import MARKER, OutputSpec, mark, parse_output

__all__ = ["RunFolder", "QUANTIZED", "STATE"]

STATE = "state.json"
QUANTIZED = "quantized.pt"


def _files(root: Path) -> set[str]:
    if not root.is_dir():
        return set()
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


class RunFolder:
    """A folder of results with a record of finished stages and of the files written."""

    def __init__(self, root: OutputSpec | str | Path, fingerprint: dict[str, Any],
                 restart: bool = False) -> None:
        spec = root if isinstance(root, OutputSpec) else parse_output(root, "run")
        self.root = spec.path
        self.restart = restart
        self.state: dict[str, Any] = {"config": fingerprint, "stages": {}, "files": []}
        self._previous: dict[str, Any] | None = None
        self._created: Path | None = None
        self._foreign: set[str] = set()
        path = self.root / STATE
        if path.exists():
            try:
                self._previous = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise CliError(f"{path} is corrupt ({err}); rerun with --restart") from err
            if not restart:
                saved = self._previous.get("config", {})
                changed = sorted(k for k in set(fingerprint) | set(saved)
                                 if fingerprint.get(k) != saved.get(k))
                if changed:
                    raise CliError(
                        f"run folder {self.root} holds a run with a different config "
                        f"(changed: {', '.join(changed)}); pass --restart to start over or "
                        "choose another --out")

    @property
    def resuming(self) -> bool:
        return self._previous is not None and not self.restart

    def open(self) -> RunFolder:
        """Create the folder (and, with ``restart``, delete the earlier run's files)."""
        missing = [p for p in [self.root, *self.root.parents] if not p.exists()]
        self._created = missing[-1] if missing else None
        if self._previous is not None and self.restart:
            self._delete(self._previous.get("files", []))
        elif self._previous is not None:
            self.state = self._previous
            self.state.setdefault("files", [])
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise CliError(f"run folder {self.root} is not writable")
        self._foreign = _files(self.root) - set(self.state["files"]) - {STATE}
        mark(self.root, "run")
        return self

    def _delete(self, names: list[str]) -> None:
        for name in {*names, STATE}:
            (self.root / name).unlink(missing_ok=True)
        folders = sorted({(self.root / n).parent for n in names} - {self.root},
                         key=lambda p: len(p.parts), reverse=True)
        for folder in folders:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()

    def discard(self) -> None:
        """Remove what this run wrote, when no stage finished (nothing to resume)."""
        if any(s.get("status") in ("done", "skipped") for s in self.state["stages"].values()):
            return
        self._delete(sorted(_files(self.root) - self._foreign))
        if self._created is not None and self._created.is_dir() and not _files(self._created):
            import shutil

            shutil.rmtree(self._created, ignore_errors=True)

    def path(self, name: str) -> Path:
        return self.root / name

    def done(self, stage: str) -> bool:
        return self.state["stages"].get(stage, {}).get("status") in ("done", "skipped")

    def result(self, stage: str) -> dict[str, Any]:
        return self.state["stages"].get(stage, {}).get("result", {})

    def results(self) -> dict[str, dict[str, Any]]:
        return {name: entry.get("result", {}) for name, entry in self.state["stages"].items()}

    def status(self, stage: str) -> str:
        return self.state["stages"].get(stage, {}).get("status", "pending")

    def mark(self, stage: str, status: str, result: dict[str, Any], seconds: float) -> None:
        self.state["stages"][stage] = {"status": status, "result": result,
                                       "seconds": round(seconds, 2), "finished": time.time()}
        self.save_state()

    def save_state(self) -> None:
        self.state["files"] = sorted((_files(self.root) - self._foreign - {STATE, MARKER})
                                     | {"run.log"})
        self.write_json(STATE, self.state)

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        atomic_write(path, text)
        return path

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=1, default=str) + "\n")

    def log_handler(self) -> logging.Handler:
        """The full log (INFO and up, whatever the console shows) into ``run.log``."""
        handler = _RunLog(self.path("run.log"))
        handler.setLevel(logging.INFO)
        handler.addFilter(OwnInfo())
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return handler


class _RunLog(logging.FileHandler):
    """``run.log``; when it cannot be written (a full disk), one line says so, instead of
    logging's traceback for every record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            print(f"qdq: cannot write {self.baseFilename} ({first_line(sys.exc_info()[1])}); "
                  "the rest of the log is on the console only", file=sys.stderr)
