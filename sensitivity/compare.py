"""``compare_calibrators``: which amax search suits this model, measured on its metric.

Histograms of every activation are collected once; each method then only recomputes
amax from them (weights keep their per-channel max) and the model is evaluated. The
best method's amax stays loaded, so the model is ready for a sweep or export.

Methods by name (``qdq.calib.parse_choice``): ``max``, ``entropy``, ``mse`` and
``percentile-P`` for any P in (0, 100], e.g. ``percentile-99.99``. The activation
quantizers collect histograms for the comparison whatever their descriptors say, and get
their own descriptors and calibrators back afterwards.

Example::

    table = sensitivity.compare_calibrators(model, calib_loader, eval_fn)
    print(table)          # one row per method, the best marked
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qdq.calib import DEFAULT_CHOICES, CalibrationError, parse_choice
from qdq.fileio import atomic_write
from qdq.provenance import provenance, provenance_line
from qdq.replace import disable_quantization
from sensitivity.batches import ForwardFn, model_device
from sensitivity.calibrate import collected_statistics, load_amax
from sensitivity.errors import SensitivityError
from sensitivity.sweep import measure

__all__ = ["compare_calibrators", "CalibratorComparison", "MethodRow", "DEFAULT_METHODS",
           "parse_method"]

#: What the comparison runs unless told otherwise (``qdq.calib.DEFAULT_CHOICES``).
DEFAULT_METHODS = DEFAULT_CHOICES


def parse_method(name: str) -> tuple[str, dict[str, float]]:
    """``"percentile-99.9"`` -> ``("percentile", {"percentile": 99.9})``."""
    try:
        return parse_choice(name)
    except CalibrationError as err:
        raise SensitivityError(str(err)) from None


@dataclass
class MethodRow:
    method: str
    metric: float | None
    error: str | None = None
    seconds: float = 0.0


@dataclass
class CalibratorComparison:
    """One row per method; ``best`` is loaded in the model."""

    rows: list[MethodRow]
    best: str
    fp32: float | None
    metric_name: str = "metric"
    higher_is_better: bool = True
    collect_seconds: float = 0.0
    amax: dict[str, dict[str, list[float]]] = field(default_factory=dict, repr=False)
    #: :func:`qdq.provenance.provenance` of the comparison (filled when written if missing)
    provenance: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("amax")
        return d

    def as_rows(self) -> list[dict[str, Any]]:
        """One plain dict per method, in the order run."""
        return [asdict(r) for r in self.rows]

    def _digits(self) -> int:
        """2 decimals for metrics on a 0-100 scale (accuracy in percent), 4 for 0-1 ones
        (agreement, cosine), where the differences that matter are in the third."""
        values = [abs(v) for v in [self.fp32, *(r.metric for r in self.rows)]
                  if v is not None]
        return 2 if values and max(values) > 1.5 else 4

    def markdown(self) -> str:
        d = self._digits()
        lines = [f"# Calibrator comparison ({self.metric_name})", "",
                 f"Histograms collected once in {self.collect_seconds:.1f} s; FP32 "
                 f"{'-' if self.fp32 is None else f'{self.fp32:.{d}f}'}.", "",
                 f"| method | {self.metric_name} | amax + eval s | |", "|---|---:|---:|---|"]
        for r in self.rows:
            value = f"{r.metric:.{d}f}" if r.metric is not None else f"failed: {r.error}"
            mark = "best (loaded)" if r.method == self.best else ""
            lines.append(f"| {r.method} | {value} | {r.seconds:.2f} | {mark} |")
        return "\n".join(lines) + "\n"

    __str__ = markdown

    def write(self, folder: str | Path) -> Path:
        """calibrators.json and calibrators.md, each saying where it came from."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.provenance is None:
            self.provenance = provenance()
        text = json.dumps(self.to_dict(), indent=1) + "\n"
        atomic_write(folder / "calibrators.json", text)
        md = self.markdown() + "\n" + provenance_line(self.provenance) + "\n"
        atomic_write(folder / "calibrators.md", md)
        return folder


def compare_calibrators(model: nn.Module, calib_data: Iterable,
                        eval_fn: Callable[[nn.Module], float],
                        methods: Sequence[str] = DEFAULT_METHODS,
                        num_batches: int | None = None,
                        device: torch.device | str | None = None, progress: bool = True,
                        forward_fn: ForwardFn | None = None, higher_is_better: bool = True,
                        metric_name: str = "metric", group=None) -> CalibratorComparison:
    """Collect histograms once, then load and evaluate each method's amax.

    Activation quantizers get histogram calibrators for the comparison; per-channel
    weight quantizers use max. A method whose amax search or evaluation fails gets a
    failed row. Raises if every method fails.
    """
    if not methods:
        raise SensitivityError("compare_calibrators needs at least one method")
    parsed = [(m, *parse_method(m)) for m in methods]
    start = time.perf_counter()
    rows: list[MethodRow] = []
    snapshots: dict[str, dict[str, torch.Tensor]] = {}
    with collected_statistics(model, calib_data, num_batches, "histogram", device, progress,
                              forward_fn, group) as stats:
        named = stats.named
        collect_seconds = time.perf_counter() - start
        with disable_quantization(model):
            fp32, _, _ = measure(eval_fn, model)
        for name, amax_method, kwargs in parsed:
            t0 = time.perf_counter()
            try:
                load_amax(named, amax_method, **kwargs)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Exception as err:  # noqa: BLE001 - one failing search must not end the run
                rows.append(MethodRow(name, None, f"{type(err).__name__}: {err}",
                                      time.perf_counter() - t0))
                continue
            snapshots[name] = {n: (q.amax.detach().clone(), q.calibrated_by)
                               for n, q in named if q.amax is not None}
            metric, error, _ = measure(eval_fn, model)
            rows.append(MethodRow(name, metric, error, time.perf_counter() - t0))
    good = [r for r in rows if r.metric is not None]
    if not good:
        raise SensitivityError("every calibration method failed: "
                               + "; ".join(f"{r.method}: {r.error}" for r in rows))
    pick = max if higher_is_better else min
    best = pick(good, key=lambda r: r.metric).method
    quantizers = dict(named)
    for n, (amax, found_by) in snapshots[best].items():
        quantizers[n].amax = amax
        quantizers[n].calibrated_by = found_by
    return CalibratorComparison(
        rows=rows, best=best, fp32=fp32, metric_name=metric_name,
        higher_is_better=higher_is_better, collect_seconds=collect_seconds,
        amax={m: {n: a.flatten().tolist() for n, (a, _) in snap.items()}
              for m, snap in snapshots.items()},
        provenance=provenance(model_device(model)),
    )
