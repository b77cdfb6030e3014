"""Fused fake quantization for QAT on GPUs: one Triton kernel forward, one backward.

The eager path (:func:`qdq.tensor_quant.fake_quant`) runs about ten elementwise
kernels per call and materialises an fp32 copy of every bf16 activation. Here the forward
pass reads ``x`` once in its own dtype, computes in fp32 registers, writes the result in
``x``'s dtype and a bit-packed straight-through mask (1 bit per element); the backward
pass is one kernel ``grad * mask``. No C++ extension is built: Triton compiles the
kernels at first use.

The numbers are bit-identical to the eager path on the same device: the same fp32 scale
(computed by the same torch ops), IEEE division (``div_rn``), round half to even,
saturation, and the same gradient mask ``-amax <= x <= amax``.

Unsupported cases fall back to the eager path: CPU tensors, no Triton, a learnable amax
(which needs the amax gradient), amax varying along more than one axis, and layouts that
are not dense.
"""

# No ``from __future__ import annotations`` here: Triton 3.0 (torch 2.4) reads the
# ``tl.constexpr`` annotations of a kernel's arguments at run time and does not resolve
# them from strings.
import math
import os
import warnings

import torch

from qdq.tensor_quant import AMAX_EPS, _check_args, fake_quant, quant_bounds, quant_step

__all__ = ["fused_fake_tensor_quant", "triton_available", "fused_supported", "BLOCK"]

#: Elements per program; a multiple of 8 (the mask packs 8 elements per byte).
BLOCK = 2048

try:  # Triton is optional: without it every call takes the eager path.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None
    tl = None

_disabled_reason: str | None = None


def triton_available() -> bool:
    """True when the fused kernels can be launched (Triton importable, not switched off)."""
    return triton is not None and _disabled_reason is None


if triton is not None:

    @triton.jit
    def _round_half_even(v):
        # floor(v + 0.5), minus one on exact ties that landed on an odd integer. Exact for
        # |v| < 2**22, which the caller guarantees by clamping first.
        r = tl.floor(v + 0.5)
        tie = (r - v) == 0.5
        odd = (r - 2.0 * tl.floor(r * 0.5)) == 1.0
        return tl.where(tie & odd, r - 1.0, r)

    @triton.jit
    def _cast_out(v, ptr, TO_BF16: tl.constexpr):
        # bf16 is rounded to nearest even by hand, on the bits, so that the kernels give
        # torch's ``.to(bfloat16)`` results compiled and in Triton's interpreter alike.
        if TO_BF16:
            bits = v.to(tl.uint32, bitcast=True)
            odd = (bits >> 16) & 1
            rounded = (bits + (odd + 0x7FFF).to(tl.uint32)) >> 16
            rounded = tl.where(v != v, 0x7FC0, rounded)  # NaN stays a (quiet) NaN
            return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return v.to(ptr.dtype.element_ty)

    @triton.jit
    def _fq_forward(x_ptr, amax_ptr, scale_ptr, out_ptr, mask_ptr, n, inner, channels,
                    qmin, qmax, PER_CHANNEL: tl.constexpr, UNSIGNED: tl.constexpr,
                    SAVE_MASK: tl.constexpr, TO_BF16: tl.constexpr,
                    BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        off = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = off < n
        x = tl.load(x_ptr + off, mask=valid, other=0.0).to(tl.float32)
        if PER_CHANNEL:
            ch = (off // inner) % channels
            amax = tl.load(amax_ptr + ch, mask=valid, other=1.0)
            scale = tl.load(scale_ptr + ch, mask=valid, other=1.0)
        else:
            amax = tl.load(amax_ptr)
            scale = tl.load(scale_ptr)
        v = tl.math.div_rn(x, scale)
        v = tl.maximum(v, qmin - 1.0, propagate_nan=tl.PropagateNan.ALL)
        v = tl.minimum(v, qmax + 1.0, propagate_nan=tl.PropagateNan.ALL)
        q = _round_half_even(v)
        q = tl.where(q == 0.0, v * 0.0, q)  # rounding keeps the sign of zero, as rint does
        q = tl.minimum(tl.maximum(q, qmin, propagate_nan=tl.PropagateNan.ALL), qmax,
                       propagate_nan=tl.PropagateNan.ALL)
        tl.store(out_ptr + off, _cast_out(q * scale, out_ptr, TO_BF16), mask=valid)
        if SAVE_MASK:
            if UNSIGNED:
                lo = tl.zeros_like(amax)
            else:
                lo = -amax
            inside = ((x >= lo) & (x <= amax) & valid).to(tl.int32)
            bits = tl.reshape(inside, [BLOCK // 8, 8])
            shifts = tl.arange(0, 8)
            packed = tl.sum(bits << shifts[None, :], axis=1).to(tl.uint8)
            tl.store(mask_ptr + pid.to(tl.int64) * (BLOCK // 8) + tl.arange(0, BLOCK // 8),
                     packed)

    @triton.jit
    def _fq_backward(g_ptr, mask_ptr, out_ptr, n, TO_BF16: tl.constexpr,
                     BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        off = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        valid = off < n
        g = tl.load(g_ptr + off, mask=valid, other=0.0)
        byte = tl.load(mask_ptr + off // 8, mask=valid, other=0).to(tl.int32)
        bit = ((byte >> (off % 8).to(tl.int32)) & 1).to(tl.float32)
        tl.store(out_ptr + off, _cast_out(g.to(tl.float32) * bit, out_ptr, TO_BF16),
                 mask=valid)


def _channel_axis(x: torch.Tensor, amax: torch.Tensor) -> int | None | bool:
    """None for a per-tensor amax, the axis of a per-channel one, False if unsupported."""
    if amax.numel() == 1:
        return None
    if amax.dim() > x.dim():
        return False
    shape = [1] * (x.dim() - amax.dim()) + list(amax.shape)
    axes = [i for i, s in enumerate(shape) if s != 1]
    if len(axes) != 1 or shape[axes[0]] != x.shape[axes[0]]:
        return False
    return axes[0]


def _dense(x: torch.Tensor) -> bool:
    """Elements fill their storage without gaps or overlaps, in some dim order."""
    if x.is_contiguous():
        return True
    return x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)


def fused_supported(x: torch.Tensor, amax: torch.Tensor, interpret: bool = False) -> bool:
    """Whether :func:`fused_fake_tensor_quant` runs the kernels for these arguments."""
    if not triton_available() or (not x.is_cuda and not interpret):
        return False
    if amax.requires_grad and torch.is_grad_enabled():
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.numel() == 0:
        return False
    axis = _channel_axis(x, amax)
    if axis is False:
        return False
    if axis is None:
        return _dense(x)
    return x.is_contiguous()


class _FusedFakeQuant(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, amax, num_bits, unsigned, narrow_range):
        qmin, qmax, divisor = quant_bounds(num_bits, unsigned, narrow_range)
        axis = _channel_axis(x, amax)
        n = x.numel()
        grid = (triton.cdiv(n, BLOCK),)
        save = ctx.needs_input_grad[0]
        out = torch.empty_like(x)  # keeps x's layout (contiguous or channels_last)
        mask = torch.empty(grid[0] * (BLOCK // 8) if save else 1, dtype=torch.uint8,
                           device=x.device)
        if axis is None:
            inner, channels = 1, 1
        else:
            channels = x.shape[axis]
            inner = math.prod(x.shape[axis + 1:])
        # The scale comes from the same torch ops as in the eager path, so it matches it
        # bit for bit on every device (CUDA divides by a Python scalar as a multiply by
        # its reciprocal, the CPU does not).
        amax_f = amax.detach().float().clamp_min(AMAX_EPS)
        scale = quant_step(amax, num_bits, unsigned, narrow_range)
        _fq_forward[grid](
            x, amax_f.reshape(-1).contiguous(), scale.reshape(-1).contiguous(), out, mask, n,
            inner, channels, float(qmin), float(qmax), PER_CHANNEL=axis is not None,
            UNSIGNED=bool(unsigned), SAVE_MASK=save,
            TO_BF16=x.dtype == torch.bfloat16, BLOCK=BLOCK)
        if save:
            ctx.save_for_backward(mask)
            ctx.layout = x.stride()
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (mask,) = ctx.saved_tensors
        g = grad_out
        if g.stride() != ctx.layout:
            g = torch.empty_strided(g.shape, ctx.layout, dtype=g.dtype, device=g.device)
            g.copy_(grad_out)
        grad_x = torch.empty_like(g)
        n = g.numel()
        _fq_backward[(triton.cdiv(n, BLOCK),)](g, mask, grad_x, n,
                                                TO_BF16=g.dtype == torch.bfloat16, BLOCK=BLOCK)
        return grad_x, None, None, None, None


def _launch(x, amax, num_bits, unsigned, narrow_range):
    global _disabled_reason
    try:
        return _FusedFakeQuant.apply(x, amax, int(num_bits), bool(unsigned), bool(narrow_range))
    except Exception as err:  # noqa: BLE001 - a broken Triton setup must not stop training
        if isinstance(err, (torch.cuda.OutOfMemoryError, KeyboardInterrupt)):
            raise
        _disabled_reason = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
        warnings.warn(f"qdq fused fake quant disabled, using the eager path "
                      f"({_disabled_reason})", RuntimeWarning, stacklevel=3)
        return None


def fused_fake_tensor_quant(
    x: torch.Tensor,
    amax: torch.Tensor | float,
    num_bits: int = 8,
    unsigned: bool = False,
    narrow_range: bool = False,
) -> torch.Tensor:
    """Same contract and numbers as :func:`qdq.tensor_quant.fake_quant`, fused.

    Takes the eager path where the kernels do not apply (see the module docstring).
    """
    if isinstance(amax, torch.Tensor) and fused_supported(
            x, amax, interpret=os.environ.get("TRITON_INTERPRET") == "1"):
        amax = _check_args(amax, num_bits)   # the eager path's argument checks
        out = _launch(x, amax.to(x.device), num_bits, unsigned, narrow_range)
        if out is not None:
            return out
    return fake_quant(x, amax, num_bits, unsigned, narrow_range)
