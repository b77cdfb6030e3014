"""The application's one error type: bad input or a failed check, printed as one line."""

from __future__ import annotations

__all__ = ["CliError", "first_line"]


class CliError(Exception):
    """Bad input (exit status 2) or a failed check (``code=1``); the message names what
    is at fault and is printed as one line."""

    def __init__(self, message: str, code: int = 2) -> None:
        super().__init__(message)
        self.code = code


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's text (its type name if it has none)."""
    lines = [ln.strip() for ln in str(err).strip().splitlines() if ln.strip()]
    return lines[0] if lines else type(err).__name__
