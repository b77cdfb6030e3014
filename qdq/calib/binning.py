"""Counting ``|x|`` into histogram bins: the per-batch work of ``HistogramCalibrator``.

A value ``v`` goes to bin ``min(trunc(fl32(|v| * scale)), num_bins - 1)``: the product is
rounded to float32 and truncated, and the top edge belongs to the last bin. Counts are
exact int64.

CPU (:func:`count_cpu`): ``x * scale`` in float32, truncated to int16/int32 *with its
sign* (``trunc`` is odd, so ``|trunc(x s)| = trunc(|x| s)`` and no ``abs`` pass is
needed), then one ``bincount`` over ``2 * num_bins + 1`` signed slots folded in half.
Consecutive values count into four interleaved copies of those slots (``lanes``): after a
ReLU half of a tensor falls into bin 0, and ``bincount``'s single counter per bin makes
every such increment wait for the previous one; four counters run four times faster.
Buffers are reused between calls (first-touch page faults of fresh activation-sized
tensors cost as much as the counting).

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
    slots = 2 * num_bins + 1                    # trunc(x * scale) in [-num_bins, num_bins]
    dtype = torch.int16 if lanes * slots <= _INT16_SLOTS else torch.int32
    scaled = _scratch(n, torch.float32, 0)
    torch.mul(flat, scale, out=scaled)
    index = _scratch(n, dtype, 1)
    index.copy_(scaled)                          # truncation toward zero
    main = n - n % lanes
    offsets = num_bins + slots * torch.arange(lanes, dtype=dtype)
    index[:main].view(-1, lanes).add_(offsets)
    if main < n:
        index[main:].add_(num_bins)
    signed = torch.bincount(index, minlength=lanes * slots).view(lanes, slots).sum(0)
    counts = signed[num_bins:].clone()           # bins 0 .. num_bins from x >= 0
    counts[1:] += signed[:num_bins].flip(0)      # and from x < 0
    counts[num_bins - 1] += counts[num_bins]     # the top edge belongs to the last bin
    return counts[:num_bins]


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


def _scratch(numel: int, dtype: torch.dtype, slot: int) -> torch.Tensor:
    """A reusable 1-D CPU buffer, one per thread and slot, grown to the largest batch."""
    if numel > _SCRATCH_MAX:
        return torch.empty(numel, dtype=dtype)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        buffers[(slot, dtype)] = buf
    return buf[:numel]
