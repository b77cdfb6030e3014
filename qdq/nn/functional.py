"""Quant twins of functional ops, as modules so graphs can hold them.

``torch.add``/``+``, ``torch.cat`` and ``torch.matmul``/``bmm``/``@`` have no module
to swap, so the placement rules rewrite traced graphs to call these instead (and users
may call them directly in custom layers).

- ``QuantAdd``: ``_input_quantizer`` on ``input`` and ``_other_quantizer`` on ``other``.
  For a residual add TensorRT fuses into the conv, the rules switch off the quantizer on
  the conv branch and keep the one on the identity branch.
- ``QuantConcat``: one quantizer for every input (TensorRT gives a concat's inputs and
  output one tensor, hence one scale).
- ``QuantMatMul``: both operands quantized (attention ``q @ k^T`` and ``attn @ v``).

``clip`` (pytorch-quantization's ``nn.functional.clip``) clamps to bounds that broadcast
and may be learned; :class:`qdq.nn.clip.Clip` is its module.
"""

from __future__ import annotations

import torch
from torch import nn

from qdq.descriptor import QuantDescriptor
from qdq.nn.mixin import QuantInputMixin
from qdq.quantizer import TensorQuantizer

__all__ = ["QuantAdd", "QuantConcat", "QuantMatMul", "ClipFunction", "clip"]


class ClipFunction(torch.autograd.Function):
    """``min(max(x, lo), hi)`` with tensor bounds that broadcast (``torch.clamp`` took
    only numbers before torch 1.9).

    The input's gradient passes strictly inside ``(lo, hi)``; a bound that requires grad
    gets the summed gradient of the values it clipped, which only makes sense for a
    scalar bound (PACT), so a learnable bound of another size is refused.
    """

    @staticmethod
    def forward(ctx, input, clip_value_min, clip_value_max):
        lo = torch.as_tensor(clip_value_min, dtype=input.dtype, device=input.device)
        hi = torch.as_tensor(clip_value_max, dtype=input.dtype, device=input.device)
        ctx.save_for_backward(input, lo, hi)
        ctx.bound_dtypes = (getattr(clip_value_min, "dtype", None),
                            getattr(clip_value_max, "dtype", None))
        return torch.maximum(torch.minimum(input, hi), lo)

    @staticmethod
    def backward(ctx, grad_output):
        input, lo, hi = ctx.saved_tensors
        above_lo = (input > lo).to(grad_output.dtype)
        below_hi = (input < hi).to(grad_output.dtype)
        grad_lo = grad_hi = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            if lo.numel() != 1 or hi.numel() != 1:
                raise ValueError("clip: learnable bounds must be scalars, got shapes "
                                 f"{tuple(lo.shape)} and {tuple(hi.shape)}")
        if ctx.needs_input_grad[1]:
            grad_lo = (grad_output * (1.0 - above_lo)).sum().to(ctx.bound_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_hi = (grad_output * (1.0 - below_hi)).sum().to(ctx.bound_dtypes[1])
        return grad_output * above_lo * below_hi, grad_lo, grad_hi


def clip(input: torch.Tensor, clip_value_min, clip_value_max) -> torch.Tensor:
    """Clamp ``input`` to ``[clip_value_min, clip_value_max]`` (see :class:`ClipFunction`)."""
    return ClipFunction.apply(input, clip_value_min, clip_value_max)


class _QuantBinary(QuantInputMixin, nn.Module):
    def __init__(self, quant_desc_input: QuantDescriptor | None = None,
                 quant_desc_other: QuantDescriptor | None = None) -> None:
        super().__init__()
        self.init_quantizer(quant_desc_input)
        self._other_quantizer = TensorQuantizer(
            quant_desc_other if quant_desc_other is not None else self.default_quant_desc_input
        )

    @property
    def other_quantizer(self) -> TensorQuantizer:
        return self._other_quantizer


class QuantAdd(_QuantBinary):
    """``input + other`` with each operand quantized (either may be disabled)."""

    def forward(self, input, other):
        return torch.add(self._input_quantizer(input), self._other_quantizer(other))


class QuantMatMul(_QuantBinary):
    """``input @ other`` with both operands quantized; batched inputs work (bmm)."""

    def forward(self, input, other):
        return torch.matmul(self._input_quantizer(input), self._other_quantizer(other))


class QuantConcat(QuantInputMixin, nn.Module):
    """``torch.cat(tensors, dim)`` with every input through one shared quantizer."""

    def __init__(self, dim: int = 0, quant_desc_input: QuantDescriptor | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.init_quantizer(quant_desc_input)

    def forward(self, tensors, dim: int | None = None):
        return torch.cat([self._input_quantizer(t) for t in tensors],
                         self.dim if dim is None else dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
