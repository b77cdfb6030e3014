"""Resolve the model and input specs the CLI accepts.

- ``torchvision:NAME`` — a torchvision architecture (random weights unless a
  checkpoint is given: nothing is downloaded).
- ``package.module:factory`` — any importable callable returning an ``nn.Module``.
- ``reference`` — the Fashion-MNIST reference CNN with its trained checkpoint.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from qdqapp.cli import CliError

__all__ = ["load_model", "parse_shape", "read_state_dict"]


def load_model(spec: str, checkpoint: str | Path | None = None) -> nn.Module:
    if spec == "reference":
        from qdqapp.reference import load_reference_model

        return load_reference_model(checkpoint)
    if ":" not in spec:
        raise CliError(f"model {spec!r}: expected 'torchvision:NAME', "
                       "'package.module:factory' or 'reference'")
    source, name = spec.split(":", 1)
    if source == "torchvision":
        import torchvision

        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as err:
            raise CliError(f"model {spec!r}: torchvision has no model {name!r}") from err
    else:
        try:
            module = importlib.import_module(source)
        except ImportError as err:
            raise CliError(f"model {spec!r}: cannot import {source!r} ({err})") from err
        factory = getattr(module, name, None)
        if not callable(factory):
            raise CliError(f"model {spec!r}: {source} has no callable {name!r}")
        model = factory()
        if not isinstance(model, nn.Module):
            raise CliError(f"model {spec!r}: factory returned {type(model).__name__}, "
                           "not an nn.Module")
    if checkpoint is not None:
        path = Path(checkpoint)
        state = read_state_dict(path)
        try:
            model.load_state_dict(state)
        except (RuntimeError, TypeError) as err:
            first = str(err).splitlines()[0]
            raise CliError(f"checkpoint {path} does not fit {spec}: {first}") from err
    return model


def read_state_dict(path: Path) -> dict:
    """A state_dict from ``path`` (``weights_only``; also under a ``"state_dict"`` key);
    a missing, unreadable or foreign file is one CliError naming it."""
    if not path.is_file():
        raise CliError(f"checkpoint {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets one message
        raise CliError(f"checkpoint {path}: cannot be read ({err})") from err
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CliError(f"checkpoint {path}: not a state_dict")
    return state


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` or ``"1x3x224x224"`` -> ``(1, 3, 224, 224)``."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p)
    except ValueError as err:
        raise CliError(f"input shape {text!r}: expected integers like 1,3,224,224") from err
    if not shape or any(d <= 0 for d in shape):
        raise CliError(f"input shape {text!r}: every dimension must be positive")
    return shape
