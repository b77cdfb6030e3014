"""Example inputs as plain values, and back: what ``qdq.save`` records of an
``apply_rules`` call so that ``qdq.restore`` can replay it.

A tensor is recorded by shape and dtype (it comes back as zeros: the rules read only
shapes); lists, tuples and dicts by their items, recursively, so a model that takes a
list of tensors or one dict of tensors as an argument is replayed with the same
structure; ``None``, booleans, numbers and strings by value. Anything else is recorded
as ``None`` and comes back as ``None``.

Example::

    input_spec([torch.ones(2, 3), None])
    # {'list': [{'shape': [2, 3], 'dtype': 'float32'}, {'value': None}]}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["input_spec", "example_of"]

_PLAIN = (bool, int, float, str, type(None))


def input_spec(value: Any) -> dict | None:
    """``value`` recorded as plain Python values (None: it cannot be)."""
    if isinstance(value, torch.Tensor):
        return {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, _PLAIN):
        return {"value": value}
    if isinstance(value, Mapping):
        return {"dict": {k: input_spec(v) for k, v in value.items()}}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [input_spec(v) for v in value]}
    return None


def example_of(spec: dict | None, device: torch.device | str = "cpu") -> Any:
    """A value with the structure ``spec`` records: zeros for tensors."""
    if spec is None:
        return None
    if "shape" in spec:
        return torch.zeros(spec["shape"], dtype=getattr(torch, spec["dtype"]), device=device)
    if "value" in spec:
        return spec["value"]
    if "dict" in spec:
        return {k: example_of(v, device) for k, v in spec["dict"].items()}
    if "list" in spec:
        return [example_of(v, device) for v in spec["list"]]
    if "tuple" in spec:
        return tuple(example_of(v, device) for v in spec["tuple"])
    raise ValueError(f"not a recorded example input: {spec!r}")
