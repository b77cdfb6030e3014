"""The one error type the sensitivity package raises for bad input."""

from __future__ import annotations

__all__ = ["SensitivityError"]


class SensitivityError(ValueError):
    """Bad input reached a sensitivity tool; the message names what is at fault."""
