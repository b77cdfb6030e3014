"""``HistogramCalibrator``: an exact histogram of ``|x|`` whose range grows by doubling.

The histogram covers ``[0, R)`` with ``num_bins`` equal bins and ``R = 2^e`` always a power
of two, chosen as the smallest one above the largest ``|x|`` seen. When a batch goes past
``R``, ``R`` doubles ``k`` times and every ``2^k`` adjacent bins merge into one
(``scatter_add`` on ``arange(num_bins) >> k``). Binning is ``floor(|x| * num_bins / R)``, a
multiplication by a power of two for power-of-two ``num_bins``, so merging then binning
gives exactly the counts of binning everything at the final range. Counts are int64. The
exponent ``e`` and ``k`` stay device tensors, so a GPU batch is collected without a host
sync. Power-of-two ranges also make ``all_reduce`` exact: ranks agree on the largest ``e``,
re-bin to it and sum.

``compute_amax(method)`` turns the histogram into amax with one of the vectorised searches
of ``qdq.calib.amax_search`` ('entropy', 'percentile', 'mse') or returns the exact running
max ('max'). A search never returns more than the largest ``|x|`` seen.

``skip_zeros=True`` leaves exact zeros out of the counts (pytorch-quantization's option).
The entropy search does not need it: it levels bin 0 to bin 1 before searching
(``amax_search.level_zero_bin``), so ReLU zeros do not decide it either way.

Example::

    >>> calib = HistogramCalibrator()
    >>> for _ in range(4):
    ...     calib.collect(torch.randn(1024))
    >>> calib.compute_amax("percentile", percentile=99.9)   # about 3.3
"""

from __future__ import annotations

import threading

import torch

from qdq.calib.amax_search import AMAX_SEARCHES
from qdq.calib.base import CalibrationError, Calibrator

__all__ = ["HistogramCalibrator", "AMAX_METHODS"]

#: Range exponents are kept in [_MIN_EXP, _MAX_EXP] so ``num_bins * 2^-e`` stays a normal
#: float32: values below 2^-100 all land in bin 0, and 2^129 is above any finite float32.
_MIN_EXP = -100
_MAX_EXP = 129
#: A shift of 62 already merges all bins of any int64-indexable histogram into bin 0.
_MAX_SHIFT = 62

#: Methods of ``compute_amax``: the histogram searches plus the exact running max.
AMAX_METHODS = ("entropy", "percentile", "mse", "max")


class HistogramCalibrator(Calibrator):
    """Collects an exact histogram of ``|x|`` (per tensor) for entropy, percentile and mse
    calibration.

    Args:
        num_bits: bits of the quantizer the amax is for (levels of the entropy search, grid
            of the mse search).
        axis: must be ``None``: the histogram calibrator is per tensor.
        unsigned: the quantizer is unsigned (256 levels for 8 bits instead of 128).
        num_bins: bins over ``[0, R)``; a power of two keeps range growth exact.
        skip_zeros: leave exact zeros out of the histogram (e.g. after ReLU).
        grow_method, torch_hist: accepted for pytorch-quantization scripts; no effect.
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False,
                 num_bins: int = 2048, skip_zeros: bool = False, *,
                 grow_method: str | None = None, torch_hist: bool | None = None) -> None:
        super().__init__(num_bits, axis, unsigned)
        # grow_method / torch_hist: pytorch-quantization's knobs, accepted so its scripts
        # run; here growth is always exact doubling and binning always uses torch.
        del grow_method, torch_hist
        if axis is not None:
            raise CalibrationError(
                f"{self.owner}: the histogram calibrator is per tensor; got axis={axis} "
                "(use calib_method='max' for per-channel amax)"
            )
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise CalibrationError(f"{self.owner}: num_bins must be a positive int, "
                                   f"got {num_bins!r}")
        self._num_bins = num_bins
        self._skip_zeros = skip_zeros
        self._exact_scale = num_bins & (num_bins - 1) == 0
        self.reset()

    # ----------------------------------------------------------------- state
    @property
    def num_bins(self) -> int:
        return self._num_bins

    @property
    def skip_zeros(self) -> bool:
        return self._skip_zeros

    @property
    def counts(self) -> torch.Tensor | None:
        """int64 counts per bin, or None before any data."""
        return self._counts

    @property
    def max(self) -> torch.Tensor | None:
        """The exact largest ``|x|`` seen (float32, 0-dim), or None before any data."""
        return self._max

    @property
    def bin_width(self) -> float | None:
        """``R / num_bins`` (one host sync), or None before any data."""
        if self._exp is None:
            return None
        return 2.0 ** int(self._exp) / self._num_bins

    def bin_edges(self) -> torch.Tensor | None:
        """The ``num_bins + 1`` edges (float64) on the histogram's device."""
        width = self.bin_width
        if width is None:
            return None
        edges = torch.arange(self._num_bins + 1, dtype=torch.float64, device=self._counts.device)
        return edges * width

    def reset(self) -> None:
        self._counts: torch.Tensor | None = None
        self._exp: torch.Tensor | None = None     # R = 2^exp, int64 0-dim on the device
        self._max: torch.Tensor | None = None

    def _init_state(self, device: torch.device) -> None:
        self._counts = torch.zeros(self._num_bins, dtype=torch.int64, device=device)
        self._exp = torch.zeros((), dtype=torch.int64, device=device)
        self._max = torch.zeros((), dtype=torch.float32, device=device)
        self._bin_ids = torch.arange(self._num_bins, dtype=torch.int64, device=device)
        # Filled on the device (torch.full), not copied from the host: no sync.
        self._num_bins_f = torch.full((), float(self._num_bins), device=device)

    # ---------------------------------------------------------------- collect
    def collect(self, x: torch.Tensor) -> None:
        """Add ``|x|`` of one batch to the histogram (no host sync on a GPU)."""
        x = x.detach()
        if x.numel() == 0:
            return
        cpu = x.device.type == "cpu"
        if self._unsigned and cpu and bool((x < 0).any()):
            raise CalibrationError(f"{self.owner}: unsigned quantizer received negative "
                                   f"values (min {x.min().item():g})")
        if self._counts is None:
            self._init_state(x.device)
        elif self._counts.device != x.device:
            raise CalibrationError(f"{self.owner}: histogram lives on {self._counts.device} "
                                   f"but a batch came on {x.device}")
        flat = x.reshape(-1)
        xa = _scratch(flat.numel(), torch.float32, x.device)
        if flat.dtype == torch.float32:
            torch.abs(flat, out=xa)
        else:
            xa.copy_(flat).abs_()
        batch_max = xa.max()
        if cpu and not torch.isfinite(batch_max):   # max carries NaN and Inf along
            self._check_finite(x)                    # raises, naming the bad value
            raise CalibrationError(f"{self.owner}: calibration data exceeds the float32 "
                                   f"range (largest |x| {float(x.abs().max()):g})")
        self._grow_to(_exponent_above(batch_max), fresh=self._max == 0)
        self._max = torch.maximum(self._max, batch_max)   # NaN on a GPU: compute_amax raises

        scale = torch.ldexp(self._num_bins_f, -self._exp)    # num_bins / R, on the device
        xa.mul_(scale)
        if not cpu:
            torch.nan_to_num_(xa, nan=0.0, posinf=self._num_bins - 1)
        if not (cpu and self._exact_scale and x.dtype != torch.float64):
            # Finite float32 data below R = 2^e scales to below num_bins exactly; anything
            # else (rounding, float64 overflow, NaN/Inf on a GPU) is clamped into range.
            xa.clamp_(0, self._num_bins - 1)
        _add_counts(self._counts, xa, self._num_bins)
        if self._skip_zeros:
            self._counts[0].sub_((x == 0).sum())

    def _grow_to(self, exp: torch.Tensor, fresh: torch.Tensor) -> None:
        """Make the range ``2^max(e, exp)``, merging bins; a histogram holding only zeros
        (``fresh``) takes ``exp`` directly, its counts being in bin 0 at any range."""
        new_exp = torch.where(fresh, exp, torch.maximum(self._exp, exp))
        shift = (new_exp - self._exp).clamp_(0, _MAX_SHIFT)
        merged = torch.zeros_like(self._counts)
        merged.scatter_add_(0, torch.bitwise_right_shift(self._bin_ids, shift), self._counts)
        self._counts = merged
        self._exp = new_exp

    # ------------------------------------------------------------ distributed
    def all_reduce(self, group=None) -> None:
        """Merge histograms of all ranks (every rank calls it; all end identical)."""
        import torch.distributed as dist

        if self._counts is None:
            device = torch.device("cpu")
            if dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            self._init_state(device)
            seen = torch.zeros((), dtype=torch.int64, device=device)
        else:
            seen = torch.ones((), dtype=torch.int64, device=self._counts.device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
        # Ranks with only zeros have no say in the range.
        exp = torch.where(self._max > 0, self._exp, torch.full_like(self._exp, _MIN_EXP - 1))
        dist.all_reduce(exp, op=dist.ReduceOp.MAX, group=group)
        exp = torch.where(exp < _MIN_EXP, torch.zeros_like(exp), exp)
        self._grow_to(exp, fresh=self._max == 0)
        dist.all_reduce(self._counts, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self._max, op=dist.ReduceOp.MAX, group=group)
        if int(seen) == 0:
            self.reset()

    # ----------------------------------------------------------------- amax
    def compute_amax(self, method: str = "entropy", *, percentile: float = 99.99,
                     start_bin: int = 128, stride: int = 1) -> torch.Tensor | None:
        """amax as a 0-dim float32 tensor on the histogram's device, or None if nothing was
        collected. ``method``: 'entropy', 'percentile' (uses ``percentile``), 'mse' or 'max'.
        ``start_bin``/``stride`` pick the candidates of entropy and mse."""
        if method not in AMAX_METHODS:
            raise CalibrationError(f"{self.owner}: unknown amax method {method!r}; "
                                   f"valid methods: {', '.join(AMAX_METHODS)}")
        if self._counts is None:
            return None
        if not bool(torch.isfinite(self._max)):
            raise CalibrationError(f"{self.owner}: calibration data contained NaN or Inf "
                                   f"(largest |x| seen: {float(self._max)})")
        if method == "max" or float(self._max) == 0:
            return self._max.clone()
        search = AMAX_SEARCHES[method]
        try:
            amax = search(self._counts, self.bin_width, num_bits=self._num_bits,
                          unsigned=self._unsigned, percentile=percentile,
                          start_bin=start_bin, stride=stride)
        except CalibrationError as err:
            raise CalibrationError(f"{self.owner}: {err}") from None
        return torch.minimum(amax, self._max)

    def __repr__(self) -> str:
        sign = ", unsigned" if self._unsigned else ""
        zeros = ", skip_zeros" if self._skip_zeros else ""
        return (f"HistogramCalibrator(bits={self._num_bits}{sign}, bins={self._num_bins}"
                f"{zeros})")


def _exponent_above(value: torch.Tensor) -> torch.Tensor:
    """The smallest ``e`` with ``value < 2^e`` (clamped to the supported range)."""
    exp = torch.frexp(value.float()).exponent.to(torch.int64)
    return exp.clamp_(_MIN_EXP, _MAX_EXP)


def _add_counts(counts: torch.Tensor, scaled: torch.Tensor, num_bins: int) -> None:
    """``counts[floor(v)] += 1`` for every ``v`` of ``scaled`` (all in ``[0, num_bins)``).

    Exact int64 counts either way. On a GPU, ``index_add_``: no host sync (``bincount``
    would read its max back to size the result). On a CPU, ``bincount``: its serial count
    loop beats ``index_add_``'s by about a third, extra min/max pass included."""
    idx = _scratch(scaled.numel(), torch.int32, scaled.device, slot=1)
    idx.copy_(scaled)                           # truncation = floor for v >= 0
    if idx.device.type == "cpu":
        counts.add_(torch.bincount(idx, minlength=num_bins))
        return
    ones = torch.ones((), dtype=torch.int64, device=counts.device).expand(idx.numel())
    counts.index_add_(0, idx, ones)


_SCRATCH = threading.local()
#: Largest buffer kept between batches (2^26 elements: 256 MiB as float32).
_SCRATCH_MAX = 1 << 26


def _scratch(numel: int, dtype: torch.dtype, device: torch.device, slot: int = 0
             ) -> torch.Tensor:
    """A reusable 1-D buffer. On a CPU every fresh tensor of activation size costs page
    faults on first touch, as much as the binning itself; one buffer per thread, grown to
    the largest batch (up to ``_SCRATCH_MAX`` elements), avoids that. GPUs have a caching
    allocator and get a new tensor."""
    if device.type != "cpu" or numel > _SCRATCH_MAX:
        return torch.empty(numel, dtype=dtype, device=device)
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    buf = buffers.get((slot, dtype))
    if buf is None or buf.numel() < numel:
        buf = torch.empty(numel, dtype=dtype)
        buffers[(slot, dtype)] = buf
    return buf[:numel]
