"""``calibrate``: run data through a model and give every enabled quantizer its amax.

Activations (per-tensor quantizers) use the calibrator named by ``method``; weights
(per-channel quantizers) always use the running max per channel, which is exact for a
tensor that never changes. Statistics are merged across ``torch.distributed`` ranks
before amax is computed, so every rank ends with identical amax even when each saw
different data. The model's train/eval mode and every quantizer's switches are restored
afterwards, also when an exception interrupts the run.

Example::

    qdq.replace_modules(model)
    summary = sensitivity.calibrate(model, loader, num_batches=16, method="histogram",
                                    amax_method="percentile", percentile=99.99)
    print(summary)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qdq.calib import HistogramCalibrator, MaxCalibrator
from qdq.quantizer import TensorQuantizer
from sensitivity.batches import (
    ForwardFn,
    batch_size,
    default_forward,
    model_device,
    take,
    to_device,
)
from sensitivity.errors import SensitivityError
from sensitivity.layers import enabled_quantizers, saved_states

__all__ = ["calibrate", "CalibrationSummary", "collect_statistics", "load_amax",
           "CALIBRATORS", "AMAX_METHODS"]

log = logging.getLogger(__name__)

#: Calibrator kinds by name; a quantizer's calibrator is swapped for the kind asked for.
CALIBRATORS: dict[str, type] = {"max": MaxCalibrator, "histogram": HistogramCalibrator}
#: amax searches each calibrator kind offers (the first is its default).
AMAX_METHODS: dict[str, tuple[str, ...]] = {
    "max": ("max",),
    "histogram": ("entropy", "percentile", "mse", "max"),
}


@dataclass
class QuantizerAmax:
    name: str
    axis: str
    calibrator: str
    amax_min: float | None
    amax_max: float | None


@dataclass
class CalibrationSummary:
    """What ``calibrate`` did: data seen, method, amax range of every quantizer."""

    method: str
    amax_method: str
    percentile: float | None
    num_batches: int
    num_samples: int
    seconds: float
    world_size: int
    quantizers: list[QuantizerAmax] = field(default_factory=list)
    uncalibrated: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        how = self.amax_method + (f" {self.percentile:g}" if self.amax_method == "percentile"
                                  else "")
        lines = [
            f"calibrated {len(self.quantizers)} quantizers with {self.method} ({how}) on "
            f"{self.num_batches} batches / {self.num_samples} samples in {self.seconds:.1f} s"
            + (f" across {self.world_size} ranks" if self.world_size > 1 else ""),
        ]
        width = max((len(q.name) for q in self.quantizers), default=4)
        lines.append(f"{'quantizer':<{width}}  {'axis':>6}  {'calib':>9}  amax")
        for q in self.quantizers:
            if q.amax_min is None:
                amax = "-"
            elif q.amax_min == q.amax_max:
                amax = f"{q.amax_max:.4g}"
            else:
                amax = f"[{q.amax_min:.4g}, {q.amax_max:.4g}]"
            lines.append(f"{q.name:<{width}}  {q.axis:>6}  {q.calibrator:>9}  {amax}")
        if self.uncalibrated:
            lines.append(f"saw no data (amax unchanged): {', '.join(self.uncalibrated)}")
        return "\n".join(lines)


def _check_method(method: str, amax_method: str | None) -> str:
    if method not in CALIBRATORS:
        raise SensitivityError(f"calibration method {method!r} is unknown; "
                               f"choose one of {sorted(CALIBRATORS)}")
    allowed = AMAX_METHODS[method]
    amax_method = amax_method or allowed[0]
    if amax_method not in allowed:
        raise SensitivityError(f"amax method {amax_method!r} does not exist for the "
                               f"{method} calibrator; choose one of {list(allowed)}")
    return amax_method


def _calibrator_for(q: TensorQuantizer, method: str):
    """The calibrator ``q`` should use: weights per channel keep max; others ``method``."""
    kind = CALIBRATORS["max"] if q.axis is not None else CALIBRATORS[method]
    if type(q.calibrator) is kind:
        return q.calibrator
    desc = q.descriptor
    if kind is HistogramCalibrator:
        calib = HistogramCalibrator(q.num_bits, None, q.unsigned, num_bins=desc.num_bins,
                                    skip_zeros=desc.skip_zeros)
    else:
        calib = MaxCalibrator(q.num_bits, q.axis, q.unsigned)
    calib.owner = q.name
    return calib


def _distributed_world(group=None) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(group)
    return 1


@contextmanager
def _calibration_mode(model: nn.Module, quantizers: list[TensorQuantizer]) -> Iterator[None]:
    """Eval mode, calibration on and fake quant off; everything restored on exit."""
    was_training = model.training
    with saved_states(quantizers):
        try:
            model.eval()
            for q in quantizers:
                q.disable_quant()
                q.enable_calib()
            yield
        finally:
            model.train(was_training)


def collect_statistics(model: nn.Module, data: Iterable, num_batches: int | None = None,
                       method: str = "max", device: torch.device | str | None = None,
                       progress: bool = True, forward_fn: ForwardFn | None = None,
                       group=None) -> tuple[list[tuple[str, TensorQuantizer]], int, int]:
    """Feed ``data`` through ``model`` with every enabled quantizer collecting statistics.

    Returns ``(quantizers that saw data, batches, samples)``. Statistics stay in the
    calibrators (merged across ranks), so several amax searches can follow without
    running the data again.
    """
    _check_method(method, None)
    named = enabled_quantizers(model)
    if not named:
        raise SensitivityError(
            "the model has no enabled quantizers: insert them first "
            "(qdq.replace_modules(model) or quant_modules.initialize())"
        )
    if device is not None:
        model.to(device)
    target = torch.device(device) if device is not None else model_device(model)
    forward = forward_fn or default_forward
    quantizers = [q for _, q in named]
    for q in quantizers:
        calib = _calibrator_for(q, method)
        calib.reset()
        q._calibrator = calib  # noqa: SLF001 - the quantizer exposes no setter for this
    seen = torch.zeros(len(quantizers), dtype=torch.int64)
    hooks = [q.register_forward_pre_hook(_counter(seen, i)) for i, q in enumerate(quantizers)]
    batches = samples = 0
    try:
        with _calibration_mode(model, quantizers), torch.no_grad():
            bar = tqdm(take(data, num_batches), total=num_batches, desc="calibrate",
                       unit="batch", disable=not progress, leave=False)
            for batch in bar:
                batch = to_device(batch, target)
                forward(model, batch)
                batches += 1
                samples += batch_size(batch)
    finally:
        for hook in hooks:
            hook.remove()
    if batches == 0:
        raise SensitivityError("calibration data is empty: the iterable gave no batch")
    if _distributed_world(group) > 1:
        seen, batches, samples = _merge_across_ranks(named, seen, batches, samples, target,
                                                     group)
    return [(n, q) for (n, q), count in zip(named, seen.tolist(), strict=True) if count], \
        batches, samples


def _counter(seen: torch.Tensor, i: int):
    def hook(module, args) -> None:
        seen[i] += 1
    return hook


def _merge_across_ranks(named: list[tuple[str, TensorQuantizer]], seen: torch.Tensor,
                        batches: int, samples: int, target: torch.device,
                        group) -> tuple[torch.Tensor, int, int]:
    """All-reduce every calibrator; returns the counts (per quantizer, batches, samples)
    summed over ranks.

    Every rank must reduce the same quantizers in the same order, so which quantizers saw
    data is agreed first (min and max over ranks) and the same decision is taken on all.
    """
    import torch.distributed as dist

    device = target if dist.get_backend(group) == "nccl" else torch.device("cpu")
    low, high = seen.to(device), seen.to(device).clone()
    dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
    partial = [name for (name, _), lo, hi in zip(named, low.tolist(), high.tolist(),
                                                 strict=True) if hi and not lo]
    if partial:
        raise SensitivityError(
            f"{partial[0]}: saw calibration data on some ranks but not on others, so its "
            "statistics cannot be merged (give every rank data that reaches it)"
        )
    for (_, q), count in zip(named, high.tolist(), strict=True):
        if count:
            q.calibrator.all_reduce(group)
    total = torch.cat([seen, torch.tensor([batches, samples])]).to(device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    total = total.cpu()
    return total[:-2], int(total[-2]), int(total[-1])


def load_amax(named: list[tuple[str, TensorQuantizer]], amax_method: str = "max",
              percentile: float = 99.99) -> list[QuantizerAmax]:
    """Compute and store amax from the statistics collected by ``collect_statistics``."""
    rows = []
    for name, q in named:
        if isinstance(q.calibrator, HistogramCalibrator):
            kwargs = {"percentile": percentile} if amax_method == "percentile" else {}
            q.load_calib_amax(amax_method, **kwargs)
        else:
            q.load_calib_amax()
        amax = q.amax
        rows.append(QuantizerAmax(
            name=name,
            axis="tensor" if q.axis is None else str(q.axis),
            calibrator=type(q.calibrator).__name__.replace("Calibrator", "").lower(),
            amax_min=None if amax is None else float(amax.min()),
            amax_max=None if amax is None else float(amax.max()),
        ))
    return rows


def calibrate(model: nn.Module, data: Iterable, num_batches: int | None = None,
              method: str = "max", amax_method: str | None = None,
              percentile: float = 99.99, device: torch.device | str | None = None,
              progress: bool = True, forward_fn: ForwardFn | None = None,
              group=None) -> CalibrationSummary:
    """Calibrate every enabled quantizer of ``model`` on ``data``.

    Args:
        model: a model with quantizers (``qdq.replace_modules`` or ``quant_modules``).
        data: any iterable of batches: tensors, ``(inputs, labels)`` tuples or dicts.
        num_batches: stop after this many batches (all of them for None).
        method: ``"max"`` or ``"histogram"``, the activation calibrator.
        amax_method: the amax search; ``"max"`` for the max calibrator, ``"entropy"``
            (default), ``"percentile"``, ``"mse"`` or ``"max"`` for histograms.
        percentile: for ``amax_method="percentile"``.
        device: move the model and batches there (default: where the model is).
        progress: show a tqdm bar.
        forward_fn: ``forward_fn(model, batch)`` for models with their own signature.
        group: the ``torch.distributed`` process group to merge statistics over.

    Returns a :class:`CalibrationSummary`.
    """
    amax_method = _check_method(method, amax_method)
    start = time.perf_counter()
    everyone = [name for name, _ in enabled_quantizers(model)]
    named, batches, samples = collect_statistics(
        model, data, num_batches, method, device, progress, forward_fn, group)
    rows = load_amax(named, amax_method, percentile)
    calibrated = {name for name, _ in named}
    missing = [name for name in everyone if name not in calibrated]
    if missing:
        log.warning("quantizers that saw no calibration data: %s", ", ".join(missing))
    return CalibrationSummary(
        method=method, amax_method=amax_method,
        percentile=percentile if amax_method == "percentile" else None,
        num_batches=batches, num_samples=samples, seconds=time.perf_counter() - start,
        world_size=_distributed_world(group), quantizers=rows, uncalibrated=missing,
    )
