"""The application's one error type: bad input or a failed check, printed as one line; and
how its messages name a setting (a flag, or a key of a config file)."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["CliError", "first_line", "flag", "Names", "FLAGS"]


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


def flag(key: str) -> str:
    """The command-line spelling of a setting: ``batch_size`` -> ``--batch-size``."""
    return "--" + key.replace("_", "-")


class Names:
    """What a message calls a setting: its flag (``--batch-size``), or for a key a config
    file set, the key and the file (``batch_size (run.yaml)``), so the user finds it."""

    def __init__(self, config: str | None = None, keys: Iterable[str] = ()) -> None:
        self.config = config
        self.keys = frozenset(keys)

    def __call__(self, key: str) -> str:
        return f"{key} ({self.config})" if key in self.keys else flag(key)


#: every setting named by its flag (the commands other than ``qdq run --config``)
FLAGS = Names()
