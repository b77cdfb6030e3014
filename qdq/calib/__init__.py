"""Calibrators: collect statistics of a tensor over batches and turn them into amax.

``registry`` names them (``CALIBRATORS``, ``AMAX_METHODS``, ``build_calibrator``);
``amax_search`` holds the histogram searches, batched over many histograms.
"""

from qdq.calib.base import CalibrationError, Calibrator
from qdq.calib.histogram import HistogramCalibrator, compute_amaxes
from qdq.calib.max import MaxCalibrator
from qdq.calib.registry import (
    AMAX_METHODS,
    CALIBRATORS,
    DEFAULT_CHOICES,
    build_calibrator,
    calib_method_of,
    check_amax_method,
    parse_choice,
)

__all__ = ["Calibrator", "CalibrationError", "MaxCalibrator", "HistogramCalibrator",
           "compute_amaxes", "CALIBRATORS", "AMAX_METHODS", "DEFAULT_CHOICES",
           "build_calibrator", "calib_method_of", "check_amax_method", "parse_choice"]
