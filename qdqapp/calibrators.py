"""Calibrators by name, for every command and config file.

The names are ``qdq.calib``'s choices (``max``, ``entropy``, ``mse``, ``percentile-P`` with
0 < P <= 100; its registry is the one table of them): ``max`` calibrates activations with
the max calibrator, every other name collects histograms and searches amax on them.
Weights keep their per-channel max whatever the name. This module turns a name into
``sensitivity.calibrate`` keywords and a bad name into one command-line error; the flags
naming calibrators are parsed by :func:`qdqapp.specs.parse_calibrators`.
"""

from __future__ import annotations

from typing import Any

from qdq.calib import DEFAULT_CHOICES, CalibrationError, parse_choice
from qdqapp.errors import CliError

__all__ = ["DEFAULT_COMPARISON", "calibrator_settings"]

#: What ``qdq run`` and ``qdq calibrate --compare`` try unless told otherwise.
DEFAULT_COMPARISON = DEFAULT_CHOICES


def calibrator_settings(name: str) -> dict[str, Any]:
    """``sensitivity.calibrate`` keywords for ``name``: ``percentile-99.99`` ->
    ``{"method": "histogram", "amax_method": "percentile", "percentile": 99.99}``."""
    try:
        amax_method, kwargs = parse_choice(name)
    except CalibrationError as err:
        raise CliError(str(err)) from err
    if amax_method == "max":
        return {"method": "max", "amax_method": None}
    return {"method": "histogram", "amax_method": amax_method, **kwargs}
