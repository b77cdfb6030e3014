"""What the console and ``run.log`` show: our INFO progress, everyone's warnings, and one
line for what the libraries below say while a model is loaded, traced or exported.

Libraries below us (onnxscript, onnx_ir, torch's exporters) log at INFO too; passing the
root logger's INFO level to them would bury the progress lines, so below WARNING only the
project's own loggers get through.

Loading, tracing and exporting a model make torch.fx, torch's exporters and transformers
speak at length (a Hugging Face model gives a line of over a thousand characters of
trace errors, tracer warnings and a progress bar). Those are not the user's problem: inside
:func:`library_chatter` each message goes to the log at DEBUG (``--debug`` shows it) and
the console gets one INFO line counting them, which ``--quiet`` leaves out. Warnings of
our own packages pass through unchanged unless ``ours`` says they are part of the chatter.

Example::

    with library_chatter("exporting to ONNX"):
        export.to_onnx(model, example, path)
    # transformers, torch: 2 warnings while exporting to ONNX (see --debug)
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = ["OwnInfo", "OURS", "library_chatter"]

OURS = frozenset({"qdq", "qdqapp", "sensitivity", "export"})

log = logging.getLogger("qdqapp")


class OwnInfo(logging.Filter):
    """Pass every warning and error, and INFO/DEBUG records of our own packages only."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or record.name.split(".")[0] in OURS


@functools.cache
def _roots() -> dict[str, Path]:
    """Where our own packages live (without importing them)."""
    roots = {}
    for name in OURS:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            roots[name] = Path(next(iter(spec.submodule_search_locations))).resolve()
    return roots


def _package(filename: str) -> str:
    """The top-level package a warning came from, by the file that raised it."""
    path = Path(filename)
    for marker in ("site-packages", "dist-packages"):
        if marker in path.parts:
            rest = path.parts[path.parts.index(marker) + 1:]
            return rest[0].split(".")[0] if rest else "python"
    resolved = path.resolve() if path.is_absolute() else path
    for name, root in _roots().items():
        if resolved.is_relative_to(root):
            return name
    return "python"


class _Collect(logging.Handler):
    def __init__(self, into: list[tuple[str, str]]) -> None:
        super().__init__(logging.DEBUG)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append((record.name.split(".")[0], record.getMessage()))


def _mute_transformers(handler: logging.Handler, load: bool) -> Callable[[], None]:
    """Send transformers' log records to ``handler`` and hide its progress bars; returns
    what undoes it. ``load`` imports its logging module first (it is about to be used),
    so nothing it sets up on import escapes."""
    if load and "transformers" not in sys.modules \
            and importlib.util.find_spec("transformers") is not None:
        importlib.import_module("transformers.utils.logging")
    tf_logging = sys.modules.get("transformers.utils.logging")
    if tf_logging is not None:
        tf_logging.get_logger()  # its handler is set up on first use: before we move it
    logger = logging.getLogger("transformers")
    saved = (list(logger.handlers), logger.propagate)
    logger.handlers, logger.propagate = [handler], False
    bars = tf_logging is not None and tf_logging.is_progress_bar_enabled()
    if bars:
        tf_logging.disable_progress_bar()

    def restore() -> None:
        logger.handlers, logger.propagate = saved
        if bars:
            tf_logging.enable_progress_bar()
    return restore


@contextlib.contextmanager
def library_chatter(what: str, ours: str | None = None, transformers: bool = False
                    ) -> Iterator[None]:
    """Collect the warnings, transformers log records and progress bars of the block:
    each to the log at DEBUG, then one INFO line ``PACKAGES: N warnings while WHAT (see
    --debug)``. Our own packages' warnings are passed on as they are, unless ``ours``
    names what they speak for (the block runs something of ours that reports a library's
    failures at length, like the placement rules reporting what torch.fx cannot trace).
    ``transformers``: the block loads a Hugging Face model (its logging is set up first,
    so its bars are hidden too)."""
    said: list[tuple[str, str]] = []
    restore = _mute_transformers(_Collect(said), transformers)
    passed_on: list[warnings.WarningMessage] = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        restore()
        for w in caught:
            source = _package(w.filename)
            if source in OURS and ours is None:
                passed_on.append(w)
            else:
                said.append((ours if source in OURS else source,
                             f"{w.category.__name__}: {w.message}"))
        unique = list(dict.fromkeys(said))
        for source, text in unique:
            log.debug("%s: %s", source, text)
        if unique:
            sources = ", ".join(dict.fromkeys(s for s, _ in unique))
            log.info("%s: %d warning%s while %s (see --debug)", sources, len(unique),
                     "" if len(unique) == 1 else "s", what)
        for w in passed_on:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
