"""AWQ: activation-aware scaling and clipping of weights before they are quantized.

A layer ``y = x W^T`` equals ``(x / s) (W * s)^T`` for any positive scale ``s`` per input
channel. AWQ (Lin et al., 2024) grows the weight columns of the input channels that carry
large activations (``s = mean|x|^alpha``, by default divided by ``mean|w|^(1-alpha)``:
:class:`AWQConfig`), so their weights lose less to rounding, and shrinks the input by the
same factor; ``alpha`` is searched per layer on a grid, by the output error of the
quantized layer on calibration inputs. A second search then picks,
per output channel or block, the clip ``r * max|w|`` with the least output error.

Both errors come from the layer's input statistics (:class:`qdq.gptq.InputStatistics`):
the squared output error of a weight error ``D`` is ``sum_rows d H d^T`` with ``H = X^T X``
(scaled), so no activations are stored.

Where ``1/s`` goes, so that the float model is unchanged:

- into the preceding op when it is a LayerNorm (or RMSNorm) read only by this layer, or by
  several layers that then share one ``s`` (q/k/v of a pre-LN block), or a Linear read
  only by this layer: its weight (and bias) rows are divided by ``s``;
- anywhere else (a LayerNorm that also feeds a residual, as in BERT; a GELU output): the
  weight-only layer's ``input_scale`` buffer, one ``Mul`` before it in ONNX.

:func:`apply_scales` checks on the spot (first calibration batch) that the float outputs
are unchanged, within :data:`FLOAT_TOLERANCE` of the largest output, and undoes every
change otherwise. :mod:`qdq.formats` drives it: ``weight_only(model, 4, 128,
method="awq", batches=calib)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qdq.blockwise import MSE_CLIP_RATIOS, weight_amax
from qdq.gptq import InputStatistics, collect_statistics, to_matrix
from qdq.rules.check import largest_difference, mismatch
from qdq.rules.trace import single_call_modules, single_call_readers
from qdq.tensor_quant import quant_bounds, scale_from_amax

__all__ = ["AWQConfig", "AWQUnit", "AWQReport", "search_scale", "search_clip",
           "apply_scales", "output_error", "FLOAT_TOLERANCE"]

#: largest float difference the scaling may cause, relative to the largest output value
FLOAT_TOLERANCE = 1e-5

_NORMS = tuple(c for c in (nn.LayerNorm, getattr(nn, "RMSNorm", None)) if c is not None)


@dataclass(frozen=True)
class AWQConfig:
    """AWQ's knobs (``weight_only(..., method="awq", method_options={...})``).

    alphas: exponents tried for ``s = mean|x|^alpha`` (0 is plain rounding).
    clip_ratios: clips tried per output channel or block, as fractions of its max
        (empty: no clip search, the format's amax rule).
    fold: put ``1/s`` into a preceding LayerNorm or Linear where exact (else a Mul).
    weight_term: ``s = mean|x|^alpha / mean|w|^(1 - alpha)`` (``|w|`` relative to its
        block's max, averaged over output rows, as modelopt's awq_lite does) instead of
        the paper's ``mean|x|^alpha``: on all-MiniLM-L6-v2 at W4 block 128 it lifts the
        min cosine from 0.96 to 0.97 (scripts/minilm_weight_methods.py).
    """

    alphas: tuple[float, ...] = tuple(i / 20 for i in range(20))
    clip_ratios: tuple[float, ...] = tuple(1 - i / 20 for i in range(10))
    fold: bool = True
    weight_term: bool = True

    def __post_init__(self) -> None:
        if not self.alphas or any(not 0 <= a <= 1 for a in self.alphas):
            raise ValueError(f"alphas must be numbers in [0, 1], got {self.alphas!r}")
        if any(not 0 < r <= 1 for r in self.clip_ratios):
            raise ValueError(f"clip_ratios must be in (0, 1], got {self.clip_ratios!r}")


# ----------------------------------------------------------------------- the math
def _rtn(w: torch.Tensor, bits: int, block: int | None, amax: torch.Tensor) -> torch.Tensor:
    """Fake-quantized matrix ``w [out, cols]`` with amax per row or per column block."""
    qmin, qmax, _ = quant_bounds(bits)
    scale = scale_from_amax(amax, bits)
    scale = scale.reshape(-1, 1) if block is None else scale.repeat_interleave(block, 1)
    return torch.clamp(torch.round(w / scale), qmin, qmax) * scale


def _matrix_amax(w: torch.Tensor, bits: int, block: int | None, method: str,
                 clip_ratios: tuple[float, ...]) -> torch.Tensor:
    amax = weight_amax(w, bits, block, method, clip_ratios)
    return amax if block is None else amax.reshape(w.shape[0], -1)


def output_error(delta: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """``sum_rows d H d^T``: the summed squared output error of weight error ``delta``."""
    return ((delta @ hessian) * delta).sum()


def _column_scale(s: torch.Tensor, columns: int) -> torch.Tensor:
    """Per-channel ``s`` spread over :func:`qdq.gptq.to_matrix`'s columns (k-major)."""
    return s.repeat(columns // s.numel())


@torch.no_grad()
def search_scale(weights: Sequence[torch.Tensor], stats: InputStatistics, bits: int,
                 block: int | None, amax_method: str = "max",
                 mse_ratios: tuple[float, ...] = MSE_CLIP_RATIOS,
                 alphas: Sequence[float] = AWQConfig.alphas, weight_term: bool = True
                 ) -> tuple[float, torch.Tensor, float, float]:
    """``(alpha, s, error at alpha 0, error at alpha)`` for weights sharing one input.

    ``weights``: ``[out, cols]`` matrices; the error is each layer's output error relative
    to its output power, summed. ``s`` is fp32, one per input channel, normalised to a
    geometric mean of max and min of 1.
    """
    h = stats.hessian()
    mean = stats.channel_mean().to(h.device)
    layers = [(w.float().to(h.device), float(output_error(w.float().to(h.device), h)) or 1.0)
              for w in weights]

    def error(s: torch.Tensor) -> float:
        total = 0.0
        for w, power in layers:
            sc = _column_scale(s, w.shape[1])
            ws = w * sc
            q = _rtn(ws, bits, block, _matrix_amax(ws, bits, block, amax_method, mse_ratios))
            total += float(output_error(q / sc - w, h)) / power
        return total

    ones = torch.ones_like(mean)
    best = (0.0, ones, error(ones))
    base = best[2]
    w_mean = _relative_weight_mean(layers, block, mean.numel()) if weight_term else None
    for alpha in alphas:
        if alpha == 0:
            continue
        s = mean.clamp_min(1e-4).pow(alpha)
        if w_mean is not None:
            s = (s / (w_mean.pow(1 - alpha) + 1e-4)).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        if not torch.isfinite(s).all():
            continue
        err = error(s)
        if err < best[2]:
            best = (float(alpha), s, err)
    return best[0], best[1].float(), base, best[2]


def _relative_weight_mean(layers: list[tuple[torch.Tensor, float]], block: int | None,
                          channels: int) -> torch.Tensor:
    """Mean over output rows (and layers, kernel positions) of ``|w|`` divided by the max
    of its block, per input channel."""
    means = []
    for w, _ in layers:
        size = block or w.shape[1]
        v = w.abs().reshape(w.shape[0], -1, size)
        rel = (v / v.amax(2, keepdim=True).clamp_min(1e-12)).reshape(w.shape)
        means.append(rel.mean(0).reshape(-1, channels).mean(0))
    return torch.stack(means).mean(0)


def _diagonal_blocks(h: torch.Tensor, block: int) -> torch.Tensor:
    n = h.shape[0] // block
    blocks = h.reshape(n, block, n, block)
    index = torch.arange(n, device=h.device)
    return blocks[index, :, index, :]  # [n, block, block]


@torch.no_grad()
def search_clip(w: torch.Tensor, hessian: torch.Tensor, bits: int, block: int | None,
                ratios: Sequence[float]) -> torch.Tensor:
    """amax per row (``[out]``) or per column block (``[out, cols / block]``) of the matrix
    ``w``: the ratio of its max whose rounding moves the output least.

    A block's error is ``d_b H_bb d_b^T`` (its own part of the output, as if the other
    blocks were exact); a row's is ``d H d^T``.
    """
    w = w.float()
    h = hessian.float().to(w.device)
    out, cols = w.shape
    size = block or cols
    v = w.reshape(out, cols // size, size)
    largest = v.abs().amax(2)
    hb = _diagonal_blocks(h, size)
    best, best_err = largest.clone(), None
    for ratio in ratios:
        amax = largest * ratio
        d = (_rtn(w, bits, block, amax if block else amax[:, 0]) - w).reshape(v.shape)
        err = torch.einsum("onb,nbc,onc->on", d, hb, d)
        if best_err is None:
            best, best_err = amax, err
            continue
        better = err < best_err
        best = torch.where(better, amax, best)
        best_err = torch.where(better, err, best_err)
    return best if block else best[:, 0]


# -------------------------------------------------------------------- the walker
@dataclass(eq=False)
class AWQUnit:
    """Layers that read one input and get one search: a group folded into a shared
    producer, or a single layer."""

    names: list[str]
    modules: list[nn.Module]
    producer: tuple[str, nn.Module] | None = None
    alpha: float = 0.0
    error_before: float = 0.0
    error_after: float = 0.0

    @property
    def into(self) -> str:
        if self.alpha == 0:
            return "-"
        if self.producer is None:
            return "mul"
        return f"{type(self.producer[1]).__name__.lower()} {self.producer[0]}"


@dataclass
class AWQReport:
    """What :func:`apply_scales` did: one row per unit, the float check, and the
    ``input_scale`` each layer left with a Mul must get (``1/s``)."""

    units: list[AWQUnit] = field(default_factory=list)
    float_difference: float = 0.0
    input_scales: dict[int, torch.Tensor] = field(default_factory=dict)  # id(module) -> 1/s
    hooks: list[Any] = field(default_factory=list)

    def remove_hooks(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks.clear()

    def __str__(self) -> str:
        lines = [f"AWQ: {sum(u.alpha > 0 for u in self.units)} of {len(self.units)} units "
                 f"scaled; float outputs unchanged to {self.float_difference:.1e} (relative)"]
        for u in self.units:
            lines.append(f"  {', '.join(u.names)}: alpha {u.alpha:.2f} into {u.into}, "
                         f"error {u.error_before:.3e} -> {u.error_after:.3e}")
        return "\n".join(lines)


def _foldable_producers(model: nn.Module, names: set[str]) -> dict[frozenset, tuple[str, str]]:
    """``{frozenset(reader paths): (producer path, kind)}`` where a LayerNorm/RMSNorm or
    Linear called once is read only by Linear/Conv layers of ``names``, each called once
    with it as its only argument (a Linear producer: by one layer)."""
    found: dict[frozenset, tuple[str, str]] = {}
    for part, calls, node in single_call_modules(model):
        gm = part.graph_module
        producer = gm.get_submodule(node.target)
        if isinstance(producer, _NORMS) and getattr(producer, "weight", None) is not None:
            kind = "norm"
        elif type(producer) is nn.Linear:
            kind = "linear"
        else:
            continue
        readers = single_call_readers(node, calls, part.qualify)
        if not readers or any(r not in names for r in readers):
            continue
        if kind == "linear" and len(readers) != 1:
            continue
        found[frozenset(readers)] = (part.qualify(node.target), kind)
    return found


@torch.no_grad()
def _fold_into(producer: nn.Module, inverse: torch.Tensor) -> None:
    """Multiply the producer's output channels by ``inverse`` (= 1/s)."""
    inv = inverse.to(producer.weight.device, producer.weight.dtype)
    if isinstance(producer, nn.Linear):
        producer.weight.mul_(inv.unsqueeze(1))
    else:
        producer.weight.mul_(inv)
    if getattr(producer, "bias", None) is not None:
        producer.bias.mul_(inv)


@torch.no_grad()
def _scale_weight(module: nn.Module, s: torch.Tensor) -> None:
    shape = (1, -1) + (1,) * (module.weight.dim() - 2)
    module.weight.mul_(s.to(module.weight.device, module.weight.dtype).reshape(shape))


def _prescale_hook(inverse: torch.Tensor, channel_dim: int):
    def hook(module, args):
        x = args[0]
        scale = inverse.to(x.device, x.dtype)
        if channel_dim == 1:
            scale = scale.reshape(-1, *([1] * (module.weight.dim() - 2)))
        return (x * scale, *args[1:])
    return hook


def _group_units(group: list[tuple[str, nn.Module]], producers: dict, model: nn.Module
                 ) -> list[AWQUnit]:
    """One unit for a group whose shared input comes from a foldable producer, else one
    unit (and one ``s``) per layer."""
    names = [n for n, _ in group]
    found = producers.get(frozenset(names))
    if found is not None:
        return [AWQUnit(names, [m for _, m in group],
                        (found[0], model.get_submodule(found[0])))]
    return [AWQUnit([n], [m]) for n, m in group]


def _snapshot(units: list[AWQUnit]) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    modules = {id(m): m for u in units for m in u.modules}
    modules.update({id(u.producer[1]): u.producer[1] for u in units if u.producer})
    return [(m, {k: v.detach().clone() for k, v in m.state_dict().items()})
            for m in modules.values()]


def apply_scales(model: nn.Module, chunks: list[list[list[tuple[str, nn.Module]]]],
                 data: list, forward: Callable[[nn.Module, Any], Any], bits: int,
                 block: int | None, amax_method: str = "max",
                 mse_ratios: tuple[float, ...] = MSE_CLIP_RATIOS,
                 config: AWQConfig = AWQConfig(), progress: bool = True) -> AWQReport:
    """Search and apply AWQ scales to the float layers of ``chunks``: groups of layers
    reading one input, in execution order, the groups of a chunk read in one calibration
    pass (scaling a group changes no other group's input, so one pass serves them all).

    Weights become ``W * s``; ``1/s`` goes into a foldable producer, or into a forward
    pre-hook now and the weight-only layer's ``input_scale`` later (the report's
    ``input_scales`` and ``hooks``). Raises ValueError, with every change undone, when the
    float outputs move.
    """
    names = {n for chunk in chunks for group in chunk for n, _ in group}
    producers = _foldable_producers(model, names) if config.fold else {}
    units_of = [[_group_units(g, producers, model) for g in chunk] for chunk in chunks]
    report = AWQReport([u for chunk in units_of for units in chunk for u in units])
    saved = _snapshot(report.units)
    with torch.no_grad():
        reference = forward(model, data[0])
    try:
        bar = tqdm(total=len(report.units), desc="awq scales", unit="unit", leave=False,
                   disable=not progress)
        for chunk, chunk_units in zip(chunks, units_of, strict=True):
            stats = collect_statistics(model, [g[0][1] for g in chunk], data, forward)
            for st, units in zip(stats, chunk_units, strict=True):
                for unit in units:
                    _scale_unit(unit, st, bits, block, amax_method, mse_ratios, config,
                                report)
                    bar.update()
        bar.close()
        with torch.no_grad():
            scaled = forward(model, data[0])
        problem = mismatch(reference, scaled, FLOAT_TOLERANCE)
        if problem is not None:
            raise ValueError(f"AWQ scaling changed the float model ({problem}); every "
                             "change was undone")
        report.float_difference = largest_difference(reference, scaled)
    except BaseException:
        report.remove_hooks()
        for module, state in saved:
            module.load_state_dict(state)
        raise
    return report


def _scale_unit(unit: AWQUnit, stats: InputStatistics, bits: int, block: int | None,
                amax_method: str, mse_ratios: tuple[float, ...], config: AWQConfig,
                report: AWQReport) -> None:
    """Search ``unit``'s scale and apply it (weights, then producer fold or pre-hook)."""
    if stats.rows == 0:
        return
    weights = [to_matrix(m.weight.detach()) for m in unit.modules]
    alpha, s, before, after = search_scale(weights, stats, bits, block, amax_method,
                                           mse_ratios, config.alphas, config.weight_term)
    unit.alpha, unit.error_before, unit.error_after = alpha, before, after
    if alpha == 0:
        return
    for m in unit.modules:
        _scale_weight(m, s)
    if unit.producer is not None:
        _fold_into(unit.producer[1], 1.0 / s.double())
        return
    (m,) = unit.modules
    inverse = (1.0 / s.double()).float()
    report.input_scales[id(m)] = inverse
    dim = 1 if m.weight.dim() > 2 else -1
    report.hooks.append(m.register_forward_pre_hook(_prescale_hook(inverse, dim),
                                                    prepend=True))
