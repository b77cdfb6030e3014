"""``partial_quantize``: keep the fewest, most sensitive layers in float that meet a target.

The report's ranking orders the candidates; the decision rests on measurement: after
each layer goes back to float the metric is evaluated again, and the search stops as
soon as the *measured* metric meets the target. Sensitivities of single layers do not
add up exactly, which is why nothing here is predicted.

Example::

    result = sensitivity.partial_quantize(model, report, eval_fn, max_drop=0.5)
    print(result.skip, result.metric)     # the model is left with those layers in float
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from sensitivity.errors import SensitivityError
from sensitivity.layers import find_layers, select_layers
from sensitivity.report import SensitivityReport
from sensitivity.sweep import measure

__all__ = ["partial_quantize", "PartialResult"]

log = logging.getLogger(__name__)


@dataclass
class PartialResult:
    """Layers kept in float, the metric measured with them in float, and the path there."""

    skip: list[str]
    metric: float
    target: float | None
    met: bool
    history: list[tuple[int, float]] = field(default_factory=list)

    @property
    def skip_layers(self) -> list[str]:
        return self.skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        goal = "" if self.target is None else \
            f" (target {self.target:.4f} {'met' if self.met else 'NOT met'})"
        return f"{len(self.skip)} layers in float, measured {self.metric:.4f}{goal}"


def _meets(metric: float, target: float, higher_is_better: bool) -> bool:
    return metric >= target if higher_is_better else metric <= target


def partial_quantize(model: nn.Module, report: SensitivityReport,
                     eval_fn: Callable[[nn.Module], float], max_drop: float | None = None,
                     target: float | None = None, top_k: int | None = None,
                     ) -> PartialResult:
    """Return the most sensitive layers to float, one by one, until the target is met.

    Give exactly one of:
        max_drop: allowed loss against the report's FP32 baseline.
        target: the metric to reach.
        top_k: keep exactly the ``top_k`` most sensitive layers in float (measured once).

    The model is left with the chosen layers' quantizers disabled, and ``report.skip``
    records the choice so ``report.write`` puts it in ``skip_layers.txt``. Start from the
    fully quantized, calibrated model the report was made on.
    """
    given = [n for n, v in (("max_drop", max_drop), ("target", target), ("top_k", top_k))
             if v is not None]
    if len(given) != 1:
        raise SensitivityError(f"partial_quantize needs exactly one of max_drop, target, "
                               f"top_k; got {given or 'none'}")
    hib = report.higher_is_better
    if max_drop is not None:
        if max_drop < 0:
            raise SensitivityError(f"max_drop must not be negative, got {max_drop}")
        target = report.fp32 - max_drop if hib else report.fp32 + max_drop
    if top_k is not None and top_k < 0:
        raise SensitivityError(f"top_k must not be negative, got {top_k}")
    order = [r.layer for r in report.ranked() if r.ok]
    layers = select_layers(find_layers(model), order)

    def evaluate(n: int) -> float:
        metric, error, _ = measure(eval_fn, model)
        if error:
            raise SensitivityError(f"partial_quantize with {n} layers in float: {error}")
        history.append((n, metric))
        log.info("%d layers in float: %.4f", n, metric)
        return metric

    history: list[tuple[int, float]] = []
    if top_k is not None:
        for layer in layers[:top_k]:
            layer.disable()
        skip = [layer.name for layer in layers[:top_k]]
        metric = evaluate(len(skip))
        result = PartialResult(skip, metric, None, True, history)
    else:
        skip = []
        metric = evaluate(0)
        for layer in layers:
            if _meets(metric, target, hib):
                break
            layer.disable()
            skip.append(layer.name)
            metric = evaluate(len(skip))
        met = _meets(metric, target, hib)
        if not met:
            log.warning("target %.4f not met even with all %d ranked layers in float "
                        "(measured %.4f)", target, len(skip), metric)
        result = PartialResult(skip, metric, target, met, history)
    report.skip = list(result.skip)
    report.skip_metric = result.metric
    goal = "" if result.target is None else f", target {result.target:.4f}" + \
        ("" if result.met else " NOT met")
    report.skip_note = (f"measured by partial_quantize with these {len(skip)} layers in "
                        f"float: {report.metric_name} {result.metric:.4f}{goal}")
    return result
