"""Calibrators by name, for every command and config file: the one table of the app.

``max``, ``entropy``, ``mse`` and ``percentile-P`` (0 < P <= 100), as
``sensitivity.compare_calibrators`` names them. ``max`` calibrates activations with the
max calibrator; every other name collects histograms and searches amax on them. Weights
keep their per-channel max whatever the name.
"""

from __future__ import annotations

from typing import Any

from qdqapp.errors import CliError

__all__ = ["DEFAULT_COMPARISON", "calibrator_settings", "check_calibrator",
           "parse_calibrators"]

#: What ``qdq run`` and ``qdq calibrate --compare`` try unless told otherwise.
DEFAULT_COMPARISON = ("max", "entropy", "percentile-99.9", "percentile-99.99",
                      "percentile-99.999", "mse")


def calibrator_settings(name: str) -> dict[str, Any]:
    """``sensitivity.calibrate`` keywords for ``name``: ``percentile-99.99`` ->
    ``{"method": "histogram", "amax_method": "percentile", "percentile": 99.99}``."""
    from sensitivity.compare import parse_method
    from sensitivity.errors import SensitivityError

    try:
        amax_method, kwargs = parse_method(name)
    except SensitivityError as err:
        raise CliError(str(err)) from err
    if amax_method == "max":
        return {"method": "max", "amax_method": None}
    return {"method": "histogram", "amax_method": amax_method, **kwargs}


def check_calibrator(name: str) -> str:
    calibrator_settings(name)
    return name


def parse_calibrators(text: str | list[str]) -> list[str]:
    """``"max,percentile-99.99"`` (or a list) -> checked names; empty is refused."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n]
    if not names:
        raise CliError("calibrators: the list is empty")
    return [check_calibrator(n) for n in names]
