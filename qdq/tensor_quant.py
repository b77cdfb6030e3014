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

Two families of functions share one arithmetic:

- qdq's own :func:`fake_quant` (what ``TensorQuantizer`` runs): full int8 range by
  default, and a gradient for amax when amax requires grad (learned ranges in QAT).
- pytorch-quantization's public names, :func:`fake_tensor_quant` and :func:`tensor_quant`,
  with its defaults: ``narrow_range=True``, amax a constant, and ``tensor_quant`` returning
  pytorch-quantization's scale ``qmax / amax`` (its users dequantize with ``q / scale``).

The arithmetic is ONNX's, everywhere: quantization divides by the step size
``amax / qmax`` (as ``QuantizeLinear`` does), rounds half to even and saturates;
dequantization multiplies by it (``DequantizeLinear``). So fake quantization here and
Q -> DQ in an exported graph give the same numbers bit for bit. pytorch-quantization
computes ``round(x * (qmax/amax)) / (qmax/amax)`` instead, which differs from this in the
last bit of about a quarter of the outputs (measured in BENCHMARKS.md, "pytorch-quantization
arithmetic"); an exact-to-the-bit match with ONNX Runtime and TensorRT is worth more than
one with a deprecated library. Math runs in fp32 whatever the input dtype; the result is
cast back. amax at or below 2^-24 quantizes everything to exact zeros, as
pytorch-quantization does. Nothing here reads a tensor value on the host (no device sync),
except the unsigned check of CPU inputs.

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
    "quant_step",
    "fake_quant",
    "fake_tensor_quant",
    "tensor_quant",
    "scaled_e4m3",
    "legacy_fake_tensor_quant",
    "fake_affine_tensor_quant",
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


#: Step size used for amax at or below :data:`AMAX_EPS` in fake quantization: every
#: finite fp32 value divided by it rounds to 0, so such a quantizer outputs exact zeros.
_ZERO_STEP = 2.0**100


def quant_step(amax: torch.Tensor, num_bits=8, unsigned: bool = False,
               narrow_range: bool = False) -> torch.Tensor:
    """The fp32 step size fake quantization divides by: ``amax / qmax``, and for amax at
    or below 2^-24 a step so large that everything quantizes to 0 (the exported scale of
    such a channel is :func:`scale_from_amax`, positive and finite)."""
    _, _, divisor = quant_bounds(num_bits, unsigned, narrow_range)
    amax_f = amax.detach().float()
    return torch.where(amax_f <= AMAX_EPS, torch.full_like(amax_f, _ZERO_STEP),
                       amax_f / divisor)


def _quantize(x: torch.Tensor, step: torch.Tensor, qmin, qmax, fp8: bool = False
              ) -> torch.Tensor:
    if fp8:
        return round_to_fp8(x.float() / step)
    # torch.round rounds half to even, as QuantizeLinear does.
    return torch.clamp(torch.round(x.float() / step), qmin, qmax)


def _check_unsigned(x: torch.Tensor, unsigned: bool) -> None:
    # Only CPU tensors: on a GPU the check would wait for the device at every call.
    if unsigned and x.device.type == "cpu" and x.numel() and bool((x < 0).any()):
        raise QuantTypeError(f"unsigned quantization: Negative values encountered (min "
                             f"{float(x.min()):g})")


class QuantTypeError(TypeError):
    """An input the quantization cannot take (negative values for an unsigned
    quantizer); a ``TypeError`` as in pytorch-quantization."""


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
        scale = quant_step(amax, num_bits, unsigned, narrow_range)
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


def fake_quant(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """Quantize then dequantize ``x`` with the given amax; same dtype and shape as ``x``.

    Full range by default (TensorRT's int8). amax gets a gradient when it requires one.
    """
    amax = _check_args(amax, num_bits).to(x.device)
    _check_unsigned(x, unsigned)
    num_bits = tuple(num_bits) if is_fp8(num_bits) else int(num_bits)
    return _FakeTensorQuant.apply(x, amax, num_bits, bool(unsigned), bool(narrow_range))


def fake_tensor_quant(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = True,
) -> torch.Tensor:
    """pytorch-quantization's ``fake_tensor_quant``: :func:`fake_quant` with its defaults
    (narrow range) and amax a constant (straight-through gradient for ``x`` only)."""
    if isinstance(amax, torch.Tensor):
        amax = amax.detach()
    return fake_quant(x, amax, num_bits, unsigned, narrow_range)


class _TensorQuant(torch.autograd.Function):
    """Integer quantization with a clipped straight-through gradient: ``x``'s gradient
    passes where ``|x| <= amax`` and is 0 where the value saturated."""

    @staticmethod
    def forward(ctx, x, amax, num_bits, unsigned, narrow_range):
        qmin, qmax, _ = quant_bounds(num_bits, unsigned, narrow_range)
        step = quant_step(amax, num_bits, unsigned, narrow_range)
        ctx.save_for_backward(x.abs() <= amax.to(x.dtype))
        return _quantize(x, step, qmin, qmax, is_fp8(num_bits)).to(
            x.dtype if x.dtype.is_floating_point else torch.float32)

    @staticmethod
    def backward(ctx, grad_q):
        (inside,) = ctx.saved_tensors
        return grad_q * inside.to(grad_q.dtype), None, None, None, None


def tensor_quant(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pytorch-quantization's ``tensor_quant``: ``(q, scale)`` with ``x ~= q / scale``.

    ``q`` holds integers in ``x``'s dtype (E4M3 grid values for ``num_bits=(4, 3)``);
    ``scale`` is ``qmax / amax`` with amax's shape (1 where amax is at or below 2^-24,
    whose values quantize to 0), pytorch-quantization's convention: multiply to quantize,
    divide to dequantize. ONNX and TensorRT store the reciprocal, the step size
    (:func:`scale_from_amax`). ``x`` gets a clipped straight-through gradient.
    """
    amax = _check_args(amax, num_bits).to(x.device).detach()
    _check_unsigned(x, unsigned)
    num_bits = tuple(num_bits) if is_fp8(num_bits) else int(num_bits)
    q = _TensorQuant.apply(x, amax, num_bits, bool(unsigned), bool(narrow_range))
    _, _, divisor = quant_bounds(num_bits, unsigned, narrow_range)
    amax_f = amax.float()
    scale = torch.where(amax_f <= AMAX_EPS, torch.ones_like(amax_f), divisor / amax_f)
    if x.dtype == torch.float16 and bool(scale.max() > torch.finfo(torch.float16).max):
        # the scale comes back in x's dtype, as in pytorch-quantization; say so, not inf
        raise ValueError(f"tensor_quant: scale is too large for FP16 with amax="
                         f"{float(amax_f.min()):g} (qmax / amax > 65504)")
    return q, scale.to(x.dtype) if x.dtype.is_floating_point else scale


#: pytorch-quantization's pure-Python fake quant, kept beside its CUDA one; qdq has one
#: implementation, so the two names are the same function.
legacy_fake_tensor_quant = fake_tensor_quant


class _FakeAffineQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, min_range, max_range, num_bits):
        ctx.save_for_backward(x, min_range, max_range)
        qmin, qmax = -(2 ** (num_bits - 1)), 2 ** (num_bits - 1) - 1
        step = (max_range.float() - min_range.float()) / (2**num_bits - 1)
        shift = torch.round(min_range.float() / step) - qmin
        q = torch.clamp(torch.round(x.float() / step) - shift, qmin, qmax)
        return ((q + shift) * step).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, lo, hi = ctx.saved_tensors
        inside = (x >= lo) & (x <= hi)
        return grad_out * inside.to(grad_out.dtype), None, None, None


def fake_affine_tensor_quant(x: torch.Tensor, min_range: torch.Tensor, max_range: torch.Tensor,
                             num_bits: int = 8) -> torch.Tensor:
    """Asymmetric (zero point) fake quantization over ``[min_range, max_range]``, per
    tensor, with a straight-through gradient inside the range (pytorch-quantization's
    experimental affine mode). TensorRT wants symmetric quantization, so nothing in qdq's
    export uses it."""
    lo = torch.as_tensor(min_range, dtype=torch.float32, device=x.device).detach()
    hi = torch.as_tensor(max_range, dtype=torch.float32, device=x.device).detach()
    if not bool(hi > lo):
        raise ValueError(f"fake_affine_tensor_quant: max_range {float(hi):g} must exceed "
                         f"min_range {float(lo):g}")
    return _FakeAffineQuant.apply(x, lo, hi, int(num_bits))


def scaled_e4m3(x: torch.Tensor, amax: torch.Tensor | float | None = None, E: int = 4,
                M: int = 3) -> torch.Tensor:
    """pytorch-quantization's ``scaled_e4m3``: fake-quantize onto the FP8 E4M3 grid
    scaled by ``448 / amax`` (no scaling when amax is None). Only E4M3 exists."""
    if (E, M) != (4, 3):
        raise QuantTypeError(f"scaled_e4m3: only E4M3 (E=4, M=3) is supported, got E={E}, M={M}")
    if amax is None:
        return fake_quant(x, torch.tensor(float(FP8_E4M3_MAX)), (4, 3))
    return fake_quant(x, amax if not isinstance(amax, torch.Tensor) else amax.detach(), (4, 3))
