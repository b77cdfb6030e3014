"""``HistogramCalibrator``: pytorch-quantization's histogram of ``|x|``, counted exactly.

Layout, as pytorch-quantization lays it out: the first batch with a non-zero value fixes
the bin width ``w = m0 / num_bins`` from its largest ``|x|`` ``m0``, so the histogram
covers ``[0, m0]`` in ``num_bins`` bins. A later batch whose largest ``|x|`` ``M`` exceeds
``m0`` and reaches past the last bin appends bins of the same width, up to
``ceil(fl32(M * s))`` bins. A value goes to bin ``trunc(fl32(|x| * s))`` with
``s = fl32(num_bins / m0)`` (float32 arithmetic), the top edge in the last bin. Counts
are exact int64 (pytorch-quantization adds ``torch.histc``'s float32 counts, which stop
counting past 2^24 in a bin).

**Growth cap.** pytorch-quantization's growth is unbounded (a late batch 1000 times the
first one's range means two million bins). Here a histogram holds at most ``max_bins``
bins (default ``32 * num_bins``): when a batch needs more, neighbouring bins merge, 2^j at
a time for the smallest ``j`` that fits, and the width grows 2^j-fold. Merging keeps every
count; amax then differs from pytorch-quantization's by less than one merged bin. Below
the cap the histogram is pytorch-quantization's.

Zeros before the first non-zero batch count into bin 0. ``skip_zeros=True`` leaves exact
zeros out (pytorch-quantization's option). A CPU batch is checked for NaN/Inf (and for
negative values on an unsigned quantizer) as it arrives; on a GPU nothing is read back
per batch and ``compute_amax`` reports a NaN/Inf seen.

``HistogramCalibrator(torch_hist=False)`` is pytorch-quantization's other layout, numpy's
(:mod:`qdq.calib.numpy_layout`).

``compute_amax(method)`` runs one search of :mod:`qdq.calib.amax_search` ('entropy',
'percentile', 'mse') or returns the exact running max ('max'); :func:`compute_amaxes` runs
one search over many calibrators at once.

Example::

    >>> calib = HistogramCalibrator()
    >>> for _ in range(4):
    ...     calib.collect(torch.randn(1024))
    >>> calib.compute_amax("percentile", percentile=99.9)   # about 3.3
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch

from qdq.calib.amax_search import SEARCHES, search_amax
from qdq.calib.base import CalibrationError, Calibrator, PerTensorOnlyError, UnknownMethodError
from qdq.calib.binning import count_cpu, count_device

__all__ = ["HistogramCalibrator", "compute_amaxes", "GROWTH_CAP"]

#: Default ``max_bins`` as a multiple of ``num_bins``.
GROWTH_CAP = 32


class HistogramCalibrator(Calibrator):
    """Collects the histogram of ``|x|`` (per tensor) for entropy, percentile and mse.

    Args:
        num_bits: bits of the quantizer the amax is for (levels of entropy, grid of mse).
        axis: must be ``None``: a histogram is per tensor.
        unsigned: the quantizer is unsigned (256 levels for 8 bits instead of 128).
        num_bins: bins over the first batch's range.
        grow_method: ignored, as pytorch-quantization ignores it (with a warning for
            anything but ``None`` and ``"append"``): the histogram always grows by
            appending bins of the same width.
        skip_zeros: leave exact zeros out of the histogram (e.g. after ReLU).
        torch_hist: True (default) for the layout above; False builds a
            :class:`~qdq.calib.numpy_layout.NumpyHistogramCalibrator`, the layout of
            pytorch-quantization's numpy path (bins ``[min, max]`` of the first batch).
        max_bins: growth cap (default ``GROWTH_CAP * num_bins``); see the module docstring.

    ``_calib_hist`` and ``_calib_bin_edges`` read the counts and the float32 edges under
    pytorch-quantization's attribute names, for scripts and tests that inspect them.
    """

    #: amax methods of ``compute_amax``, the default first.
    amax_methods = ("entropy", "percentile", "mse", "max")
    #: True where amax is read off explicit bin edges (the numpy layout), not ``i * w``.
    edge_layout = False

    def __new__(cls, num_bits: int = 8, axis=None, unsigned: bool = False,
                num_bins: int = 2048, grow_method: str | None = None,
                skip_zeros: bool = False, torch_hist: bool = True, **kwargs):
        # pytorch-quantization picks its layout with a flag of this one class, so the flag
        # picks the class here: scripts asking for torch_hist=False get that layout.
        if cls is HistogramCalibrator and not torch_hist:
            from qdq.calib.numpy_layout import NumpyHistogramCalibrator

            cls = NumpyHistogramCalibrator
        return super().__new__(cls)

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False,
                 num_bins: int = 2048, grow_method: str | None = None,
                 skip_zeros: bool = False, torch_hist: bool = True, *,
                 max_bins: int | None = None) -> None:
        super().__init__(num_bits, axis, unsigned)
        if axis is not None:
            raise PerTensorOnlyError(
                f"{self.owner}: the histogram calibrator is per tensor; got axis={axis} "
                "(use calib_method='max' for per-channel amax)")
        if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
            raise CalibrationError(f"{self.owner}: num_bins must be a positive int, "
                                   f"got {num_bins!r}")
        if grow_method not in (None, "append"):
            warnings.warn(
                f"{self.owner}: grow_method={grow_method!r} is ignored (as in "
                "pytorch-quantization, where it is deprecated); the histogram grows by "
                "appending bins of the same width", stacklevel=2)
        max_bins = GROWTH_CAP * num_bins if max_bins is None else max_bins
        if isinstance(max_bins, bool) or not isinstance(max_bins, int) or max_bins < num_bins:
            raise CalibrationError(f"{self.owner}: max_bins must be an int >= num_bins "
                                   f"({num_bins}), got {max_bins!r}")
        self._num_bins = num_bins
        self._max_bins = max_bins
        self._skip_zeros = skip_zeros
        self._torch_hist = bool(torch_hist)    # pytorch-quantization's attribute
        self.reset()

    # ----------------------------------------------------------------- state
    @property
    def num_bins(self) -> int:
        """Bins over the first batch's range (the histogram may have grown since)."""
        return self._num_bins

    @property
    def max_bins(self) -> int:
        return self._max_bins

    @property
    def skip_zeros(self) -> bool:
        return self._skip_zeros

    @property
    def counts(self) -> torch.Tensor | None:
        """int64 counts of the current bins, or None before any data."""
        if self._counts is None:
            return None
        return self._counts[:int(self._nb)]

    @property
    def max(self) -> torch.Tensor | None:
        """The exact largest ``|x|`` counted (float32, 0-dim), or None before any data."""
        return self._max

    @property
    def bin_width(self) -> float | None:
        """Width of a bin, or None while no non-zero value has been seen."""
        if self._counts is None or float(self._first_max) == 0:
            return None
        return float(self._first_max) / self._num_bins * 2.0 ** int(self._shift)

    def bin_edges(self) -> torch.Tensor | None:
        """The edges (float64) of the current bins on the histogram's device."""
        width = self.bin_width
        if width is None:
            return None
        edges = torch.arange(int(self._nb) + 1, dtype=torch.float64, device=self._counts.device)
        return edges * width

    @property
    def _calib_hist(self) -> torch.Tensor | None:
        """pytorch-quantization's name for the counts (read-only here)."""
        return self.counts

    @property
    def _calib_bin_edges(self) -> torch.Tensor | None:
        """pytorch-quantization's name for the edges, float32 as there (all 0 while only
        zeros were seen, where it has ``linspace(0, 0, n + 1)``)."""
        if self._counts is None:
            return None
        edges = self.bin_edges()
        if edges is None:
            return torch.zeros(int(self._nb) + 1, device=self._counts.device)
        return edges.float()

    def reset(self) -> None:
        self._counts: torch.Tensor | None = None
        self._nb: torch.Tensor | None = None           # bins in use (int64, 0-dim)
        self._first_max: torch.Tensor | None = None    # m0; 0 until a non-zero value
        self._scale: torch.Tensor | None = None        # fl32(num_bins / m0) * 2^-shift
        self._shift: torch.Tensor | None = None        # bins merged 2^shift to 1
        self._max: torch.Tensor | None = None

    def _init_state(self, device: torch.device, host_sized: bool | None = None) -> None:
        # CPU histograms hold exactly the bins in use (host_sized: sizes are read back,
        # free on a CPU); GPU ones the whole cap, so that growing never changes a shape and
        # a batch is counted without a host sync.
        self._host_sized = device.type == "cpu" if host_sized is None else host_sized
        size = self._num_bins if self._host_sized else self._max_bins
        self._counts = torch.zeros(size, dtype=torch.int64, device=device)
        self._nb = torch.full((), self._num_bins, dtype=torch.int64, device=device)
        self._first_max = torch.zeros((), dtype=torch.float32, device=device)
        self._scale = torch.zeros((), dtype=torch.float32, device=device)
        self._shift = torch.zeros((), dtype=torch.int64, device=device)
        self._max = torch.zeros((), dtype=torch.float32, device=device)

    def fix_range(self, first_max: float | torch.Tensor) -> None:
        """Fix the layout before any data, as a first batch with largest ``|x|`` equal to
        ``first_max`` would (nothing is counted). Distributed calibration fixes every rank's
        range to the same value so the histograms can be summed exactly."""
        value = torch.as_tensor(first_max, dtype=torch.float32).reshape(())
        if self._counts is not None and float(self._max) > 0:
            raise CalibrationError(f"{self.owner}: fix_range after data was collected")
        if not (math.isfinite(float(value)) and float(value) > 0):
            raise CalibrationError(f"{self.owner}: fix_range needs a positive finite value, "
                                   f"got {float(value)}")
        if self._counts is None:
            self._init_state(value.device)      # the device of a tensor argument
        self._set_first_max(value)

    def _set_first_max(self, m0: torch.Tensor) -> None:
        m0 = m0.to(self._counts.device, torch.float32)
        scale = torch.full_like(m0, float(self._num_bins)) / m0
        if self._counts.device.type == "cpu" and not bool(torch.isfinite(scale)):
            raise CalibrationError(f"{self.owner}: the first batch's largest |x| "
                                   f"({float(m0):g}) is too small to bin in float32")
        self._first_max, self._scale = m0, scale

    # ---------------------------------------------------------------- collect
    def collect(self, x: torch.Tensor) -> None:
        """Count ``|x|`` of one batch (no host sync on a GPU)."""
        x = x.detach()
        if x.numel() == 0:
            return
        if self._counts is None:
            self._init_state(x.device)
        elif self._counts.device != x.device:
            raise CalibrationError(f"{self.owner}: histogram lives on {self._counts.device} "
                                   f"but a batch came on {x.device}")
        flat = x.reshape(-1)
        if flat.dtype != torch.float32:
            flat = flat.float()     # pytorch-quantization bins x.float() as well
        if self._host_sized:
            self._collect_cpu(flat, x)
        else:
            self._collect_device(flat)

    def _collect_cpu(self, flat: torch.Tensor, x: torch.Tensor) -> None:
        lo, hi = (float(v) for v in torch.aminmax(flat))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            if x.is_floating_point() and bool(torch.isfinite(x).all()):
                raise CalibrationError(f"{self.owner}: calibration data exceeds the float32 "
                                       f"range (largest |x| {float(x.abs().max()):g})")
            self._check_finite(x)                    # raises, naming the bad value
        if self._unsigned and lo < 0:
            raise CalibrationError(f"{self.owner}: unsigned quantizer received negative "
                                   f"values (min {lo:g})")
        zeros = flat.numel() - int(torch.count_nonzero(flat)) if self._skip_zeros else 0
        if zeros == flat.numel():
            return                                   # skip_zeros and nothing else
        batch_max = max(hi, -lo)
        if batch_max == 0:
            self._counts[0] += flat.numel()
            return
        if float(self._first_max) == 0:
            self._set_first_max(torch.tensor(batch_max, dtype=torch.float32))
        elif batch_max > float(self._first_max):
            scaled = float(torch.tensor(batch_max, dtype=torch.float32) * self._scale)
            if not math.isfinite(scaled):
                raise CalibrationError(
                    f"{self.owner}: a batch's largest |x| ({batch_max:g}) is beyond float32 "
                    f"range in bins of the first batch ({float(self._first_max):g} / "
                    f"{self._num_bins})")
            need = math.ceil(scaled)
            if need > int(self._nb):
                self._grow_cpu(need)
        self._max = torch.maximum(self._max, torch.tensor(batch_max, dtype=torch.float32))
        nb = int(self._nb)
        self._counts += count_cpu(flat, float(self._scale), nb)
        if zeros:
            self._counts[0] -= zeros

    def _grow_cpu(self, need: int) -> None:
        """Make room for ``need`` bins, merging neighbours past ``max_bins``."""
        shift = 0
        while -(-need // (1 << shift)) > self._max_bins:
            shift += 1
        nb = -(-need // (1 << shift))
        self._counts = _merged(self._counts, shift, nb)
        if shift:
            self._scale = self._scale * 2.0 ** -shift     # exact: a power of two
            self._shift = self._shift + shift
        self._nb = torch.tensor(nb)

    def _collect_device(self, flat: torch.Tensor) -> None:
        lo, hi = torch.aminmax(flat)
        batch_max = torch.maximum(hi, -lo).float()       # NaN propagates: compute_amax raises
        if self._skip_zeros:
            zeros = flat.numel() - torch.count_nonzero(flat)
        fresh = (self._first_max == 0) & (batch_max > 0)
        scale_new = torch.full_like(batch_max, float(self._num_bins)) / batch_max
        self._first_max = torch.where(fresh, batch_max, self._first_max)
        self._scale = torch.where(fresh, scale_new, self._scale)
        scaled_max = torch.nan_to_num(batch_max * self._scale, nan=0.0, posinf=2.0 ** 62)
        need = torch.ceil(scaled_max.double()).clamp_(max=2.0 ** 62).to(torch.int64)
        grow = ~fresh & (batch_max > self._first_max) & (need > self._nb)
        wanted = torch.where(grow, need, self._nb)
        # smallest shift with ceil(wanted / 2^shift) <= max_bins: bit length of
        # (wanted - 1) // max_bins
        over = torch.div(wanted - 1, self._max_bins, rounding_mode="floor")
        shift = torch.frexp(over.double()).exponent.to(torch.int64)
        ids = torch.arange(self._counts.numel(), device=flat.device)
        merged = torch.zeros_like(self._counts)
        merged.scatter_add_(0, torch.bitwise_right_shift(ids, shift), self._counts)
        self._counts = merged
        self._scale = torch.ldexp(self._scale, -shift.to(torch.float32))
        self._shift = self._shift + shift
        self._nb = torch.bitwise_right_shift(wanted - 1, shift) + 1
        self._max = torch.maximum(self._max, batch_max)
        count_device(self._counts, flat, self._scale, self._nb)
        if self._skip_zeros:
            self._counts[0] -= zeros

    # ------------------------------------------------------------ distributed
    def all_reduce(self, group=None) -> None:
        """Merge the histograms of all ranks (every rank calls it; all end identical).

        Ranks must share the layout: the same first-batch range (``fix_range``), or no
        non-zero value yet. Different growth is reconciled exactly (bins merged to the
        coarsest rank's width, then appended)."""
        import torch.distributed as dist

        if self._counts is None:
            device = torch.device("cpu")
            if dist.get_backend(group) == "nccl":
                device = torch.device("cuda", torch.cuda.current_device())
            self._init_state(device)
            seen = torch.zeros((), dtype=torch.int64, device=device)
        else:
            seen = torch.ones((), dtype=torch.int64, device=self._counts.device)
        device = self._counts.device
        m0 = self._first_max.clone()
        hi, lo = m0.clone(), torch.where(m0 > 0, m0, torch.full_like(m0, math.inf))
        dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        if float(hi) > 0 and float(hi) != float(lo):
            raise CalibrationError(
                f"{self.owner}: ranks fixed different histogram ranges ({float(lo):g} and "
                f"{float(hi):g}), which cannot be summed exactly; fix one range on every rank "
                "first (HistogramCalibrator.fix_range; sensitivity.calibrate does it)")
        if float(hi) > 0 and float(m0) == 0:
            self._set_first_max(hi)      # zeros alone: they stay in bin 0 at any range
        shift = self._shift.clone()
        dist.all_reduce(shift, op=dist.ReduceOp.MAX, group=group)
        self._merge_to(int(shift))
        nb = self._nb.clone()
        dist.all_reduce(nb, op=dist.ReduceOp.MAX, group=group)
        if self._host_sized:
            self._counts = torch.nn.functional.pad(self._counts,
                                                   (0, int(nb) - self._counts.numel()))
        self._nb = nb.to(device)
        dist.all_reduce(self._counts, op=dist.ReduceOp.SUM, group=group)
        dist.all_reduce(self._max, op=dist.ReduceOp.MAX, group=group)
        if int(seen) == 0:
            self.reset()

    def _merge_to(self, shift: int) -> None:
        step = shift - int(self._shift)
        if step <= 0:
            return
        size, nb = self._counts.numel(), int(self._nb)
        merged = -(-size // (1 << step))
        self._counts = _merged(self._counts, step, merged if self._host_sized else size)
        self._scale = self._scale * 2.0 ** -step
        self._shift = self._shift + step
        self._nb = torch.full_like(self._nb, -(-nb // (1 << step)))

    # ----------------------------------------------------------------- amax
    def compute_amax(self, method: str = "entropy", *, percentile: float | None = None,
                     start_bin: int | None = None, stride: int | None = None
                     ) -> torch.Tensor | None:
        """amax (0-dim float32 on the histogram's device), or None if nothing was collected.

        ``method``: 'entropy' or 'mse' (``start_bin`` default 128, ``stride`` default 1),
        'percentile' (``percentile`` default 99.99) or 'max'. A keyword the method does
        not use is an error."""
        return compute_amaxes([self], method, percentile=percentile, start_bin=start_bin,
                              stride=stride)[0]

    def __repr__(self) -> str:
        sign = ", unsigned" if self._unsigned else ""
        zeros = ", skip_zeros" if self._skip_zeros else ""
        return (f"HistogramCalibrator(bits={self._num_bits}{sign}, bins={self._num_bins}"
                f"{zeros})")


def _merged(counts: torch.Tensor, shift: int, size: int) -> torch.Tensor:
    """``counts`` with every ``2^shift`` neighbours summed into one bin, in ``size`` bins."""
    out = torch.zeros(size, dtype=counts.dtype, device=counts.device)
    ids = torch.arange(counts.numel(), device=counts.device)
    return out.index_add_(0, torch.bitwise_right_shift(ids, shift), counts)


_DEFAULTS = {"percentile": 99.99, "start_bin": 128, "stride": 1}


def compute_amaxes(calibrators: Sequence[HistogramCalibrator], method: str = "entropy", *,
                   percentile: float | None = None, start_bin: int | None = None,
                   stride: int | None = None) -> list[torch.Tensor | None]:
    """``compute_amax(method)`` of many histogram calibrators with one search per group of
    calibrators sharing bits, signedness and device (usually one group for a model).

    Returns one entry per calibrator: the amax, or None for a calibrator without data.
    Errors name the calibrator's owner (its quantizer).
    """
    if method not in HistogramCalibrator.amax_methods:
        owner = calibrators[0].owner if len(calibrators) == 1 else "compute_amaxes"
        raise UnknownMethodError(f"{owner}: unknown amax method {method!r}; valid methods: "
                                 f"{', '.join(HistogramCalibrator.amax_methods)}")
    given = {"percentile": percentile, "start_bin": start_bin, "stride": stride}
    accepted = () if method == "max" else SEARCHES[method][2]
    wrong = [k for k, v in given.items() if v is not None and k not in accepted]
    if wrong:
        owner = calibrators[0].owner if len(calibrators) == 1 else "compute_amaxes"
        raise CalibrationError(f"{owner}: {', '.join(wrong)} does not apply to the "
                               f"{method!r} amax method")
    options = {k: (_DEFAULTS[k] if given[k] is None else given[k])
               for k in accepted if k in _DEFAULTS}
    results: list[torch.Tensor | None] = [None] * len(calibrators)
    groups: dict[tuple, list[int]] = {}
    for k, calib in enumerate(calibrators):
        if calib.counts is None:
            continue
        if not bool(torch.isfinite(calib.max)):
            raise CalibrationError(f"{calib.owner}: calibration data contained NaN or Inf "
                                   f"(largest |x| seen: {float(calib.max)})")
        if method == "max" or float(calib.max) == 0:
            results[k] = calib.max.clone()
            continue
        if calib.edge_layout:            # numpy layout: amax read off its own edges
            results[k] = calib.amax_on_edges(method, **options)
            continue
        key = (calib.num_bits, calib.unsigned, calib.counts.device)
        groups.setdefault(key, []).append(k)
    for (num_bits, unsigned, _), members in groups.items():
        chosen = [calibrators[k] for k in members]
        extra = {"num_bits": num_bits, "unsigned": unsigned} if method != "percentile" else {}
        amax = search_amax(method, [c.counts for c in chosen], [c.bin_width for c in chosen],
                           names=[c.owner for c in chosen], **extra, **options)
        for k, value in zip(members, amax, strict=True):
            results[k] = value.clone()
    return results
