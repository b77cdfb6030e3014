"""The calibrator interface: collect statistics batch by batch, then compute amax.

A calibrator belongs to one ``TensorQuantizer``; the quantizer feeds it every tensor it
sees while calibration is on and asks it for amax once at the end
(``TensorQuantizer.load_calib_amax``). Statistics live in tensors on the data's device
and are merged across processes by ``all_reduce`` so every rank ends with the same amax.
"""

from __future__ import annotations

import abc

import torch

__all__ = ["Calibrator", "CalibrationError", "AmaxShapeError", "UnknownMethodError",
           "PerTensorOnlyError", "reduce_axes"]


class CalibrationError(ValueError):
    """Bad data or a bad request reached a calibrator; the message names the quantizer."""


# Where pytorch-quantization raised another built-in, our error also derives from that
# one, so a script's ``except RuntimeError`` (or TypeError, NotImplementedError) still
# catches what it caught there, and ``except CalibrationError`` catches them all.


class AmaxShapeError(CalibrationError, RuntimeError):
    """A per-channel statistic changed shape between batches (RuntimeError there)."""


class UnknownMethodError(CalibrationError, TypeError):
    """An amax method no calibrator here computes (TypeError there)."""


class PerTensorOnlyError(CalibrationError, NotImplementedError):
    """A per-channel axis given to a per-tensor calibrator (NotImplementedError there)."""


def reduce_axes(ndim: int, axis, owner: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Split dims into (kept axes, reduced axes) for per-channel statistics."""
    if axis is None:
        return (), tuple(range(ndim))
    axes = axis if isinstance(axis, (tuple, list)) else (axis,)
    kept = []
    for a in axes:
        if not -ndim <= a < ndim:
            raise CalibrationError(
                f"{owner}: axis {a} is outside a tensor of {ndim} dimensions"
            )
        kept.append(a % ndim)
    kept_t = tuple(sorted(set(kept)))
    return kept_t, tuple(d for d in range(ndim) if d not in kept_t)


class Calibrator(abc.ABC):
    """Base class. Subclasses implement ``collect``, ``reset``, ``compute_amax`` and
    ``all_reduce``. ``owner`` is the quantizer's name, used in every error message."""

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False) -> None:
        self._num_bits = num_bits
        self._axis = axis
        self._unsigned = unsigned
        self.owner = "quantizer"

    @property
    def num_bits(self) -> int:
        return self._num_bits

    @property
    def axis(self):
        return self._axis

    @property
    def unsigned(self) -> bool:
        return self._unsigned

    @abc.abstractmethod
    def collect(self, x: torch.Tensor) -> None:
        """Accumulate statistics of one batch."""

    @abc.abstractmethod
    def reset(self) -> None:
        """Forget everything collected."""

    @abc.abstractmethod
    def compute_amax(self, *args, **kwargs) -> torch.Tensor | None:
        """amax from what was collected, or None if nothing was."""

    @abc.abstractmethod
    def all_reduce(self, group=None) -> None:
        """Merge statistics across ``torch.distributed`` ranks (every rank calls it)."""

    def _check_finite(self, x: torch.Tensor) -> None:
        """Raise on NaN/Inf. Only done eagerly on CPU: on a GPU the check would force a
        host sync per batch, so there the reduced statistic carries NaN/Inf forward and
        ``compute_amax`` reports it."""
        if x.device.type != "cpu" or not x.is_floating_point() or x.numel() == 0:
            return
        # min and max propagate NaN and show Inf: one pass and no temporary, where
        # isfinite(x).all() makes several passes and a mask as large as x.
        lo, hi = torch.aminmax(x)
        if not (bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))):
            bad = x[~torch.isfinite(x)].flatten()[0].item()
            raise CalibrationError(
                f"{self.owner}: calibration data contains a non-finite value ({bad})"
            )

    def __repr__(self) -> str:
        axis = "" if self._axis is None else f", axis={self._axis}"
        sign = ", unsigned" if self._unsigned else ""
        return f"{type(self).__name__}(bits={self._num_bits}{axis}{sign})"
