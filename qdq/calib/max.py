"""``MaxCalibrator``: amax is the running maximum of |x| (per tensor or per channel)."""

from __future__ import annotations

import weakref

import torch

from qdq.calib.base import AmaxShapeError, CalibrationError, Calibrator, reduce_axes

__all__ = ["MaxCalibrator"]


class MaxCalibrator(Calibrator):
    """Running max of ``|x|`` over all collected batches.

    With ``axis`` set, one max per index along those axes; the result keeps the reduced
    dims as size 1 so it broadcasts against the tensor (e.g. ``[C, 1, 1, 1]``).
    ``track_amax`` keeps each batch's amax in ``amaxs`` for inspection.

    A weight reaches its quantizer as the same tensor, unchanged, in every calibration
    batch; such a repeat (same tensor object, same version counter, so the same values)
    is not reduced again, which saves a pass over every weight per batch.
    """

    #: amax methods of ``compute_amax``.
    amax_methods = ("max",)

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False,
                 track_amax: bool = False) -> None:
        super().__init__(num_bits, axis, unsigned)
        self._track_amax = track_amax
        self._calib_amax: torch.Tensor | None = None
        self._amaxs: list[torch.Tensor] = []
        self._last: tuple[weakref.ref, int] | None = None

    @property
    def amaxs(self) -> list[torch.Tensor]:
        return self._amaxs

    def collect(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        version = _version(x)
        if self._last is not None and self._last[0]() is x and self._last[1] == version \
                and version is not None:
            if self._track_amax:
                self._amaxs.append(self._amaxs[-1])
            return
        source = x
        x = x.detach()
        kept, reduced = reduce_axes(x.dim(), self._axis, self.owner)
        lo, hi = _min_max(x, kept, reduced)
        if x.device.type == "cpu":
            # min/max carry NaN and Inf along: no separate pass over x to check them.
            if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
                self._check_finite(x)
            if self._unsigned and bool((lo < 0).any()):
                raise CalibrationError(
                    f"{self.owner}: unsigned quantizer received negative values "
                    f"(min {lo.min().item():g})"
                )
        # maximum() propagates NaN, so a NaN seen on the GPU surfaces at compute_amax.
        batch_amax = torch.maximum(hi, -lo).float()
        if self._axis is None:
            batch_amax = batch_amax.reshape(())
        if self._calib_amax is None:
            self._calib_amax = batch_amax.clone()
        else:
            if self._calib_amax.shape != batch_amax.shape:
                raise AmaxShapeError(
                    f"{self.owner}: per-channel amax shape changed between batches "
                    f"({tuple(self._calib_amax.shape)} -> {tuple(batch_amax.shape)})"
                )
            self._calib_amax = torch.maximum(self._calib_amax, batch_amax)
        if self._track_amax:
            self._amaxs.append(batch_amax.cpu())
        self._last = (weakref.ref(source), version)

    def reset(self) -> None:
        self._calib_amax = None
        self._amaxs = []
        self._last = None

    def compute_amax(self) -> torch.Tensor | None:
        amax = self._calib_amax
        if amax is not None and not bool(torch.isfinite(amax).all()):
            raise CalibrationError(f"{self.owner}: calibration data contained NaN or Inf")
        return amax

    def all_reduce(self, group=None) -> None:
        import torch.distributed as dist

        if self._calib_amax is None:
            raise CalibrationError(f"{self.owner}: nothing collected on this rank to reduce")
        dist.all_reduce(self._calib_amax, op=dist.ReduceOp.MAX, group=group)


def _version(x: torch.Tensor) -> int | None:
    """The tensor's version counter (bumped by every in-place change), or None for an
    inference-mode tensor, which has none."""
    try:
        return x._version
    except RuntimeError:
        return None


def _min_max(x: torch.Tensor, kept: tuple[int, ...], reduced: tuple[int, ...]
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max over ``reduced`` in one pass (``aminmax``), keeping reduced dims as 1."""
    if not reduced:
        return x, x
    if not kept:
        lo, hi = torch.aminmax(x)
        shape = [1] * x.dim()
    else:
        # Kept axes first, the rest flattened: a view for the usual axis 0, a copy otherwise.
        rows = x.permute(*kept, *reduced).reshape(-1, _numel(x, reduced))
        lo, hi = torch.aminmax(rows, dim=1)
        shape = [x.shape[d] if d in kept else 1 for d in range(x.dim())]
    return lo.reshape(shape), hi.reshape(shape)


def _numel(x: torch.Tensor, dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n
