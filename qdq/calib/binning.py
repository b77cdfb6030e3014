"""Counting ``|x|`` into histogram bins: the per-batch work of ``HistogramCalibrator``.

A value ``v`` goes to bin ``min(trunc(fl32(|v| * scale)), num_bins - 1)``: the product is
rounded to float32 and truncated, and the top edge belongs to the last bin. Counts are
exact int64.

CPU (:func:`count_cpu`): ``x * scale`` in float32 into a reused buffer, truncated to
int16 (``trunc`` is odd, so an ``abs`` of the small integers gives ``trunc(|x| s)``), then
``bincount``. Its counting loop is serial, so large inputs are counted in parts on
``torch.get_num_threads()`` threads (a small pool of worker threads, created on first use)
and summed. Buffers are reused between calls: first-touch page faults of fresh
activation-sized tensors cost as much as the counting. With the batch max, five passes
over the data: max, scale, convert, abs (int16), count.

GPU (:func:`count_device`): ``index_add_`` into a fixed-size counts tensor, with the bin
count as a device tensor, so a batch is counted without a host sync.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import torch

__all__ = ["count_cpu", "count_device"]

#: int16 indices up to this many bins.
_INT16_SLOTS = 1 << 15
#: Values per thread below which the count is not split.
_SPLIT_MIN = 1 << 19


def count_cpu(flat: torch.Tensor, scale: float, num_bins: int) -> torch.Tensor:
    """int64 counts ``[num_bins]`` of a 1-D float32 CPU tensor whose ``|x| * scale`` is
    at most ``num_bins`` (the caller grows the histogram first)."""
    n = flat.numel()
    dtype = torch.int16 if num_bins < _INT16_SLOTS else torch.int32
    scaled = _scratch(n, torch.float32, "scaled")
    torch.mul(flat, scale, out=scaled)
    index = _scratch(n, dtype, "index")
    index.copy_(scaled)                          # truncation toward zero
    index.abs_()                                 # = trunc(|x| * scale): trunc is odd
    counts = _bincount(index, num_bins + 1)
    counts[num_bins - 1] += counts[num_bins]     # the top edge belongs to the last bin
    return counts[:num_bins]


def _bincount(index: torch.Tensor, size: int) -> torch.Tensor:
    """``torch.bincount(index, minlength=size)``, split over ``torch.get_num_threads()``
    threads for large inputs: its counting loop is serial (the other passes already run
    on every thread)."""
    parts = min(torch.get_num_threads(), index.numel() // _SPLIT_MIN)
    if parts < 2:
        return torch.bincount(index, minlength=size)
    bounds = [index.numel() * k // parts for k in range(parts + 1)]
    chunks = [index[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
    pending = [_pool(parts - 1).submit(torch.bincount, c, None, size) for c in chunks[1:]]
    counts = torch.bincount(chunks[0], minlength=size)
    for done in pending:
        counts += done.result()
    return counts


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    """Worker threads for ``_bincount``, created on first use and replaced by a larger pool
    when more are asked for: a few idle threads, no change to torch's settings."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None or _POOL._max_workers < workers:  # noqa: SLF001 - our own pool
            _POOL = ThreadPoolExecutor(workers, thread_name_prefix="qdq-bincount")
        return _POOL


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
