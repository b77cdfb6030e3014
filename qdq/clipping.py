"""Clipping to a range that may be learned (PACT): pure autograd math.

``clip`` is pytorch-quantization's ``nn.functional.clip``; :class:`qdq.nn.clip.Clip` is its
module, and a ``TensorQuantizer`` with a learned amax clips with it in its clip stage.
"""

from __future__ import annotations

import torch

__all__ = ["ClipFunction", "clip"]


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
                raise ValueError("clip: learnable bounds can only be scalar, got shapes "
                                 f"{tuple(lo.shape)} and {tuple(hi.shape)}")
        if ctx.needs_input_grad[1]:
            grad_lo = (grad_output * (1.0 - above_lo)).sum().to(ctx.bound_dtypes[0])
        if ctx.needs_input_grad[2]:
            grad_hi = (grad_output * (1.0 - below_hi)).sum().to(ctx.bound_dtypes[1])
        return grad_output * above_lo * below_hi, grad_lo, grad_hi


def clip(input: torch.Tensor, clip_value_min, clip_value_max) -> torch.Tensor:
    """Clamp ``input`` to ``[clip_value_min, clip_value_max]`` (see :class:`ClipFunction`)."""
    return ClipFunction.apply(input, clip_value_min, clip_value_max)
