"""GPTQ: weight rounding that compensates each column's error with the columns not yet done.

Round-to-nearest (RTN) quantizes every weight on its own. GPTQ (Frantar et al., 2023)
quantizes the columns (inputs) of a layer one at a time and spreads each column's rounding
error over the remaining columns so that the layer *output* on the calibration inputs
moves as little as possible: with ``H = 2 X^T X / n`` (X: the layer's input rows),
column ``i``'s error ``e = (w_i - q_i) / [H^-1]_ii`` updates the later columns by
``- e [H^-1]_i,j>i``. The inverse comes from a Cholesky factor (upper) of ``H^-1`` after
dampening ``H`` by ``percdamp`` times its mean diagonal; updates to columns outside the
current batch of ``lazy_block`` columns are applied once per batch (one matmul).

The integer grid is the format's own (:mod:`qdq.blockwise`): one scale per output row, or
one per block of ``block_size`` inputs, computed with the same max / mse rules when the
block starts (on the weights as GPTQ has updated them so far), so the codes and scales this
returns are exactly what :class:`qdq.nn.weight_only.QuantizedWeight` holds. With
``act_order`` the columns go in order of decreasing ``H_ii`` (the inputs with the most
energy first); block scales are then fixed before the loop from the unchanged weights
(each stays the scale of its original block, so the layout stays the format's). Dead
inputs (``H_ii = 0``: never non-zero in the calibration data) get weight 0.

Conv weights ``[out, C, *k]`` are handled as matrices whose columns run kernel position by
kernel position, channels inside (:func:`to_matrix`), so every block of ``block_size``
channels is a run of consecutive columns; their inputs are the unfolded patches.

This module also holds what GPTQ and AWQ both need from calibration data: the input
statistics of a layer (``X^T X`` and mean ``|x|`` per channel, accumulated batch by batch
from forward pre-hooks, never the activations themselves) and the pass that feeds
batches, stopping each forward as soon as the layers watched have had their inputs.

Example::

    h = InputStatistics.of(layer)
    ... h.add(x) for calibration inputs x ...
    codes, scale = gptq_quantize(layer.weight, h.hessian(), bits=4, block_size=128)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qdq.batches import feed_batch, to_device
from qdq.blockwise import MSE_CLIP_RATIOS, check_block_size, weight_amax
from qdq.tensor_quant import quant_bounds, scale_from_amax

__all__ = ["GPTQConfig", "gptq_quantize", "gptq_matrix", "InputStatistics", "to_matrix",
           "from_matrix", "matrix_scale_to_layout", "supports_statistics",
           "collect_statistics"]


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ's knobs (``weight_only(..., method="gptq", method_options={...})``).

    percdamp: dampening added to ``H``'s diagonal, as a fraction of its mean diagonal.
    act_order: quantize inputs in order of decreasing ``H_ii`` (default: on MiniLM W4 it
        gives min cosine 0.9785 against 0.9719 in input order at block 128).
    lazy_block: columns per batch of deferred updates (rounded up to a multiple of the
        format's block size so every block starts inside one batch).
    """

    percdamp: float = 0.01
    act_order: bool = True
    lazy_block: int = 128

    def __post_init__(self) -> None:
        if not 0 <= self.percdamp < 1:
            raise ValueError(f"percdamp must be in [0, 1), got {self.percdamp!r}")
        if not isinstance(self.lazy_block, int) or self.lazy_block < 1:
            raise ValueError(f"lazy_block must be a positive int, got {self.lazy_block!r}")


# ------------------------------------------------------------------ matrix layout
def to_matrix(w: torch.Tensor) -> torch.Tensor:
    """``[out, cols]``: Linear as is; Conv ``[out, C, *k]`` with columns ``k * C + c``."""
    if w.dim() == 2:
        return w
    return w.flatten(2).permute(0, 2, 1).reshape(w.shape[0], -1)


def from_matrix(m: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`to_matrix` for a weight of ``shape``."""
    if len(shape) == 2:
        return m
    out, channels, kernel = shape[0], shape[1], shape[2:]
    return m.reshape(out, math.prod(kernel), channels).permute(0, 2, 1).reshape(shape)


def matrix_scale_to_layout(scale: torch.Tensor, shape: torch.Size | tuple[int, ...],
                           block_size: int | None) -> torch.Tensor:
    """Scales per row (``[out]``) or per block of matrix columns (``[out, cols / B]``) in
    :mod:`qdq.blockwise`'s layout for a weight of ``shape``."""
    if block_size is None or len(shape) == 2:
        return scale
    out, channels, kernel = shape[0], shape[1], shape[2:]
    per = channels // block_size
    return scale.reshape(out, math.prod(kernel), per).permute(0, 2, 1).reshape(
        out, per, *kernel)


# ------------------------------------------------------------------------- GPTQ
def _cholesky_inverse_upper(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; more dampening if H is not PD."""
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for _ in range(6):
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        damp = max(damp * 10, 1e-6)
    raise ValueError("GPTQ: the Hessian stays singular after dampening")


def _grid_scale(w: torch.Tensor, bits: int, amax_method: str,
                clip_ratios: tuple[float, ...]) -> torch.Tensor:
    """One scale per row of ``w`` (``[out, cols]``), by blockwise's max / mse rule."""
    return scale_from_amax(weight_amax(w, bits, None, amax_method, clip_ratios), bits)


@torch.no_grad()
def gptq_matrix(w: torch.Tensor, hessian: torch.Tensor, bits: int,
                block_size: int | None = None, amax_method: str = "max",
                clip_ratios: tuple[float, ...] = MSE_CLIP_RATIOS,
                config: GPTQConfig = GPTQConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on a matrix ``w [out, cols]`` with blocks of consecutive columns.

    Returns int8 codes ``[out, cols]`` and fp32 scales ``[out]`` (per row) or
    ``[out, cols / block_size]``; ``codes * scale`` is the quantized weight.
    """
    out, cols = w.shape
    check_block_size(block_size, cols)
    qmin, qmax, _ = quant_bounds(bits)
    W = w.detach().float().clone()
    H = hessian.detach().float().to(W.device).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    block = block_size or cols
    blocks = cols // block
    static = None  # scales fixed before the loop: [out, blocks]
    if block_size is None or config.act_order:
        static = torch.stack([_grid_scale(W[:, b * block:(b + 1) * block], bits, amax_method,
                                          clip_ratios) for b in range(blocks)], 1)
    order = torch.arange(cols, device=W.device)
    if config.act_order:
        order = torch.argsort(torch.diagonal(H), descending=True, stable=True)
        W, H = W[:, order], H[order][:, order]
    damp = config.percdamp * float(torch.diagonal(H).mean())
    U = _cholesky_inverse_upper(H, damp)
    codes = torch.zeros(out, cols, dtype=torch.float32, device=W.device)
    scales = static.clone() if static is not None else torch.zeros(out, blocks,
                                                                    device=W.device)
    col_block = (order // block).tolist()
    lazy = config.lazy_block if block_size is None else block * math.ceil(
        config.lazy_block / block)
    scales_t = scales.T.contiguous()  # [blocks, out]: one contiguous row per block
    codes_t = codes.T.contiguous()
    for i1 in range(0, cols, lazy):
        i2 = min(i1 + lazy, cols)
        W1 = W[:, i1:i2].T.contiguous()  # [columns, out]: each column one contiguous row
        err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            b = col_block[col]
            if static is None and col % block == 0:  # a block starts: its scale, now
                scales_t[b] = _grid_scale(W1[i:i + block].T, bits, amax_method, clip_ratios)
            scale = scales_t[b]
            w = W1[i]
            q = torch.clamp(torch.round(w / scale), qmin, qmax)
            codes_t[col] = q
            e = (w - q * scale) / U1[i, i]
            W1[i:].addr_(U1[i, i:], e, alpha=-1.0)
            err1[i] = e
        W[:, i2:] -= err1.T @ U[i1:i2, i2:]
    codes = codes_t.T
    if config.act_order:
        codes = codes[:, torch.argsort(order)]
    scale = scales_t[0] if block_size is None else scales_t.T
    return codes.to(torch.int8).contiguous(), scale.contiguous()


@contextmanager
def _one_thread(device: torch.device) -> Iterator[None]:
    """One intra-op thread on the CPU: the column loop's ops touch a few hundred values
    each, and on a busy machine several threads make them (and ``cholesky_inverse`` of a
    1536-wide Hessian) 10-30x slower, measured on 2 shared cores."""
    if device.type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, bits: int,
                  block_size: int | None = None, amax_method: str = "max",
                  clip_ratios: tuple[float, ...] = MSE_CLIP_RATIOS,
                  config: GPTQConfig = GPTQConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ on a Linear or Conv weight of any layout :mod:`qdq.blockwise` takes.

    ``hessian``: ``[cols, cols]`` over :func:`to_matrix`'s columns. Returns ``(codes,
    scale)`` in the weight's own layout, as :func:`qdq.blockwise.quantize_weight` does.
    """
    if weight.dim() < 2:
        raise ValueError(f"GPTQ needs a weight of 2 or more dimensions, got shape "
                         f"{tuple(weight.shape)}")
    check_block_size(block_size, weight.shape[1])
    with _one_thread(weight.device):
        codes, scale = gptq_matrix(to_matrix(weight), hessian, bits, block_size, amax_method,
                                   clip_ratios, config)
    return (from_matrix(codes, weight.shape).contiguous(),
            matrix_scale_to_layout(scale, weight.shape, block_size).contiguous())


# --------------------------------------------------------------- input statistics
def supports_statistics(module: nn.Module) -> str | None:
    """None when :class:`InputStatistics` can read ``module``'s inputs; else why not."""
    if type(module) is nn.Linear:
        return None
    if type(module) in (nn.Conv1d, nn.Conv2d):
        if module.groups != 1:
            return f"grouped convolution (groups={module.groups})"
        if isinstance(module.padding, str) and module.padding != "valid":
            return f"padding={module.padding!r}"
        return None
    return f"{type(module).__name__} inputs are not read (only Linear, Conv1d, Conv2d)"


class InputStatistics:
    """``X^T X`` (fp32, over the columns of :func:`to_matrix`) and the mean ``|x|`` of each
    input channel, over every input row a layer received."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module = module
        weight = module.weight
        self.columns = to_matrix(weight).shape[1]
        self.channels = weight.shape[1]
        self.xtx = torch.zeros(self.columns, self.columns, device=device)
        self.abs_sum = torch.zeros(self.channels, dtype=torch.float64, device=device)
        self.rows = 0

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        if isinstance(m, nn.Linear):
            return x.reshape(-1, x.shape[-1])
        if x.dim() == m.weight.dim() - 1:  # unbatched
            x = x.unsqueeze(0)
        if m.padding_mode != "zeros":
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
            padding = (0,) * len(m.kernel_size)
        else:
            padding = m.padding
        if padding == "valid":
            padding = (0,) * len(m.kernel_size)
        if isinstance(m, nn.Conv1d):
            x = x.unsqueeze(2)
            kernel, stride = (1, *m.kernel_size), (1, *m.stride)
            padding, dilation = (0, *padding), (1, *m.dilation)
        else:
            kernel, stride, dilation = m.kernel_size, m.stride, m.dilation
        patches = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)
        k = math.prod(kernel)
        n, _, length = patches.shape
        return patches.reshape(n, self.channels, k, length).permute(0, 3, 2, 1).reshape(
            -1, k * self.channels)

    @torch.no_grad()
    def add(self, x: torch.Tensor) -> None:
        rows = self._rows(x.detach()).to(self.xtx.device, torch.float32)
        if not rows.numel():
            return
        self.xtx.addmm_(rows.T, rows)
        k = self.columns // self.channels
        self.abs_sum += rows.abs().reshape(-1, k, self.channels).sum((0, 1)).double() / k
        self.rows += rows.shape[0]

    def hessian(self) -> torch.Tensor:
        """``2 X^T X / n``, GPTQ's Hessian of the squared output error."""
        return self.xtx * (2.0 / max(self.rows, 1))

    def channel_mean(self) -> torch.Tensor:
        """Mean ``|x|`` of each input channel (fp32)."""
        return (self.abs_sum / max(self.rows, 1)).float()


class _Stop(Exception):
    """Raised from a hook once every watched layer has had its inputs for this batch."""


def _device_of(model: nn.Module) -> torch.device:
    return next((t.device for t in [*model.parameters(), *model.buffers()]),
                torch.device("cpu"))


def _first_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    x = args[0] if args else kwargs.get("input")
    return x if isinstance(x, torch.Tensor) else None


@torch.no_grad()
def collect_statistics(model: nn.Module, layers: list[nn.Module], batches: Iterable,
                       forward: Callable[[nn.Module, Any], Any] = feed_batch
                       ) -> list[InputStatistics]:
    """Run ``batches`` through ``model``; the input statistics of each of ``layers``.

    The first batch runs to the end and counts how often each layer is called; later
    forwards stop as soon as every layer has been called that often, so layers early in
    the model cost a fraction of a forward pass.
    """
    device = _device_of(model)
    stats = [InputStatistics(m, device) for m in layers]
    counts = [0] * len(layers)
    expected: list[int] | None = None

    def hook(i: int):
        def record(module, args, kwargs):
            x = _first_input(args, kwargs)
            if x is not None:
                stats[i].add(x)
            counts[i] += 1
            if expected is not None and all(c >= e for c, e in zip(counts, expected,
                                                                    strict=True)):
                raise _Stop
        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, m in enumerate(layers)]
    try:
        for batch in batches:
            counts[:] = [0] * len(layers)
            try:
                forward(model, to_device(batch, device))
            except _Stop:
                pass
            if expected is None:
                expected = list(counts)
    finally:
        for h in handles:
            h.remove()
    return stats
