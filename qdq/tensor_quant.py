"""Pure quantization math: scale from amax, integer quantization and fake quantization.

Conventions (shared with ONNX ``QuantizeLinear`` at opset 13 and TensorRT):

==============  ======================  =====================
mode            integer range           scale
==============  ======================  =====================
signed          [-2^(b-1), 2^(b-1)-1]   amax / (2^(b-1) - 1)
narrow_range    [-(2^(b-1)-1), ...]     amax / (2^(b-1) - 1)
unsigned        [0, 2^b - 1]            amax / (2^b - 1)
FP8 E4M3        E4M3 grid, [-448, 448]  amax / 448
==============  ======================  =====================

``num_bits=(4, 3)`` selects FP8 E4M3 (:mod:`qdq.fp8`): the same functions round onto the
E4M3 grid with torch's ``float8_e4m3fn`` cast instead of rounding to integers.

Quantization divides by the scale (as ONNX Runtime's ``QuantizeLinear`` does), rounds half
to even and saturates, so that fake quantization here and Q -> DQ in an exported graph
give the same numbers. Math runs in fp32 whatever the input dtype; the result is cast
back. Nothing here reads a tensor value on the host, so there is no device sync.

``amax`` is a tensor broadcastable to the input: a scalar for per-tensor quantization,
or a tensor shaped like ``[C, 1, 1, 1]`` for per-channel quantization along axis 0.

Example::

    >>> x = torch.tensor([0.1, -0.5, 2.0])
    >>> fake_tensor_quant(x, torch.tensor(1.0))   # 2.0 saturates to amax
    tensor([ 0.1024, -0.5039,  1.0000])
"""

from __future__ import annotations

import torch

from qdq.descriptor import (  # noqa: F401  (re-exported for pytorch-quantization scripts)
    QUANT_DESC_8BIT_CONV1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONV3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE1D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE2D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_CONVTRANSPOSE3D_WEIGHT_PER_CHANNEL,
    QUANT_DESC_8BIT_LINEAR_WEIGHT_PER_ROW,
    QUANT_DESC_8BIT_PER_TENSOR,
    QuantDescriptor,
    ScaledQuantDescriptor,
)
from qdq.fp8 import FP8_E4M3_MAX, check_fp8_bits, is_fp8, round_to_fp8

__all__ = [
    "AMAX_EPS",
    "quant_bounds",
    "scale_from_amax",
    "fake_tensor_quant",
    "tensor_quant",
    "QuantDescriptor",
]

#: Smallest amax used to build a scale. A dead channel (amax 0) still gets a positive,
#: finite scale: every value in it is 0, so any positive scale reproduces it exactly.
AMAX_EPS = 2.0**-24


def quant_bounds(num_bits: int = 8, unsigned: bool = False, narrow_range: bool = False):
    """Integer range ``(qmin, qmax)`` and the divisor that maps amax to the scale.

    For FP8 (``num_bits=(4, 3)``) the range of the grid, ``(-448, 448)``, and 448.
    """
    if is_fp8(num_bits):
        return -FP8_E4M3_MAX, FP8_E4M3_MAX, FP8_E4M3_MAX
    if unsigned:
        qmax = 2**num_bits - 1
        return 0, qmax, qmax
    qmax = 2 ** (num_bits - 1) - 1
    qmin = -qmax if narrow_range else -qmax - 1
    return qmin, qmax, qmax


def scale_from_amax(
    amax: torch.Tensor, num_bits: int = 8, unsigned: bool = False, narrow_range: bool = False
) -> torch.Tensor:
    """fp32 step size ``amax / qmax``; amax below :data:`AMAX_EPS` is raised to it."""
    _, _, divisor = quant_bounds(num_bits, unsigned, narrow_range)
    return amax.detach().float().clamp_min(AMAX_EPS) / divisor


def _quantize(x: torch.Tensor, scale: torch.Tensor, qmin, qmax, fp8: bool = False
              ) -> torch.Tensor:
    if fp8:
        return round_to_fp8(x.float() / scale)
    # torch.round rounds half to even, as QuantizeLinear does.
    return torch.clamp(torch.round(x.float() / scale), qmin, qmax)


class _FakeTensorQuant(torch.autograd.Function):
    """Fake quantization with a straight-through gradient and a gradient for amax.

    d out / d x is 1 where ``-amax <= x <= amax`` and 0 outside (saturated values do not
    move with x). d out / d amax is the exact derivative of the quantize-dequantize
    function with the rounding treated as identity: ``(q - x/scale) / qmax`` inside the
    range and ``q / qmax`` where the value saturates. It is only computed when amax
    requires grad (``learn_amax``), so calibration and plain QAT pay nothing for it.
    """

    @staticmethod
    def forward(ctx, x, amax, num_bits, unsigned, narrow_range):
        qmin, qmax, divisor = quant_bounds(num_bits, unsigned, narrow_range)
        amax_f = amax.float().clamp_min(AMAX_EPS)
        scale = amax_f / divisor
        xf = x.float()
        q = _quantize(xf, scale, qmin, qmax, is_fp8(num_bits))
        out = (q * scale).to(x.dtype)
        ctx.divisor = divisor
        ctx.amax_shape = amax.shape
        ctx.needs_amax_grad = ctx.needs_input_grad[1]
        lo = torch.zeros_like(amax_f) if unsigned else -amax_f
        inside = (xf >= lo) & (xf <= amax_f)
        if ctx.needs_amax_grad:
            ctx.save_for_backward(inside, xf / scale, q)
        else:
            ctx.save_for_backward(inside)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        grad_amax = None
        inside = ctx.saved_tensors[0]
        grad_x = grad_out * inside.to(grad_out.dtype)
        if ctx.needs_amax_grad:
            _, x_scaled, q = ctx.saved_tensors
            local = torch.where(inside, q - x_scaled, q) / ctx.divisor
            grad_amax = _sum_to_shape(grad_out.float() * local, ctx.amax_shape)
        return grad_x, grad_amax, None, None, None


def _sum_to_shape(g: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    if g.shape == shape:
        return g
    lead = g.dim() - len(shape)
    g = g.sum(dim=tuple(range(lead))) if lead > 0 else g
    dims = tuple(i for i, s in enumerate(shape) if s == 1 and g.shape[i] != 1)
    return g.sum(dim=dims, keepdim=True) if dims else g


def _check_args(amax, num_bits) -> torch.Tensor:
    if is_fp8(num_bits):
        check_fp8_bits(num_bits)
    elif not 2 <= int(num_bits) <= 16:
        raise ValueError(f"num_bits must be in 2..16, got {num_bits}")
    if not isinstance(amax, torch.Tensor):
        amax = torch.tensor(float(amax))
    return amax


def fake_tensor_quant(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """Quantize then dequantize ``x`` with the given amax; same dtype and shape as ``x``."""
    amax = _check_args(amax, num_bits).to(x.device)
    num_bits = tuple(num_bits) if is_fp8(num_bits) else int(num_bits)
    return _FakeTensorQuant.apply(x, amax, num_bits, bool(unsigned), bool(narrow_range))


def tensor_quant(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Integer-valued quantization of ``x``: returns ``(q, scale)`` with ``x ~= q * scale``.

    ``q`` holds integers in fp32 (it may exceed int8 for wider ``num_bits``; E4M3 grid
    values for ``num_bits=(4, 3)``); ``scale`` has the shape of ``amax``. Unlike
    pytorch-quantization, ``scale`` is the step size (multiply to dequantize), the
    convention of ONNX and TensorRT.
    """
    amax = _check_args(amax, num_bits).to(x.device)
    qmin, qmax, _ = quant_bounds(num_bits, unsigned, narrow_range)
    scale = scale_from_amax(amax, num_bits, unsigned, narrow_range)
    return _quantize(x, scale, qmin, qmax, is_fp8(num_bits)), scale
