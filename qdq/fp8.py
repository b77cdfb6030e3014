"""FP8 E4M3 math: the grid, rounding onto it, its codes and boundaries, and an amax search.

A quantizer is FP8 when its descriptor says ``num_bits=(4, 3)`` (4 exponent bits, 3
mantissa bits: NVIDIA's spelling, also modelopt's). Values are scaled so that amax lands on
the largest finite E4M3 value, then rounded onto the E4M3 grid by torch's own cast::

    scale = amax / 448
    fake_quant(x) = scale * float(float8_e4m3fn(clamp(x / scale, -448, 448)))

The cast rounds to nearest, ties to even, subnormals included, exactly as ONNX
``QuantizeLinear``-19 with a ``float8e4m3fn`` zero point and ``saturate=1`` does (the clamp
is the saturation: E4M3FN has no infinity and turns anything past 464 into NaN). So
PyTorch's fake quantization equals ONNX Runtime's Q -> DQ bit for bit.

The grid is not uniform: 8 values per power of two, from the smallest subnormal 2^-9 to
448. A "step" of an FP8 tensor is therefore local; :func:`fp8_codes` numbers the grid
points in order (``..., -1, 0, 1, ...``) so that one step is a code difference of 1 at
any magnitude, as an integer code is for INT8.

Example::

    >>> round_to_fp8(torch.tensor([0.3, 500.0, -17.0]))
    tensor([  0.3125, 448.0000, -16.0000])
"""

from __future__ import annotations

import torch

__all__ = ["FP8_E4M3", "FP8_E4M3_MAX", "is_fp8", "check_fp8_bits", "round_to_fp8",
           "fp8_codes", "fp8_boundary_distance", "fp8_mse_amax", "fp8_histogram_amax",
           "FP8_AMAX_METHODS", "fp8_qdq_for_export"]

#: ``num_bits`` of an FP8 E4M3 quantizer: (exponent bits, mantissa bits).
FP8_E4M3 = (4, 3)
#: Largest finite float8_e4m3fn value; amax maps onto it.
FP8_E4M3_MAX = 448.0
#: Code of 448 (bits 0b0111_1110); 0b0111_1111 is NaN.
_MAX_CODE = 126


def is_fp8(num_bits) -> bool:
    """Whether ``num_bits`` names a floating-point format (a pair) rather than an int width."""
    return isinstance(num_bits, (tuple, list))


class FP8FormatError(ValueError, TypeError):
    """A floating-point format other than E4M3 was asked for."""


def check_fp8_bits(num_bits, label: str = "num_bits") -> tuple[int, int]:
    """``(4, 3)`` as a tuple, or one error naming what else was asked for (a ValueError
    that is also a TypeError, the type pytorch-quantization raised)."""
    bits = tuple(num_bits)
    if bits != FP8_E4M3 or not all(isinstance(b, int) and not isinstance(b, bool)
                                   for b in bits):
        raise FP8FormatError(f"{label}: floating-point quantization supports FP8 E4M3 only, "
                         f"num_bits=(4, 3); got {num_bits!r}")
    return FP8_E4M3


def round_to_fp8(r: torch.Tensor) -> torch.Tensor:
    """``r`` (already divided by the scale) rounded onto the E4M3 grid, saturating at
    +-448, as fp32. NaN stays NaN."""
    return r.float().clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()


def fp8_codes(values: torch.Tensor) -> torch.Tensor:
    """Position of each grid value on the E4M3 grid (int64, 0 for +-0, +-126 for +-448).

    ``values`` must lie on the grid (e.g. ``round_to_fp8`` output, or a DequantizeLinear
    output divided by its scale); a code difference of 1 is one grid step.
    """
    bits = values.float().to(torch.float8_e4m3fn).view(torch.uint8).to(torch.int64)
    magnitude = bits & 0x7F
    return torch.where(bits >= 0x80, -magnitude, magnitude)


def _grid_values(device: torch.device) -> torch.Tensor:
    """The 127 non-negative E4M3 values in code order (index = code)."""
    codes = torch.arange(_MAX_CODE + 1, dtype=torch.uint8, device=device)
    return codes.view(torch.float8_e4m3fn).float()


def fp8_boundary_distance(r: torch.Tensor) -> torch.Tensor:
    """Distance of ``r`` (divided by the scale) from the rounding boundary between its two
    neighbouring grid points, in units of their spacing: 0 on a boundary (a tie), 0.5 on a
    grid point. Values at or past +-448 saturate and get 0.5 (no boundary to cross)."""
    grid = _grid_values(r.device)
    a = r.float().abs().clamp(max=FP8_E4M3_MAX)
    hi_code = torch.searchsorted(grid, a, right=False).clamp(1, _MAX_CODE)
    lo, hi = grid[hi_code - 1], grid[hi_code]
    distance = ((a - (lo + hi) / 2).abs() / (hi - lo)).clamp(max=0.5)
    return torch.where(a >= FP8_E4M3_MAX, torch.full_like(a, 0.5), distance)


@torch.no_grad()
def fp8_mse_amax(counts: torch.Tensor, bin_width, *, start_bin: int = 128, stride: int = 1,
                 chunk: int = 128) -> torch.Tensor:
    """amax with the smallest squared FP8 fake-quant error over a histogram of ``|x|``.

    Candidates are bin edges ``i * w`` (``i = start_bin, start_bin + stride, ..., n``);
    each bin's mass sits at its centre ``(b + 1/2) w``, which is scaled by ``448 / amax``,
    saturated and rounded onto the E4M3 grid:
    ``err_i = sum_b c_b (x_b - s_i fp8(x_b / s_i))^2`` with ``s_i = i w / 448``.
    The smallest edge wins ties. Returns a 0-dim float32 tensor on the counts' device.
    """
    if start_bin < 1 or stride < 1:
        raise ValueError(f"start_bin and stride must be >= 1, got {start_bin}, {stride}")
    if counts.dim() != 1 or counts.numel() == 0:
        raise ValueError(f"counts must be a non-empty 1-D tensor, got {tuple(counts.shape)}")
    if int(counts.sum()) == 0:
        raise ValueError("the histogram is empty (all counts are 0)")
    n = counts.numel()
    # every bin kept (i = n) is always a candidate, whatever the stride
    cand = torch.arange(min(start_bin, n), n + 1, stride, device=counts.device)
    if int(cand[-1]) != n:
        cand = torch.cat([cand, cand.new_tensor([n])])
    kept = torch.nonzero(counts).reshape(-1)
    c = counts[kept].to(torch.float64)
    x = kept.to(torch.float64) + 0.5                        # centres, in bin widths
    err = torch.empty(cand.numel(), dtype=torch.float64, device=counts.device)
    for lo in range(0, cand.numel(), chunk):
        scale = cand[lo:lo + chunk, None].to(torch.float64) / FP8_E4M3_MAX
        fq = round_to_fp8((x[None, :] / scale).float()).to(torch.float64) * scale
        err[lo:lo + chunk] = (x[None, :] - fq).square() @ c
    best = cand[torch.argmin(err)]
    width = torch.as_tensor(bin_width, dtype=torch.float64, device=counts.device)
    return (best.to(torch.float64) * width).to(torch.float32).reshape(())


#: amax methods of an FP8 quantizer's histogram. Entropy is absent: its KL search merges
#: the histogram into the 128 evenly spaced levels of INT8, which is not the E4M3 grid.
FP8_AMAX_METHODS = ("mse", "percentile", "max")


def fp8_histogram_amax(calibrator, method: str = "mse", **kwargs) -> torch.Tensor | None:
    """amax of an FP8 quantizer from its ``HistogramCalibrator``.

    ``"mse"`` searches the E4M3 grid (:func:`fp8_mse_amax`, ``start_bin``/``stride``
    keywords); ``"percentile"`` and ``"max"`` are the calibrator's own, which do not depend
    on the grid. None when the calibrator saw no data.
    """
    from qdq.calib.base import CalibrationError

    if method not in FP8_AMAX_METHODS:
        raise CalibrationError(
            f"{calibrator.owner}: amax method {method!r} does not apply to FP8 E4M3; choose "
            f"one of {', '.join(FP8_AMAX_METHODS)} (entropy searches INT8's 128 even levels)")
    if method != "mse":
        return calibrator.compute_amax(method, **kwargs)
    largest = calibrator.compute_amax("max")  # None without data; raises on NaN/Inf
    if largest is None or float(largest) == 0:
        return largest
    unknown = set(kwargs) - {"start_bin", "stride"}
    if unknown:
        raise CalibrationError(f"{calibrator.owner}: the FP8 mse search takes start_bin and "
                               f"stride, not {sorted(unknown)}")
    amax = fp8_mse_amax(calibrator.counts, calibrator.bin_width, **kwargs)
    return torch.minimum(amax, largest)


class _FP8QDQ(torch.autograd.Function):
    """Fake quantization whose ONNX form is QuantizeLinear -> DequantizeLinear (opset 19)
    with a float8e4m3fn zero point; per channel along ``axis`` when the scale is 1-D."""

    @staticmethod
    def forward(ctx, x, scale, axis):
        s = _broadcast(scale, x, axis)
        r = x.float() / s
        ctx.save_for_backward(r.abs() <= FP8_E4M3_MAX)
        return (round_to_fp8(r) * s).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return grad_out * inside.to(grad_out.dtype), None, None

    @staticmethod
    def symbolic(g, x, scale, axis):
        sizes = scale.type().sizes() if scale.type().sizes() is not None else []
        zero = torch.zeros(sizes, dtype=torch.float8_e4m3fn)
        zp = g.op("Constant", value_t=zero)
        kwargs = {} if axis is None else {"axis_i": axis}
        q = g.op("QuantizeLinear", x, scale, zp, **kwargs)
        return g.op("DequantizeLinear", q, scale, zp, **kwargs)


def _broadcast(scale: torch.Tensor, x: torch.Tensor, axis: int | None) -> torch.Tensor:
    if axis is None:
        return scale
    shape = [1] * x.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def fp8_qdq_for_export(x: torch.Tensor, scale: torch.Tensor, axis: int | None) -> torch.Tensor:
    """FP8 fake quantization that the TorchScript ONNX exporter writes as Q/DQ-19.

    ``scale`` is 0-dim (per tensor) or 1-D along ``axis`` (per channel); the values equal
    :func:`round_to_fp8` times the scale.
    """
    scale = scale.float().reshape(()) if axis is None else scale.float().reshape(-1)
    return _FP8QDQ.apply(x, scale, axis)
