"""Weight-only quantization math: integer codes and scales per output channel or per block.

A weight ``W`` of shape ``[out, in, *k]`` (Linear ``[out, in]``, Conv ``[out, in/groups,
kh, kw]``, LSTM ``[4 * hidden, in]``) is quantized to signed ``bits``-bit integers with
one fp32 scale per

=================  ===================================  =============================
``block_size``     one scale for                        scale shape
=================  ===================================  =============================
``None``           each output channel (row)            ``[out]``
``B``              each run of B inputs of a row and    ``[out, in / B, *k]``
                   kernel position (blocks along axis 1)
=================  ===================================  =============================

``scale = amax / qmax`` (127 for 8 bits, 7 for 4 bits), codes ``clamp(round(W / scale),
-2^(b-1), 2^(b-1) - 1)`` rounded half to even, and the weight the layer uses is
``codes * scale``: exactly ONNX ``DequantizeLinear`` (``axis=0``, or ``axis=1`` with
``block_size=B`` at opset 21) on the same integers and scales.

amax per channel or block is its largest ``|W|`` (``"max"``), or (``"mse"``) the clip
``r * max|W|`` with the smallest squared error over the candidate ratios ``r``.

Example::

    >>> w = torch.randn(16, 256)
    >>> codes, scale = quantize_weight(w, bits=4, block_size=128)
    >>> codes.dtype, tuple(scale.shape)
    (torch.int8, (16, 2))
    >>> (dequantize_weight(codes, scale, block_size=128) - w).abs().max() < scale.max()
    tensor(True)
"""

from __future__ import annotations

import torch

from qdq.tensor_quant import quant_bounds, scale_from_amax

__all__ = ["WEIGHT_BITS", "AMAX_METHODS", "MSE_CLIP_RATIOS", "check_block_size",
           "weight_amax", "quantize_weight", "quantize_with_amax", "dequantize_weight",
           "expand_scale"]

#: Integer widths of weight-only quantization.
WEIGHT_BITS = (8, 4)
#: amax per channel or block: the largest magnitude, or the best of a few clip ratios.
AMAX_METHODS = ("max", "mse")
#: Clip ratios the ``"mse"`` search tries, largest first (ties keep the larger one).
MSE_CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def check_block_size(block_size: int | None, inputs: int, what: str = "weight") -> None:
    """One ValueError when ``block_size`` is not a positive int dividing ``inputs``."""
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{what}: block_size must be None or a positive int, "
                         f"got {block_size!r}")
    if inputs % block_size:
        raise ValueError(f"{what}: block_size {block_size} does not divide its input "
                         f"dimension {inputs}")


def _blocks(w: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """``[out, blocks, block, rest]`` view: statistics reduce over dim 2."""
    out, inputs = w.shape[0], w.shape[1]
    if block_size is None:
        return w.reshape(out, 1, -1, 1)
    rest = w[0, 0].numel()
    return w.reshape(out, inputs // block_size, block_size, rest)


def _to_scale_shape(t: torch.Tensor, w: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """``[out, blocks, 1, rest]`` statistics -> the scale layout of the table above."""
    if block_size is None:
        return t.reshape(w.shape[0])
    return t.reshape(w.shape[0], w.shape[1] // block_size, *w.shape[2:])


def _fake_quant(v: torch.Tensor, amax: torch.Tensor, bits: int) -> torch.Tensor:
    qmin, qmax, _ = quant_bounds(bits)
    scale = scale_from_amax(amax, bits)
    return torch.clamp(torch.round(v / scale), qmin, qmax) * scale


@torch.no_grad()
def weight_amax(w: torch.Tensor, bits: int = 8, block_size: int | None = None,
                method: str = "max", clip_ratios: tuple[float, ...] = MSE_CLIP_RATIOS
                ) -> torch.Tensor:
    """amax per output channel (``[out]``) or per block (``[out, in / B, *k]``), fp32."""
    if method not in AMAX_METHODS:
        raise ValueError(f"amax method {method!r}: choose one of {', '.join(AMAX_METHODS)}")
    check_block_size(block_size, w.shape[1])
    v = _blocks(w.detach().float(), block_size)
    largest = v.abs().amax(dim=2, keepdim=True)
    if method == "max":
        return _to_scale_shape(largest, w, block_size)
    if not clip_ratios or any(not 0 < r <= 1 for r in clip_ratios):
        raise ValueError(f"clip_ratios must be in (0, 1], got {clip_ratios!r}")
    best, best_err = largest * clip_ratios[0], None
    for ratio in clip_ratios:
        amax = largest * ratio
        err = (v - _fake_quant(v, amax, bits)).square().sum(dim=2, keepdim=True)
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best = torch.where(better, amax, best)
        best_err = torch.where(better, err, best_err)
    return _to_scale_shape(best, w, block_size)


def expand_scale(scale: torch.Tensor, shape: torch.Size | tuple[int, ...],
                 block_size: int | None) -> torch.Tensor:
    """The scale broadcast to the weight's own shape (per channel or repeated per block)."""
    if block_size is None:
        return scale.reshape(-1, *([1] * (len(shape) - 1)))
    return scale.repeat_interleave(block_size, dim=1)


@torch.no_grad()
def quantize_weight(w: torch.Tensor, bits: int = 8, block_size: int | None = None,
                    amax_method: str = "max",
                    clip_ratios: tuple[float, ...] = MSE_CLIP_RATIOS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)``: int8 codes shaped like ``w`` (in ``[-8, 7]`` for 4 bits) and the
    fp32 scale laid out as in the module table."""
    if bits not in WEIGHT_BITS:
        raise ValueError(f"weight-only bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if w.dim() < 2:
        raise ValueError(f"weight-only quantization needs a weight of 2 or more dimensions, "
                         f"got shape {tuple(w.shape)}")
    amax = weight_amax(w, bits, block_size, amax_method, clip_ratios)
    return quantize_with_amax(w, amax, bits, block_size)


@torch.no_grad()
def quantize_with_amax(w: torch.Tensor, amax: torch.Tensor, bits: int,
                       block_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes, scale)`` of ``w`` for a given amax (laid out as :func:`weight_amax`
    returns it): the one rounding rule every search (max, mse, AWQ clipping) ends in."""
    scale = scale_from_amax(amax, bits)
    qmin, qmax, _ = quant_bounds(bits)
    codes = torch.clamp(torch.round(w.detach().float() / expand_scale(scale, w.shape,
                                                                      block_size)), qmin, qmax)
    return codes.to(torch.int8), scale


def dequantize_weight(codes: torch.Tensor, scale: torch.Tensor,
                      block_size: int | None = None) -> torch.Tensor:
    """``codes * scale`` in fp32, as DequantizeLinear computes it."""
    return codes.float() * expand_scale(scale, codes.shape, block_size)
