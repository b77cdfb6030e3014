"""Calibrators: collect statistics of a tensor over batches and turn them into amax."""

from qdq.calib.base import CalibrationError, Calibrator
from qdq.calib.histogram import HistogramCalibrator
from qdq.calib.max import MaxCalibrator

__all__ = ["Calibrator", "CalibrationError", "MaxCalibrator", "HistogramCalibrator"]
