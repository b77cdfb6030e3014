"""Calibrators: collect statistics of a tensor over batches and turn them into amax.

``registry`` names them (``CALIBRATORS``, ``AMAX_METHODS``, ``build_calibrator``);
``amax_search`` holds the histogram searches, batched over many histograms;
``calibrate_weights`` calibrates every weight quantizer of a model without data.
"""

from qdq.calib.base import (
    AmaxShapeError,
    CalibrationError,
    Calibrator,
    PerTensorOnlyError,
    UnknownMethodError,
)
from qdq.calib.histogram import HistogramCalibrator, compute_amaxes
from qdq.calib.max import MaxCalibrator
from qdq.calib.numpy_layout import NumpyHistogramCalibrator
from qdq.calib.registry import (
    AMAX_METHODS,
    CALIBRATORS,
    DEFAULT_CHOICES,
    build_calibrator,
    calib_method_of,
    check_amax_method,
    choice_name,
    parse_choice,
)
from qdq.calib.weights import WEIGHT_METHODS, calibrate_weights

__all__ = ["Calibrator", "CalibrationError", "AmaxShapeError", "UnknownMethodError",
           "PerTensorOnlyError", "MaxCalibrator", "HistogramCalibrator",
           "NumpyHistogramCalibrator", "compute_amaxes", "calibrate_weights",
           "WEIGHT_METHODS", "CALIBRATORS", "AMAX_METHODS", "DEFAULT_CHOICES",
           "build_calibrator", "calib_method_of", "check_amax_method", "parse_choice",
           "choice_name"]
