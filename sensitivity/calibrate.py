"""``calibrate``: run data through a model and give every enabled quantizer its amax.

Every quantizer collects with the calibrator its descriptor names (``calib_method``):
the descriptor is the one source of truth. ``method="max"`` or ``"histogram"`` overrides
it for the activation (per-tensor) quantizers *for this call only*: each quantizer's
descriptor and calibrator switch together and come back on exit, also after an exception
(the amax found stays). Per-channel weight quantizers keep their running max per channel,
which is exact for a tensor that never changes.

All histogram calibrators are searched in one batched call (``qdq.load_calib_amaxes``).
Statistics are merged across ``torch.distributed`` ranks before amax is computed, so every
rank ends with identical amax even when each saw different data; for histograms the ranks
first agree on the range (the largest ``|x|`` of everyone's first batch), which costs one
extra forward pass of the first batch. The model's train/eval mode and every quantizer's
switches are restored afterwards, also when an exception interrupts the run.

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
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from itertools import chain
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qdq.calib import AMAX_METHODS, CALIBRATORS, HistogramCalibrator, calib_method_of
from qdq.calib.base import CalibrationError
from qdq.quantizer import TensorQuantizer, load_calib_amaxes
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

__all__ = ["calibrate", "CalibrationSummary", "Statistics", "collected_statistics",
           "load_amax", "QuantizerAmax"]

log = logging.getLogger(__name__)


@dataclass
class QuantizerAmax:
    """One quantizer after calibration; ``calibrator`` names the search behind its amax
    (``TensorQuantizer.calibrated_by``: ``max``, ``entropy``, ``percentile-99.99``...)."""

    name: str
    axis: str
    calibrator: str
    amax_min: float | None
    amax_max: float | None


@dataclass
class CalibrationSummary:
    """What ``calibrate`` did: data seen, calibrators, amax range of every quantizer.

    ``method`` names the calibrators used (``"max"``, ``"histogram"`` or
    ``"histogram+max"``), ``amax_method`` the search of the histogram calibrators."""

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
        calib = max([5, *(len(q.calibrator) for q in self.quantizers)])
        lines.append(f"{'quantizer':<{width}}  {'axis':>6}  {'calib':>{calib}}  amax")
        for q in self.quantizers:
            if q.amax_min is None:
                amax = "-"
            elif q.amax_min == q.amax_max:
                amax = f"{q.amax_max:.4g}"
            else:
                amax = f"[{q.amax_min:.4g}, {q.amax_max:.4g}]"
            lines.append(f"{q.name:<{width}}  {q.axis:>6}  {q.calibrator:>{calib}}  {amax}")
        if self.uncalibrated:
            lines.append(f"saw no data (amax unchanged): {', '.join(self.uncalibrated)}")
        return "\n".join(lines)


@dataclass
class Statistics:
    """What :func:`collected_statistics` collected: the quantizers that saw data (their
    calibrators hold the statistics), every enabled quantizer, batches and samples."""

    named: list[tuple[str, TensorQuantizer]]
    everyone: list[tuple[str, TensorQuantizer]]
    num_batches: int
    num_samples: int

    @property
    def calib_methods(self) -> list[str]:
        """The calibrator kinds in use, sorted (``["histogram", "max"]``)."""
        return sorted({calib_method_of(q.calibrator) for _, q in self.named})


def _check_request(method: str | None, amax_method: str | None) -> None:
    """Fail on an unknown calibrator or amax method before any data runs."""
    if method is not None and method not in CALIBRATORS:
        raise SensitivityError(f"calibration method {method!r} is unknown; "
                               f"choose one of {sorted(CALIBRATORS)}")
    if amax_method is not None and not any(amax_method in m for m in AMAX_METHODS.values()):
        raise SensitivityError(f"amax method {amax_method!r} is unknown; choose one of "
                               f"{sorted(set(chain(*AMAX_METHODS.values())))}")
    if method is not None and amax_method is not None and \
            amax_method not in AMAX_METHODS[method]:
        raise SensitivityError(f"amax method {amax_method!r} does not exist for the "
                               f"{method} calibrator; choose one of "
                               f"{list(AMAX_METHODS[method])}")


def _enabled_or_fail(model: nn.Module) -> list[tuple[str, TensorQuantizer]]:
    """The enabled quantizers, or the error that says there are none and what to do."""
    named = enabled_quantizers(model)
    if not named:
        raise SensitivityError(
            "the model has no enabled quantizers: insert them first "
            "(qdq.replace_modules(model) or quant_modules.initialize())"
        )
    return named


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


@contextmanager
def collected_statistics(model: nn.Module, data: Iterable, num_batches: int | None = None,
                         method: str | None = None,
                         device: torch.device | str | None = None, progress: bool = True,
                         forward_fn: ForwardFn | None = None,
                         group=None) -> Iterator[Statistics]:
    """Feed ``data`` through ``model`` with every enabled quantizer collecting statistics;
    inside the block the calibrators hold them (merged across ranks), so several amax
    searches can follow without running the data again.

    ``method`` (``"max"``, ``"histogram"``) overrides the descriptors of the per-tensor
    quantizers inside the block; on exit every quantizer has its own descriptor and
    calibrator back (the amax loaded inside stays)."""
    _check_request(method, None)
    named = _enabled_or_fail(model)
    if device is not None:
        model.to(device)
    target = torch.device(device) if device is not None else model_device(model)
    quantizers = [q for _, q in named]
    with ExitStack() as swaps:
        if method is not None:
            for q in quantizers:
                if q.axis is None:
                    swaps.enter_context(q.calibrating_with(method))
        for q in quantizers:
            q.calibrator.reset()
        seen, batches, samples = _run(model, data, num_batches, target,
                                      forward_fn or default_forward, quantizers, progress,
                                      group)
        if _distributed_world(group) > 1:
            seen, batches, samples = _merge_across_ranks(named, seen, batches, samples,
                                                         target, group)
        yield Statistics(
            named=[(n, q) for (n, q), count in zip(named, seen.tolist(), strict=True)
                   if count],
            everyone=named, num_batches=batches, num_samples=samples)


def _run(model: nn.Module, data: Iterable, num_batches: int | None, target: torch.device,
         forward: ForwardFn, quantizers: list[TensorQuantizer], progress: bool,
         group) -> tuple[torch.Tensor, int, int]:
    """The data through the model: ``(batches seen per quantizer, batches, samples)``."""
    seen = torch.zeros(len(quantizers), dtype=torch.int64)
    hooks = [q.register_forward_pre_hook(_counter(seen, i)) for i, q in enumerate(quantizers)]
    batches = samples = 0
    try:
        with _calibration_mode(model, quantizers), torch.no_grad():
            stream = iter(take(data, num_batches))
            if _distributed_world(group) > 1:
                stream = _agree_on_ranges(model, stream, target, forward, quantizers, group)
            bar = tqdm(stream, total=num_batches, desc="calibrate", unit="batch",
                       disable=not progress, leave=False)
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
    return seen, batches, samples


def _agree_on_ranges(model: nn.Module, stream: Iterator, target: torch.device,
                     forward: ForwardFn, quantizers: list[TensorQuantizer], group
                     ) -> Iterator:
    """Fix every histogram's range to the largest ``|x|`` of all ranks' first batches, so
    the histograms can be summed exactly; returns the stream with the first batch put back.

    The first batch runs once with max calibrators in place of the histograms; every rank
    takes part in the reduction, with or without a batch of its own."""
    import torch.distributed as dist

    first = next(stream, None)
    hist = [q for q in quantizers if isinstance(q.calibrator, HistogramCalibrator)]
    if hist:
        with ExitStack() as probes:
            for q in hist:
                probes.enter_context(q.calibrating_with("max"))
            if first is not None:
                forward(model, to_device(first, target))
            found = [q.calibrator.compute_amax() for q in hist]
        device = target if dist.get_backend(group) == "nccl" else torch.device("cpu")
        ranges = torch.stack([torch.zeros((), device=device) if a is None
                              else a.detach().float().reshape(()).to(device) for a in found])
        dist.all_reduce(ranges, op=dist.ReduceOp.MAX, group=group)
        for q, value in zip(hist, ranges.tolist(), strict=True):
            if value > 0:
                q.calibrator.fix_range(torch.tensor(value, device=target))
    return stream if first is None else chain([first], stream)


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


def load_amax(named: list[tuple[str, TensorQuantizer]], amax_method: str | None = None,
              percentile: float | None = None) -> list[QuantizerAmax]:
    """Compute and store amax from the statistics collected by ``collected_statistics``:
    one batched search over all histogram calibrators (``amax_method``, default entropy;
    ``percentile`` for the percentile search), the max of the others."""
    options = {} if percentile is None else {"percentile": percentile}
    try:
        load_calib_amaxes([q for _, q in named], amax_method, **options)
    except CalibrationError as err:
        raise SensitivityError(str(err)) from None
    rows = []
    for name, q in named:
        amax = q.amax
        rows.append(QuantizerAmax(
            name=name,
            axis="tensor" if q.axis is None else str(q.axis),
            calibrator=q.calibrated_by or "unknown",
            amax_min=None if amax is None else float(amax.min()),
            amax_max=None if amax is None else float(amax.max()),
        ))
    return rows


def calibrate(model: nn.Module, data: Iterable, num_batches: int | None = None,
              method: str | None = None, amax_method: str | None = None,
              percentile: float = 99.99, device: torch.device | str | None = None,
              progress: bool = True, forward_fn: ForwardFn | None = None,
              group=None) -> CalibrationSummary:
    """Calibrate every enabled quantizer of ``model`` on ``data``.

    Args:
        model: a model with quantizers (``qdq.replace_modules`` or ``quant_modules``).
        data: any iterable of batches: tensors, ``(inputs, labels)`` tuples or dicts.
        num_batches: stop after this many batches (all of them for None).
        method: None (each quantizer's descriptor decides), or ``"max"`` / ``"histogram"``
            for every activation quantizer during this call.
        amax_method: the search of the histogram calibrators: ``"entropy"`` (default),
            ``"percentile"``, ``"mse"`` or ``"max"``; max calibrators always give max.
        percentile: for ``amax_method="percentile"``.
        device: move the model and batches there (default: where the model is).
        progress: show a tqdm bar.
        forward_fn: ``forward_fn(model, batch)`` for models with their own signature.
        group: the ``torch.distributed`` process group to merge statistics over.

    Returns a :class:`CalibrationSummary`.
    """
    _check_request(method, amax_method)
    planned = {method if method is not None and q.axis is None else q.descriptor.calib_method
               for _, q in _enabled_or_fail(model)}
    if "histogram" not in planned and amax_method not in (None, "max"):
        raise SensitivityError(f"amax method {amax_method!r} does not exist for the max "
                               "calibrator, the only one in use; pass method='histogram' or "
                               "build the quantizers with calib_method='histogram'")
    start = time.perf_counter()
    with collected_statistics(model, data, num_batches, method, device, progress,
                              forward_fn, group) as stats:
        kinds = stats.calib_methods
        searched = amax_method or AMAX_METHODS["histogram"][0]
        rows = load_amax(stats.named, searched if "histogram" in kinds else None,
                         percentile if searched == "percentile" and "histogram" in kinds
                         else None)
    calibrated = {name for name, _ in stats.named}
    missing = [name for name, _ in stats.everyone if name not in calibrated]
    if missing:
        log.warning("quantizers that saw no calibration data: %s", ", ".join(missing))
    uses_hist = "histogram" in kinds
    return CalibrationSummary(
        method="+".join(kinds), amax_method=searched if uses_hist else "max",
        percentile=percentile if uses_hist and searched == "percentile" else None,
        num_batches=stats.num_batches, num_samples=stats.num_samples,
        seconds=time.perf_counter() - start, world_size=_distributed_world(group),
        quantizers=rows, uncalibrated=missing,
    )
