"""Checking that a rewrite leaves a model's float function unchanged.

The placement rules trace parts of a model with torch.fx, which records one path through
the code: a part whose ``forward`` branches on ``None`` arguments (Hugging Face
embeddings), on shapes or on data is rewritten for the example it was traced with and
may compute something else, or fail, on the real call. So :func:`qdq.rules.apply_rules`
runs the model, every quantizer disabled, before and after, and compares.

Example inputs are one :class:`Call`: a tensor, a tuple of positional tensors, or a dict
of keyword arguments (``{"input_ids": ..., "attention_mask": ...}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn

from qdq.replace import disable_quantization

__all__ = ["Call", "float_outputs", "largest_difference", "mismatch", "placeholder_args",
           "record_calls", "TOLERANCE"]

#: Largest difference allowed between float outputs before and after a rewrite, relative
#: to the largest value of the output: folding BatchNorm and explicit attention math
#: change sums by float rounding only (1e-6 and below); a rewrite that computes something
#: else is off by far more.
TOLERANCE = 1e-4


@dataclass
class Call:
    """Positional and keyword arguments of one model call."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    @classmethod
    def of(cls, example_inputs) -> Call | None:
        """A tensor, a tuple/list of arguments or a dict of keyword arguments (None: none)."""
        if example_inputs is None:
            return None
        if isinstance(example_inputs, Mapping):
            return cls((), dict(example_inputs))
        if isinstance(example_inputs, (tuple, list)):
            return cls(tuple(example_inputs), {})
        return cls((example_inputs,), {})

    def __call__(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


def float_outputs(module: nn.Module, call: Call) -> Any:
    """``module``'s outputs on ``call`` with every quantizer disabled."""
    with torch.no_grad(), disable_quantization(module):
        return call(module)


def _flat(value, path: str = "output") -> list[tuple[str, Any]]:
    if isinstance(value, torch.Tensor) or value is None:
        return [(path, value)]
    if isinstance(value, Mapping):
        return [item for key, v in value.items() for item in _flat(v, f"{path}.{key}")]
    if isinstance(value, (tuple, list)):
        return [item for i, v in enumerate(value) for item in _flat(v, f"{path}[{i}]")]
    return [(path, value)]


def mismatch(reference, output, tolerance: float = TOLERANCE) -> str | None:
    """None when ``output`` equals ``reference`` (nested tensors, within ``tolerance``);
    otherwise what differs, in a few words."""
    ref, out = _flat(reference), _flat(output)
    if [p for p, _ in ref] != [p for p, _ in out]:
        return f"outputs differ in structure ({len(ref)} vs {len(out)} values)"
    for (path, a), (_, b) in zip(ref, out, strict=True):
        if isinstance(a, torch.Tensor) != isinstance(b, torch.Tensor):
            return f"{path}: {type(a).__name__} became {type(b).__name__}"
        if not isinstance(a, torch.Tensor):
            continue
        if a.shape != b.shape or a.dtype != b.dtype:
            return f"{path}: {a.dtype}{list(a.shape)} became {b.dtype}{list(b.shape)}"
        if not a.is_floating_point():
            if not torch.equal(a, b):
                return f"{path}: integer values changed"
            continue
        if a.numel() == 0:
            continue
        scale = float(a.detach().abs().max())
        if not torch.equal(torch.isfinite(a), torch.isfinite(b)):
            return f"{path}: non-finite values moved"
        finite = torch.isfinite(a)
        diff = float((a.detach() - b.detach())[finite].abs().max()) if finite.any() else 0.0
        if diff > tolerance * max(scale, 1e-12):
            return f"{path}: max difference {diff:.3g} (largest value {scale:.3g})"
    return None


def largest_difference(reference, output) -> float:
    """The largest difference of any floating output tensor, relative to its largest value
    (same structure assumed: check :func:`mismatch` first)."""
    worst = 0.0
    for (_, a), (_, b) in zip(_flat(reference), _flat(output), strict=True):
        if isinstance(a, torch.Tensor) and a.is_floating_point() and a.numel() \
                and isinstance(b, torch.Tensor) and a.shape == b.shape:
            scale = max(float(a.detach().abs().max()), 1e-12)
            worst = max(worst, float((a.detach() - b.detach()).abs().max()) / scale)
    return worst


def record_calls(model: nn.Module, paths: list[str], call: Call) -> dict[str, tuple[Call, Any]]:
    """Run ``model`` in float on ``call``; return, for each module path in ``paths``, its
    first call (arguments) and its outputs."""
    seen: dict[str, tuple[Call, Any]] = {}
    handles = []

    def hook(path):
        def record(module, args, kwargs, output):
            if path not in seen:
                seen[path] = (Call(tuple(args), dict(kwargs)), output)
        return record

    for path in paths:
        module = model.get_submodule(path) if path else model
        handles.append(module.register_forward_hook(hook(path), with_kwargs=True))
    try:
        float_outputs(model, call)
    finally:
        for h in handles:
            h.remove()
    return seen


def placeholder_args(gm: fx.GraphModule, call: Call) -> list | None:
    """The call's arguments in the graph's placeholder order (keywords by name, defaults
    filled in), or None when one is missing."""
    out = []
    for i, node in enumerate(n for n in gm.graph.nodes if n.op == "placeholder"):
        if i < len(call.args):
            out.append(call.args[i])
        elif node.target in call.kwargs:
            out.append(call.kwargs[node.target])
        elif node.args:
            out.append(node.args[0])
        else:
            return None
    return out
