"""Where a report came from: date, qdq version, command line and machine.

Every report qdq writes (the sensitivity report, the calibrator comparison, ``qdq run``'s
report and ``summary.json``, ``calibration.json``, ...) carries one :func:`provenance`
record, so a file found later says when, by which version, with which command and on
which machine and device it was made:

==============  ===========================================================
``date``        UTC, ISO 8601 to the second (``2025-01-31T12:00:00Z``)
``qdq``         the qdq version
``command``     the command line: the ``qdq`` command as typed when run by the CLI
                (:func:`recording_command`), else the Python process's ``sys.argv``
``host``        the machine's host name
``platform``    operating system and architecture; the Python version
``torch``       the torch version
``device``      the device the model ran on (``cpu``, ``cuda:0 (NVIDIA H100 ...)``)
==============  ===========================================================

Example::

    with recording_command(["qdq", "sensitivity", "reference", "--out", "runs/s"]):
        record = provenance(device="cpu")
    provenance_line(record)   # 'made 2025-... by `qdq sensitivity ...` with qdq 0.1.0 ...'
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import platform
import shlex
import socket
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["provenance", "provenance_line", "recording_command", "command_line"]

_COMMAND: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar(
    "qdq_command", default=None)


@contextlib.contextmanager
def recording_command(argv: Sequence[str]) -> Iterator[None]:
    """Inside the block, reports name ``argv`` as the command that made them (the CLI
    wraps each command in it); the previous command comes back on exit."""
    token = _COMMAND.set(tuple(str(a) for a in argv))
    try:
        yield
    finally:
        _COMMAND.reset(token)


def command_line() -> str:
    """The command line being run, shell-quoted so it can be pasted."""
    argv = _COMMAND.get()
    if argv is None:
        argv = ("python", *sys.argv) if sys.argv and sys.argv[0] else ("python",)
    return shlex.join(argv)


def _device_text(device: torch.device | str | None) -> str:
    if device is None:
        return "cpu"
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return str(device)


def provenance(device: torch.device | str | None = None) -> dict[str, Any]:
    """The record described in the module docstring, for a report written now."""
    from qdq import __version__

    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    return {
        "date": now.isoformat().replace("+00:00", "Z"),
        "qdq": __version__,
        "command": command_line(),
        "host": socket.gethostname(),
        "platform": f"{platform.platform()}, Python {platform.python_version()}",
        "torch": str(torch.__version__),  # a str subclass torch.load refuses
        "device": _device_text(device),
    }


def provenance_line(record: dict[str, Any] | None) -> str:
    """One line of Markdown for a report's head (empty for no record)."""
    if not record:
        return ""
    return (f"Made {record.get('date', '?')} by `{record.get('command', '?')}` with qdq "
            f"{record.get('qdq', '?')}, torch {record.get('torch', '?')} on "
            f"{record.get('host', '?')} ({record.get('platform', '?')}), device "
            f"{record.get('device', '?')}.")
