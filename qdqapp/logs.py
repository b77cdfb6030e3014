"""What the console and ``run.log`` show: our INFO progress, everyone's warnings.

Libraries below us (onnxscript, onnx_ir, torch's exporters) log at INFO too; passing the
root logger's INFO level to them would bury the progress lines, so below WARNING only the
project's own loggers get through.
"""

from __future__ import annotations

import logging

__all__ = ["OwnInfo", "OURS"]

OURS = frozenset({"qdq", "qdqapp", "sensitivity", "export"})


class OwnInfo(logging.Filter):
    """Pass every warning and error, and INFO/DEBUG records of our own packages only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OURS
