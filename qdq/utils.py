"""Small tensor helpers that pytorch-quantization scripts import from its ``utils``.

``reduce_amax`` is the amax every quantizer needs when it has none calibrated (the
dynamic amax of the current input), so the quantizer itself uses it too.
"""

from __future__ import annotations

import logging

import torch

__all__ = ["reduce_amax", "reset_logger_handler"]


def reduce_amax(input: torch.Tensor, axis: int | tuple[int, ...] | list[int] | None = None,
                keepdims: bool = True) -> torch.Tensor:
    """Largest ``|input|`` over ``axis`` (all dimensions when None), without gradient.

    An int axis keeps that dimension only when ``keepdims``; a tuple of axes keeps the
    reduced dimensions as size 1 unless ``keepdims`` is False or only one value remains
    (then the result is squeezed), which is the shape pytorch-quantization returns.
    """
    with torch.no_grad():
        out = input.detach().abs()
        if axis is None:
            return out.amax()
        if isinstance(axis, int):
            return out.amax(dim=axis, keepdim=keepdims)
        axes = tuple(axis)
        if len(axes) > input.dim():
            raise ValueError(f"reduce_amax: cannot reduce {len(axes)} axes of a "
                             f"{input.dim()}-d tensor")
        out = out.amax(dim=axes, keepdim=True)
        return out.squeeze() if not keepdims or out.numel() == 1 else out


def reset_logger_handler() -> None:
    """Remove every handler of the root logger (pytorch-quantization's helper)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
