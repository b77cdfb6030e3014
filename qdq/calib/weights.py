"""``calibrate_weights``: amax of every weight quantizer from the weights alone.

Weights need no calibration data, so their amax can be set before (or instead of)
running batches (pytorch-quantization's ``calib.calibrate_weights``). For every quant layer
of a model, the histogram of ``|w|`` of each channel along the weight quantizer's axis (or
of the whole weight) is laid out as a fresh :class:`~qdq.calib.HistogramCalibrator` lays
out one batch: ``[0, max]`` in ``num_bins`` bins. ``method`` then gives amax:

==============  ===========================================================
``"max"``       the largest ``|w|`` (what ``MaxCalibrator`` gives)
``"percentile"``  the left edge of the bin where the share of ``|w|`` reaches p
``"mse"``       the bin centre with the smallest squared fake-quant error
==============  ===========================================================

All channels of all layers go through one batched search, and each amax equals, bit for
bit, what a ``HistogramCalibrator`` collecting that channel alone computes.

Example::

    >>> model = nn.Sequential(QuantConv2d(3, 8, 3), nn.ReLU(), QuantConv2d(8, 4, 3))
    >>> calibrate_weights(model, method="mse")
    >>> model[0].weight_quantizer.amax.shape
    torch.Size([8, 1, 1, 1])
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from qdq.calib.amax_search import search_amax
from qdq.calib.base import CalibrationError, UnknownMethodError, reduce_axes
from qdq.calib.registry import choice_name

__all__ = ["calibrate_weights", "WEIGHT_METHODS"]

#: Methods of ``calibrate_weights``.
WEIGHT_METHODS = ("max", "percentile", "mse")
#: Elements binned at once (bounds the int64 bin indices of a large weight).
_CHUNK = 1 << 22


@torch.no_grad()
def calibrate_weights(model: nn.Module, method: str = "percentile", perchannel: bool = True,
                      percentile: float = 99.99, num_bins: int = 2048) -> None:
    """Set amax of the weight quantizer of every quant layer of ``model`` from its weight.

    A quant layer is any module with a ``weight`` tensor and a ``_weight_quantizer`` (all
    of qdq's Conv, ConvTranspose and Linear twins). ``perchannel=True`` gives one amax per
    index of the quantizer's own axis (0 for Conv/Linear, 1 for ConvTranspose; a per-tensor
    quantizer gets one); ``perchannel=False`` one amax for the whole weight. ``method``
    is used whatever calibrator the quantizer has; ``percentile`` applies to
    ``"percentile"``. FP8 quantizers search the E4M3 grid for ``"mse"``.

    Every amax is computed before any is set, so a bad request changes nothing.
    """
    if method not in WEIGHT_METHODS:
        raise UnknownMethodError(f"calibrate_weights: unknown method {method!r}; choose one "
                                 f"of {', '.join(WEIGHT_METHODS)}")
    if method == "percentile" and (isinstance(percentile, bool) or not isinstance(
            percentile, (int, float)) or not 0 < percentile <= 100):
        raise CalibrationError(f"calibrate_weights: percentile must be in the range (0, 100], "
                               f"got {percentile!r}")
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
        raise CalibrationError(f"calibrate_weights: num_bins must be a positive int, "
                               f"got {num_bins!r}")
    layers = list(_weight_layers(model))
    stats = [_channel_histograms(weight, quantizer.axis if perchannel else None, num_bins,
                                 name) for name, quantizer, weight in layers]
    amaxes = _amaxes(method, layers, stats, percentile, num_bins)
    found_by = choice_name(method, percentile=percentile)
    for (_, quantizer, _), amax, (_, _, shape) in zip(layers, amaxes, stats, strict=True):
        _store(quantizer, amax.reshape(shape), found_by)


def _weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, torch.Tensor]]:
    """``(quantizer name, quantizer, weight)`` of every quant layer, found by duck typing
    (qdq.nn sits above qdq.calib, which may not import it)."""
    for name, module in model.named_modules():
        quantizer = getattr(module, "_weight_quantizer", None)
        weight = getattr(module, "weight", None)
        if quantizer is None or not isinstance(weight, torch.Tensor):
            continue
        yield f"{name}._weight_quantizer" if name else "_weight_quantizer", quantizer, weight


def _channel_histograms(weight: torch.Tensor, axis, num_bins: int, name: str
                        ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """``(counts [K, num_bins], largest |w| [K], amax shape)``: one histogram per channel
    (K = 1 per tensor), each binned as a fresh ``HistogramCalibrator`` bins its first
    batch: ``|w|`` to bin ``trunc(fl32(|w| * fl32(num_bins / max)))``, the top edge in the
    last bin; a channel of zeros counts into bin 0."""
    w = weight.detach().float()
    if not bool(torch.isfinite(w).all()):
        raise CalibrationError(f"{name}: the weight contains NaN or Inf")
    kept, reduced = reduce_axes(w.dim(), axis, name)
    if kept:
        rows = w.permute(*kept, *reduced).reshape(math.prod(w.shape[d] for d in kept), -1)
    else:
        rows = w.reshape(1, -1)
    shape = tuple(w.shape[d] if d in kept else 1 for d in range(w.dim())) if kept else ()
    largest = rows.abs().amax(1)
    scale = torch.full_like(largest, float(num_bins)) / largest
    scale = torch.where(largest > 0, scale, torch.zeros_like(scale))
    counts = torch.zeros(rows.shape[0], num_bins, dtype=torch.int64, device=w.device)
    step = max(1, _CHUNK // max(rows.shape[1], 1))
    for lo in range(0, rows.shape[0], step):      # bounds memory on very large weights
        part = rows[lo:lo + step]
        index = (part.abs() * scale[lo:lo + step, None]).to(torch.int64)
        index = index.clamp_(max=num_bins - 1)
        index += torch.arange(part.shape[0], device=w.device)[:, None] * num_bins
        counts[lo:lo + step] = torch.bincount(
            index.reshape(-1), minlength=part.shape[0] * num_bins).view(-1, num_bins)
    return counts, largest, shape


def _amaxes(method: str, layers: list, stats: list, percentile: float, num_bins: int
            ) -> list[torch.Tensor]:
    """One flat amax per layer (a value per channel), with one search per group of
    channels that search alike (see ``_search_key``); channels of zeros keep amax 0."""
    amaxes = [largest.clone() for _, largest, _ in stats]
    if method == "max":
        return amaxes
    groups: dict[tuple, list[tuple[int, int]]] = {}
    for k, ((_, quantizer, _), (_, largest, _)) in enumerate(zip(layers, stats,
                                                                 strict=True)):
        key = _search_key(method, quantizer, largest.device)
        for row in torch.nonzero(largest > 0).reshape(-1).tolist():
            groups.setdefault(key, []).append((k, row))
    for key, members in groups.items():
        counts = [stats[k][0][row] for k, row in members]
        widths = [float(stats[k][1][row]) / num_bins for k, row in members]
        names = [f"{layers[k][0]}[{row}]" for k, row in members]
        if key[0] == "fp8":
            found = _fp8_mse(counts, widths, [stats[k][1][row] for k, row in members])
        elif key[0] == "percentile":
            found = search_amax("percentile", counts, widths, names=names,
                                percentile=percentile)
        else:
            found = search_amax("mse", counts, widths, names=names, num_bits=key[1],
                                unsigned=key[2])
        for (k, row), value in zip(members, found, strict=True):
            amaxes[k][row] = value
    return amaxes


def _search_key(method: str, quantizer: nn.Module, device: torch.device) -> tuple:
    """Channels with equal keys share one search: percentile depends on the counts only,
    mse also on the quantizer's grid (integer bits and sign, or FP8 E4M3)."""
    if method == "percentile":
        return ("percentile", device)
    if getattr(quantizer, "is_fp8", False):
        return ("fp8", device)
    return ("int", quantizer.num_bits, quantizer.unsigned, device)


def _fp8_mse(counts: list[torch.Tensor], widths: list[float], largest: list[torch.Tensor]
             ) -> list[torch.Tensor]:
    """FP8 E4M3 mse amax of each histogram (the search of ``qdq.fp8``, one at a time)."""
    from qdq.fp8 import fp8_mse_amax  # qdq.fp8 reaches back into qdq.calib

    return [torch.minimum(fp8_mse_amax(c, w), m) for c, w, m in zip(counts, widths, largest,
                                                                     strict=True)]


def _store(quantizer: nn.Module, amax: torch.Tensor, found_by: str) -> None:
    """Set amax as ``load_calib_amax`` does where the quantizer offers it (an all-zero
    weight then gets amax 0 with a warning rather than an error, and ``found_by`` names
    the search), else by its setter."""
    store = getattr(quantizer, "_store_calib_amax", None)
    if store is not None:
        store(amax, True, found_by)
    else:
        quantizer.amax = amax
