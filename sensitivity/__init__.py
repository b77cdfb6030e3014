"""sensitivity: decide how to quantize a model, from measurements.

- :func:`calibrate` — collect statistics over batches, give every quantizer its amax.
- :func:`compare_calibrators` — max / entropy / percentile / mse, each evaluated.
- :func:`sweep` — per-layer sensitivity (leave-one-out or one-at-a-time), resumable,
  sharded over ``torch.distributed`` ranks; returns a :class:`SensitivityReport`.
- :func:`proxy_ranking` — per-layer SQNR in one pass, no labels needed.
- :func:`partial_quantize` — the fewest layers in float that meet a measured target.
- :func:`smoothquant` — per-layer SmoothQuant (activation outliers moved into weights).

Example::

    import qdq, sensitivity
    from qdqapp.evaluate import top1_accuracy

    qdq.replace_modules(model)
    sensitivity.calibrate(model, calib_loader, num_batches=32)
    report = sensitivity.sweep(model, lambda m: top1_accuracy(m, test_loader))
    sensitivity.partial_quantize(model, report, lambda m: top1_accuracy(m, test_loader),
                                 max_drop=0.5)
    report.write("runs/sensitivity")
"""

from sensitivity.calibrate import CalibrationSummary, calibrate
from sensitivity.compare import CalibratorComparison, compare_calibrators
from sensitivity.errors import SensitivityError
from sensitivity.layers import Layer, disable_layers, find_layers
from sensitivity.partial import PartialResult, partial_quantize
from sensitivity.proxy import ProxyReport, proxy_ranking, spearman
from sensitivity.report import LayerRow, SensitivityReport
from sensitivity.smoothquant import SmoothQuantReport, smoothquant
from sensitivity.sweep import sweep

#: Read a written report back (``sensitivity.json`` or its folder).
load_report = SensitivityReport.load

__all__ = [
    "calibrate", "CalibrationSummary", "compare_calibrators", "CalibratorComparison",
    "SensitivityError", "Layer", "find_layers", "disable_layers", "load_report",
    "partial_quantize", "PartialResult",
    "proxy_ranking", "ProxyReport", "spearman", "sweep", "SensitivityReport", "LayerRow",
    "smoothquant", "SmoothQuantReport",
]
