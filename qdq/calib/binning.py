"""Counting ``|x|`` into histogram bins: the per-batch work of ``HistogramCalibrator``.

A value ``v`` goes to bin ``min(trunc(fl32(|v| * scale)), num_bins - 1)``: the product is
rounded to float32 and truncated, and the top edge belongs to the last bin. Counts are
exact int64.

CPU (:func:`count_cpu`): ``x * scale`` in float32, truncated to int16/int32 *with its
sign* (``trunc`` is odd, so ``|trunc(x s)| = trunc(|x| s)`` and no ``abs`` pass is
needed), then one ``bincount`` over signed slots folded in half. Consecutive values count
into four interleaved copies of the slots (``lanes``, one contiguous add of a cached
offset pattern): after a ReLU half of a tensor falls into bin 0, and ``bincount``'s single
counter per bin makes every such increment wait for the previous one. Buffers are reused
between calls (first-touch page faults of fresh activation-sized tensors cost as much as
the counting). Four passes over the data in all: max, scale, convert, count.

GPU (:func:`count_device`): ``index_add_`` into a fixed-size counts tensor, with the bin
count as a device tensor, so a batch is counted without a host sync.
"""

from __future__ import annotations

import threading

import torch

__all__ = ["count_cpu", "count_device", "LANES"]

#: Interleaved counter copies of the CPU count (see the module docstring).
LANES = 4
#: Below this many values a single lane is used (the fold costs more than it saves).
_LANE_MIN = 1 << 14
_INT16_SLOTS = 1 << 15


def count_cpu(flat: torch.Tensor, scale: float, num_bins: int) -> torch.Tensor:
    """int64 counts ``[num_bins]`` of a 1-D float32 CPU tensor whose ``|x| * scale`` is
    at most ``num_bins`` (the caller grows the histogram first)."""
    n = flat.numel()
    lanes = LANES if n >= _LANE_MIN else 1
    # Each lane has `width` slots, trunc(x * scale) in [-num_bins, num_bins] landing
    # around its middle; a power-of-two width keeps the offset pattern reusable.
    width = 1 << (2 * num_bins + 1).bit_length()
    dtype = torch.int16 if lanes * width <= _INT16_SLOTS else torch.int32
    scaled = _scratch(n, torch.float32, "scaled")
    torch.mul(flat, scale, out=scaled)
    index = _scratch(n, dtype, "index")
    index.copy_(scaled)                          # truncation toward zero
    if lanes == 1:
        index.add_(width // 2)
    else:
        index.add_(_lane_offsets(n, lanes, width, dtype))
    middle = width // 2
    per_lane = torch.bincount(index, minlength=lanes * width).view(lanes, width)
    signed = per_lane[:, middle - num_bins:middle + num_bins + 1].sum(0)   # 2 nb + 1 slots
    counts = signed[num_bins:].clone()                         # from x >= 0
    counts[1:] += signed[:num_bins].flip(0)                    # and from x < 0
    counts[num_bins - 1] += counts[num_bins]     # the top edge belongs to the last bin
    return counts[:num_bins]


def _lane_offsets(n: int, lanes: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``lane * width + width / 2`` for lane ``k % lanes`` of value ``k``, kept between
    calls."""
    key = ("lanes", lanes, width, dtype)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    pattern = buffers.get(key)
    if pattern is None or pattern.numel() < n:
        size = max(n, 1 << 16)
        base = torch.arange(lanes, dtype=dtype) * width + width // 2
        pattern = base.repeat(-(-size // lanes))[:size]
        if size <= _SCRATCH_MAX:
            buffers[key] = pattern
    return pattern[:n]


def count_device(counts: torch.Tensor, xf: torch.Tensor, scale: torch.Tensor,
                 num_bins: torch.Tensor) -> None:
    """Add the bins of ``|xf| * scale`` into ``counts`` (all on one device, no host sync);
    ``num_bins`` is a 0-dim int64 tensor. NaN counts into bin 0 and +Inf into the last
    bin: the caller reports them from the batch max."""
    scaled = torch.abs(xf).mul_(scale)
    torch.nan_to_num_(scaled, nan=0.0, posinf=float(counts.numel()))
    index = scaled.clamp_(max=float(counts.numel())).to(torch.int64)
    index = torch.minimum(index, num_bins - 1)
    ones = torch.ones((), dtype=torch.int64, device=counts.device).expand(index.numel())
    counts.index_add_(0, index, ones)


_SCRATCH = threading.local()
#: Largest buffer kept between batches (2^26 elements: 256 MiB as float32).
_SCRATCH_MAX = 1 << 26


def _scratch(numel: int, dtype: torch.dtype, slot: str) -> torch.Tensor:
    """A reusable 1-D CPU buffer, one per thread and slot, grown to the largest batch."""
    if numel > _SCRATCH_MAX:
        return torch.empty(numel, dtype=dtype)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        buffers[(slot, dtype)] = buf
    return buf[:numel]
