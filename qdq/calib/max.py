"""``MaxCalibrator``: amax is the running maximum of |x| (per tensor or per channel)."""

from __future__ import annotations

import torch

from qdq.calib.base import CalibrationError, Calibrator, reduce_axes

__all__ = ["MaxCalibrator"]


class MaxCalibrator(Calibrator):
    """Running max of ``|x|`` over all collected batches.

    With ``axis`` set, one max per index along those axes; the result keeps the reduced
    dims as size 1 so it broadcasts against the tensor (e.g. ``[C, 1, 1, 1]``).
    ``track_amax`` keeps each batch's amax in ``amaxs`` for inspection.
    """

    def __init__(self, num_bits: int = 8, axis=None, unsigned: bool = False,
                 track_amax: bool = False) -> None:
        super().__init__(num_bits, axis, unsigned)
        self._track_amax = track_amax
        self._calib_amax: torch.Tensor | None = None
        self._amaxs: list[torch.Tensor] = []

    @property
    def amaxs(self) -> list[torch.Tensor]:
        return self._amaxs

    def collect(self, x: torch.Tensor) -> None:
        x = x.detach()
        if x.numel() == 0:
            return
        self._check_finite(x)
        if self._unsigned and x.device.type == "cpu" and bool((x < 0).any()):
            raise CalibrationError(
                f"{self.owner}: unsigned quantizer received negative values "
                f"(min {x.min().item():g})"
            )
        _, reduced = reduce_axes(x.dim(), self._axis, self.owner)
        xa = x.float().abs()
        batch_amax = torch.amax(xa, dim=reduced, keepdim=True) if reduced else xa
        if self._axis is None:
            batch_amax = batch_amax.reshape(())
        if self._calib_amax is None:
            self._calib_amax = batch_amax.clone()
        else:
            if self._calib_amax.shape != batch_amax.shape:
                raise CalibrationError(
                    f"{self.owner}: per-channel amax shape changed between batches "
                    f"({tuple(self._calib_amax.shape)} -> {tuple(batch_amax.shape)})"
                )
            # maximum() propagates NaN, so a NaN seen on the GPU surfaces at compute_amax.
            self._calib_amax = torch.maximum(self._calib_amax, batch_amax)
        if self._track_amax:
            self._amaxs.append(batch_amax.cpu())

    def reset(self) -> None:
        self._calib_amax = None
        self._amaxs = []

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
