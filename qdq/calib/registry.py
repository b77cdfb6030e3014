"""Calibrators and amax methods by name: the one table every other list of names uses.

=============  ===================  ===========================================
calib_method   calibrator           amax methods (default first)
=============  ===================  ===========================================
``max``        ``MaxCalibrator``    ``max``
``histogram``  ``HistogramCalib…``  ``entropy``, ``percentile``, ``mse``, ``max``
=============  ===================  ===========================================

A *choice* names one way to calibrate activations in a comparison: an amax method of the
histogram calibrator, with the percentile written into the name (``percentile-99.99``).

Example::

    >>> build_calibrator(QuantDescriptor(calib_method="histogram"), "fc._input_quantizer")
    HistogramCalibrator(bits=8, bins=2048)
    >>> parse_choice("percentile-99.9")
    ('percentile', {'percentile': 99.9})
    >>> choice_name("percentile", percentile=99.9)
    'percentile-99.9'
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qdq.calib.base import CalibrationError, Calibrator, PerTensorOnlyError
from qdq.calib.histogram import _DEFAULTS as _HISTOGRAM_DEFAULTS
from qdq.calib.histogram import HistogramCalibrator
from qdq.calib.max import MaxCalibrator

if TYPE_CHECKING:
    from qdq.descriptor import QuantDescriptor

__all__ = ["CALIBRATORS", "AMAX_METHODS", "DEFAULT_CHOICES", "build_calibrator",
           "calib_method_of", "check_amax_method", "parse_choice", "choice_name"]

#: calib_method -> calibrator class.
CALIBRATORS: dict[str, type[Calibrator]] = {"max": MaxCalibrator, "histogram": HistogramCalibrator}
#: calib_method -> the amax methods its calibrator computes, the default first.
AMAX_METHODS: dict[str, tuple[str, ...]] = {name: cls.amax_methods
                                            for name, cls in CALIBRATORS.items()}
#: Choices a calibrator comparison runs unless told otherwise.
DEFAULT_CHOICES = ("max", "entropy", "percentile-99.9", "percentile-99.99",
                   "percentile-99.999", "mse")


def build_calibrator(desc: QuantDescriptor, owner: str = "quantizer") -> Calibrator:
    """The calibrator a descriptor asks for, labelled with its quantizer's name."""
    if desc.calib_method not in CALIBRATORS:
        raise CalibrationError(f"{owner}: calib_method {desc.calib_method!r} is unknown; "
                               f"choose one of {', '.join(CALIBRATORS)}")
    if desc.calib_method == "histogram":
        if desc.axis is not None:
            raise PerTensorOnlyError(f"{owner}: the histogram calibrator is per tensor; got "
                                     f"axis={desc.axis} (use calib_method='max' per channel)")
        calib: Calibrator = HistogramCalibrator(desc.num_bits, None, desc.unsigned,
                                                num_bins=desc.num_bins,
                                                skip_zeros=desc.skip_zeros)
    else:
        calib = MaxCalibrator(desc.num_bits, desc.axis, desc.unsigned)
    calib.owner = owner
    return calib


def calib_method_of(calibrator: Calibrator) -> str:
    """The calib_method name of a calibrator instance (a subclass counts as its registered
    parent: the numpy-layout histogram is a ``histogram``)."""
    for name, cls in CALIBRATORS.items():
        if isinstance(calibrator, cls):
            return name
    raise CalibrationError(f"{calibrator.owner}: {type(calibrator).__name__} is not a "
                           f"registered calibrator ({', '.join(CALIBRATORS)})")


def check_amax_method(calib_method: str, amax_method: str | None) -> str:
    """``amax_method`` (or the calibrator's default) after checking that the calibrator
    named ``calib_method`` computes it."""
    if calib_method not in CALIBRATORS:
        raise CalibrationError(f"calibration method {calib_method!r} is unknown; choose one "
                               f"of {', '.join(CALIBRATORS)}")
    allowed = AMAX_METHODS[calib_method]
    if amax_method is None:
        return allowed[0]
    if amax_method not in allowed:
        raise CalibrationError(f"amax method {amax_method!r} does not exist for the "
                               f"{calib_method} calibrator; choose one of {list(allowed)}")
    return amax_method


def parse_choice(name: str) -> tuple[str, dict[str, Any]]:
    """``"percentile-99.9"`` -> ``("percentile", {"percentile": 99.9})``; the other
    histogram amax methods stand for themselves."""
    plain = [m for m in AMAX_METHODS["histogram"] if m != "percentile"]
    if name in plain:
        return name, {}
    if isinstance(name, str) and name.startswith("percentile-"):
        try:
            p = float(name.split("-", 1)[1])
        except ValueError:
            p = float("nan")
        if 0 < p <= 100:
            return "percentile", {"percentile": p}
    raise CalibrationError(f"calibration method {name!r} is unknown; use one of "
                           f"{plain} or percentile-P with 0 < P <= 100")


def choice_name(amax_method: str, **kwargs: Any) -> str:
    """The choice that names an amax search with its settings, :func:`parse_choice`'s
    inverse: ``("percentile", percentile=99.9)`` -> ``"percentile-99.9"`` (the default
    percentile when none is given); every other method stands for itself."""
    if amax_method == "percentile":
        p = kwargs.get("percentile")
        return f"percentile-{_HISTOGRAM_DEFAULTS['percentile'] if p is None else p:g}"
    return amax_method
