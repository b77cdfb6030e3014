"""``HistogramCalibrator(torch_hist=False)``: pytorch-quantization's numpy histogram layout.

pytorch-quantization has two ways to collect a histogram. Its default (``torch_hist=True``,
our :class:`~qdq.calib.HistogramCalibrator`) bins ``[0, max]``. The other, kept here for
scripts that ask for it, is ``numpy.histogram``'s:

- the first batch (after ``skip_zeros``) is binned over ``[min |x|, max |x|]`` in
  ``num_bins`` bins, with float32 edges (numpy widens a zero-width range to
  ``[v - 0.5, v + 0.5]``);
- a later batch whose largest ``|x|`` passes the last edge appends float32 edges of the
  first width ``w``: ``numpy.arange(last + w, largest + w, w)``;
- every batch is counted by ``numpy.histogram`` against the current edges: a value below
  the first edge is left out, the last bin includes its right edge.

So amax, an edge (entropy, percentile) or a bin centre (mse), starts from the first
batch's smallest value rather than from 0. The searches on the counts are those of
:mod:`qdq.calib.amax_search`; mse, whose error depends on where the centres lie, runs
over the actual centres here (:func:`mse_bin_on_centres`).

As in the torch layout, growth past ``max_bins`` merges neighbouring bins ``2^j`` at a
time (pytorch-quantization grows without bound); below that cap the histogram is
pytorch-quantization's. The state is numpy arrays on the host (pytorch-quantization copies
every batch to the host for this layout, as here), so it cannot be merged across ranks:
use ``torch_hist=True`` for distributed calibration.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from qdq.calib.amax_search import (
    _CPU_BLOCK,
    MSE_TIE_RTOL,
    _pick,
    entropy_bins,
    num_levels,
    percentile_bins,
)
from qdq.calib.base import CalibrationError
from qdq.calib.histogram import HistogramCalibrator

__all__ = ["NumpyHistogramCalibrator", "mse_bin_on_centres"]


class NumpyHistogramCalibrator(HistogramCalibrator):
    """Histogram of ``|x|`` with numpy's layout; build it as
    ``HistogramCalibrator(..., torch_hist=False)``. Arguments as there."""

    edge_layout = True

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False,
                 num_bins: int = 2048, grow_method: str | None = None,
                 skip_zeros: bool = False, torch_hist: bool = False, *,
                 max_bins: int | None = None) -> None:
        super().__init__(num_bits, axis, unsigned, num_bins, grow_method, skip_zeros,
                         torch_hist, max_bins=max_bins)

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        self._hist: np.ndarray | None = None       # int64 counts
        self._edges: np.ndarray | None = None      # float32 edges, one more than counts
        self._largest: np.float32 | None = None

    @property
    def counts(self) -> torch.Tensor | None:
        return None if self._hist is None else torch.from_numpy(self._hist)

    @property
    def max(self) -> torch.Tensor | None:
        return None if self._largest is None else torch.tensor(self._largest)

    @property
    def bin_width(self) -> float | None:
        return None if self._edges is None else float(self._edges[1] - self._edges[0])

    def bin_edges(self) -> torch.Tensor | None:
        return None if self._edges is None else torch.from_numpy(self._edges).double()

    @property
    def _calib_hist(self) -> np.ndarray | None:
        return self._hist

    @property
    def _calib_bin_edges(self) -> np.ndarray | None:
        return self._edges

    # ---------------------------------------------------------------- collect
    def collect(self, x: torch.Tensor) -> None:
        """Count ``|x|`` of one batch against the current edges (on the host)."""
        x = x.detach()
        if x.numel() == 0:
            return
        values = self._host_values(x)
        if values.size == 0:
            return
        largest = values.max()
        if self._hist is None:
            hist, self._edges = np.histogram(values, bins=self._num_bins)
            self._hist = hist.astype(np.int64)
            self._largest = largest
            return
        if largest > self._edges[-1]:
            self._grow(largest)
        hist, _ = np.histogram(values, bins=self._edges)
        hist = hist.astype(np.int64)
        hist[:self._hist.size] += self._hist
        self._hist = hist
        self._largest = max(self._largest, largest)

    def _host_values(self, x: torch.Tensor) -> np.ndarray:
        """``|x|`` as a flat float32 host array, checked, without skipped zeros."""
        flat = x.reshape(-1).float().cpu()
        lo, hi = (float(v) for v in torch.aminmax(flat))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            self._check_finite(x.cpu())              # raises, naming the bad value
            raise CalibrationError(f"{self.owner}: calibration data exceeds the float32 "
                                   f"range (largest |x| {float(x.abs().max()):g})")
        if self._unsigned and lo < 0:
            raise CalibrationError(f"{self.owner}: unsigned quantizer received negative "
                                   f"values (min {lo:g})")
        values = flat.abs().numpy()
        return values[values != 0] if self._skip_zeros else values

    def _grow(self, largest: np.float32) -> None:
        """Append edges of the current width up to ``largest`` (numpy's arange, as
        pytorch-quantization does), merging bins first where there would be more than
        ``max_bins``."""
        step = self._merge_step(largest)
        if step > 1:
            self._hist, self._edges = _coarsened(self._hist, self._edges, step)
        width = self._edges[1] - self._edges[0]
        extra = np.arange(self._edges[-1] + width, largest + width, width)
        self._edges = np.concatenate([self._edges, extra.astype(self._edges.dtype)])
        while self._edges.size - 1 > self._max_bins:     # arange rounding: at most once
            self._hist, self._edges = _coarsened(self._hist, self._edges, 2)

    def _merge_step(self, largest: np.float32) -> int:
        """1, or the power of two by which bins merge so that growing to ``largest`` stays
        within ``max_bins`` (counted before any edge is made: the growth may be huge)."""
        edges = self._edges
        width = edges[1] - edges[0]
        with np.errstate(over="ignore"):
            # the length numpy's arange gives, in the edges' own precision
            extra = np.ceil(((largest + width) - (edges[-1] + width)) / width)
        need = edges.size - 1 + int(min(float(extra), 2.0 ** 62))
        step = 1
        while -(-need // step) > self._max_bins:
            step *= 2
        return step

    # ------------------------------------------------------------------ amax
    def amax_on_edges(self, method: str, **options) -> torch.Tensor:
        """amax of ``method`` (options already checked by ``compute_amaxes``) read off
        this histogram's edges, as pytorch-quantization reads it (0-dim float32)."""
        counts, names = [self.counts], [self.owner]
        if method == "entropy":
            bins = entropy_bins(counts, num_bits=self._num_bits, unsigned=self._unsigned,
                                names=names, **options)
            return torch.tensor(float(self._edges[int(bins[0])]), dtype=torch.float32)
        if method == "percentile":
            bins = percentile_bins(counts, names=names, **options)
            return torch.tensor(float(self._edges[int(bins[0])]), dtype=torch.float32)
        if method == "mse":
            centres = (self._edges[1:] + self._edges[:-1]) / self._edges.dtype.type(2)
            b = mse_bin_on_centres(self.counts, torch.from_numpy(centres),
                                   num_bits=self._num_bits, unsigned=self._unsigned,
                                   name=self.owner, **options)
            return torch.tensor(float(centres[b]), dtype=torch.float32)
        raise CalibrationError(f"{self.owner}: no {method!r} search on bin edges")

    def fix_range(self, first_max) -> None:
        raise CalibrationError(f"{self.owner}: fix_range is for the torch_hist=True layout; "
                               "the numpy layout takes its range from the first batch")

    def all_reduce(self, group=None) -> None:
        raise CalibrationError(
            f"{self.owner}: histograms with torch_hist=False have per-rank edges and cannot "
            "be summed across ranks; use torch_hist=True for distributed calibration")

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + ", torch_hist=False)"


def _coarsened(hist: np.ndarray, edges: np.ndarray, step: int
               ) -> tuple[np.ndarray, np.ndarray]:
    """Every ``step`` neighbouring bins summed into one; the edges padded with bins of
    the same width up to a multiple of ``step`` first."""
    bins = edges.size - 1
    groups = -(-bins // step)
    missing = groups * step - bins
    if missing:
        width = edges[1] - edges[0]
        pad = edges[-1] + width * np.arange(1, missing + 1, dtype=edges.dtype)
        edges = np.concatenate([edges, pad])
    padded = np.zeros(groups * step, dtype=np.int64)
    padded[:hist.size] = hist
    return padded.reshape(groups, step).sum(1), edges[::step].copy()


def mse_bin_on_centres(counts: torch.Tensor, centres: torch.Tensor, *, num_bits: int = 8,
                       unsigned: bool = False, start_bin: int = 128, stride: int = 1,
                       name: str = "histogram") -> int:
    """Index ``i`` of the centre whose use as amax gives the smallest squared fake-quant
    error ``sum_b counts[b] (fq(x_b) - x_b)^2`` over ascending centres ``x`` placed anywhere
    (the first of ties): pytorch-quantization's mse search where the closed form of
    :func:`~qdq.calib.amax_search.mse_bins`, which needs centres at ``(b + 1/2) w``, does
    not apply.

    Candidates ``start_bin, start_bin + stride, ... < n``. With step ``s = amax / qmax``,
    the centres that round to level ``j`` form a run, found by ``searchsorted`` at
    ``(j + 1/2) s`` (a centre exactly there goes up), and the run's error is
    ``j^2 s^2 C0 - 2 j s C1 + C2`` from prefix sums of ``c``, ``c x``: O(candidates x
    levels), in float64. Levels are clipped to ``[-qmax, qmax]`` (``[0, qmax]`` unsigned).
    """
    n = centres.numel()
    if start_bin >= n:
        raise CalibrationError(f"{name}: start_bin={start_bin} leaves no mse candidate in a "
                               f"histogram of {n} bins (use a start_bin of at most "
                               f"{max(n - 1, 1)})")
    qmax = num_levels(num_bits, unsigned) - 1
    levels = torch.arange(0 if unsigned else -qmax, qmax + 1, dtype=torch.float64)
    c = counts.to(torch.float64).cpu()
    x = centres.to(torch.float64).cpu()
    p0 = torch.nn.functional.pad(torch.cumsum(c, 0), (1, 0))
    p1 = torch.nn.functional.pad(torch.cumsum(c * x, 0), (1, 0))
    c2 = float((c * x * x).sum())
    cand = torch.arange(start_bin, n, stride)
    err = torch.empty(cand.numel(), dtype=torch.float64)
    block = max(1, _CPU_BLOCK // levels.numel())
    for lo in range(0, cand.numel(), block):          # a few tensor ops per block
        amax = x[cand[lo:lo + block]]
        step = (amax / qmax)[:, None]
        inner = torch.searchsorted(x, (levels[:-1] + 0.5) * step)
        bounds = torch.nn.functional.pad(inner, (1, 0), value=0)
        bounds = torch.nn.functional.pad(bounds, (0, 1), value=n)
        run0, run1 = p0[bounds].diff(dim=1), p1[bounds].diff(dim=1)
        e = (step[:, 0] ** 2) * (run0 @ levels.square()) - 2 * step[:, 0] * (run1 @ levels)
        err[lo:lo + block] = torch.where(amax > 0, e + c2, torch.inf)
    valid = torch.ones(1, cand.numel(), dtype=torch.bool)
    return int(cand[_pick(err[None, :], valid, MSE_TIE_RTOL * c2, last=False)[0]])
