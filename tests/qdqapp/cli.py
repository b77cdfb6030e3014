"""Run the ``qdq`` command in this process (fast) or in a subprocess (as users do)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def error_lines(self) -> list[str]:
        """stderr without progress bars and warnings: what a person reads as the error."""
        return [ln for ln in self.err.splitlines() if ln.strip() and "Warning" not in ln
                and "%|" not in ln]


def qdq(*args: str) -> Result:
    """``qdq ARGS`` in this process, stdout and stderr captured."""
    from qdqapp.cli import main

    out, err = io.StringIO(), io.StringIO()
    level = logging.getLogger().level
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in args])
        except SystemExit as done:  # --help, argparse usage errors
            code = done.code if isinstance(done.code, int) else 1
    logging.getLogger().setLevel(level)
    return Result(code, out.getvalue(), err.getvalue())


def qdq_process(*args: str, cwd: Path | None = None, env: dict | None = None,
                timeout: int = 600) -> Result:
    """``python -m qdqapp.cli ARGS`` in a subprocess."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    done = subprocess.run([sys.executable, "-m", "qdqapp.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=full_env)
    return Result(done.returncode, done.stdout, done.stderr)


def fill_in(text: str, places: dict[str, str]) -> str:
    """A test case's placeholders (``{tmp}``, ``{in}``) replaced by real paths."""
    for key, value in places.items():
        text = text.replace(key, value)
    return text


def listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
