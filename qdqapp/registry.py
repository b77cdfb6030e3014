"""The registry behind model kinds and data kinds: entries by name, in registration order."""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

__all__ = ["Registry"]


class _Entry(Protocol):
    name: str
    grammar: str


E = TypeVar("E", bound=_Entry)


class Registry(dict[str, E], Generic[E]):
    """``name -> entry``; registering a taken name is refused, so kinds never shadow."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def register(self, entry: E) -> E:
        if entry.name in self:
            raise ValueError(f"a {self.what} named {entry.name!r} is already registered")
        self[entry.name] = entry
        return entry

    def grammar(self, skip: tuple[str, ...] = ()) -> str:
        """The spellings users may write, for error messages."""
        return ", ".join(f"'{e.grammar}'" for e in self.values() if e.name not in skip)
