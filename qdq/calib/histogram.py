"""Placeholder: replaced by the histogram calibrator."""

from qdq.calib.base import Calibrator


class HistogramCalibrator(Calibrator):  # pragma: no cover - being written
    def __init__(self, num_bits=8, axis=None, unsigned=False, num_bins=2048, skip_zeros=False):
        super().__init__(num_bits, axis, unsigned)
        raise NotImplementedError("HistogramCalibrator is not written yet")

    def collect(self, x): ...
    def reset(self): ...
    def compute_amax(self, method="entropy", **kw): ...
    def all_reduce(self, group=None): ...
