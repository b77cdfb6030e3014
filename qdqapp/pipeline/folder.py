"""The run folder: every artifact of ``qdq run`` plus ``state.json``, which records the
stages that finished so a re-run skips them.

Files are written to a temporary name and renamed into place, and a stage is marked done
only after its files exist, so an interrupted run never leaves a stage half-recorded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import torch

from qdq.fileio import atomic_write

__all__ = ["RunFolder"]

STATE = "state.json"
MODEL_STATE = "model_state.pt"


class RunFolder:
    """A folder of results with a record of finished stages."""

    def __init__(self, root: str | Path, fingerprint: dict[str, Any],
                 restart: bool = False) -> None:
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise FileExistsError(f"run folder {self.root} is a file")
        if restart and (self.root / STATE).exists():
            shutil.rmtree(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise PermissionError(f"run folder {self.root} is not writable")
        self.state: dict[str, Any] = {"config": fingerprint, "stages": {}}
        path = self.root / STATE
        if path.exists():
            try:
                saved = json.loads(path.read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{path} is corrupt ({err}); rerun with --restart") from err
            changed = sorted(k for k in set(fingerprint) | set(saved.get("config", {}))
                             if fingerprint.get(k) != saved.get("config", {}).get(k))
            if changed:
                raise ValueError(
                    f"run folder {self.root} holds a run with a different config (changed: "
                    f"{', '.join(changed)}); pass --restart to start over or choose another "
                    "--out")
            self.state = saved

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
        self.write_json(STATE, self.state)

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        atomic_write(path, text)
        return path

    def write_json(self, name: str, data: Any) -> Path:
        return self.write_text(name, json.dumps(data, indent=1, default=str) + "\n")

    def save_model_state(self, model: torch.nn.Module) -> Path:
        path = self.path(MODEL_STATE)
        atomic_write(path, partial(torch.save, model.state_dict()))
        return path

    def load_model_state(self, model: torch.nn.Module) -> bool:
        path = self.path(MODEL_STATE)
        if not path.exists():
            return False
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return True

    def log_handler(self) -> logging.Handler:
        handler = logging.FileHandler(self.path("run.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        return handler
