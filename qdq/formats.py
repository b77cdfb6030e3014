"""Quantization formats by name, and the walkers that put a model into one.

==========  ==========================  ==============  ===========  ===================
name        what                        activations     weights      ONNX
==========  ==========================  ==============  ===========  ===================
``int8``    INT8 Q/DQ (TensorRT)        int8 per tensor int8/channel Q/DQ, opset >= 13
``fp8``     FP8 E4M3 Q/DQ (Hopper, Ada) fp8 per tensor  fp8/channel  Q/DQ, opset >= 19
``w8``      INT8 weight-only            float           int8/channel DQ, opset >= 13
``w4``      INT4 weight-only            float           int4/block   DQ, opset >= 21
==========  ==========================  ==============  ===========  ===================

* Q/DQ formats: insert quantizers as usual (``replace_modules`` or
  ``quant_modules.initialize()``), apply the placement rules, then
  :func:`set_format` re-describes every quantizer (rule-placed ones included) in the
  format, before calibration.
* Weight-only formats: :func:`weight_only` swaps Linear, Conv, LSTM and Embedding layers of a float
  model for layers holding integer weights (:mod:`qdq.nn.weight_only`). Round to nearest
  (``method="max"`` or ``"mse"``) needs no data; ``"gptq"`` (:mod:`qdq.gptq`), ``"awq"``
  (:mod:`qdq.awq`) and ``"awq+gptq"`` read calibration ``batches``.

:func:`apply_format` does whichever the name asks for, and :func:`format_of` tells which
format a model is in (what export and reports print).

Example::

    qdq.replace_modules(model)
    model = apply_rules(model, (x,))
    set_format(model, "fp8")                 # then calibrate as for INT8

    weight_only(model2, bits=4, block_size=128, ignore=["head"])
    format_of(model2)                         # 'w4'
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qdq.awq import AWQConfig, AWQReport, apply_scales, search_clip
from qdq.batches import feed_batch, to_device
from qdq.blockwise import (
    AMAX_METHODS,
    MSE_CLIP_RATIOS,
    WEIGHT_BITS,
    dequantize_weight,
    quantize_with_amax,
)
from qdq.fp8 import FP8_E4M3
from qdq.gptq import (
    GPTQConfig,
    InputStatistics,
    collect_statistics,
    gptq_quantize,
    matrix_scale_to_layout,
    supports_statistics,
    to_matrix,
)
from qdq.layer_kinds import twin_class
from qdq.nn.weight_only import WEIGHT_ONLY_TWINS, QuantizedWeight, WeightOnlyLayer
from qdq.nn.weight_only_embedding import WeightOnlyEmbedding
from qdq.quantizer import TensorQuantizer
from qdq.replace import (
    Replacement,
    _ignore_predicate,
    disable_quantization,
    name_quantizers,
    quantizers,
)

__all__ = ["Format", "FORMATS", "FormatError", "get_format", "set_format", "weight_only",
           "weight_only_candidates", "indivisible_weights", "apply_format", "format_of",
           "WEIGHT_METHODS", "weight_method_of", "gptq_weights"]

#: How weight-only codes are chosen: round to nearest with the max or mse amax, or from
#: calibration data (GPTQ, AWQ, AWQ scales then GPTQ).
WEIGHT_METHODS = ("max", "mse", "awq", "gptq", "awq+gptq")
_DATA_METHODS = ("awq", "gptq", "awq+gptq")
#: ``X^T X`` bytes one calibration pass may collect when passes are not sequential
STATISTICS_BYTES = 256 * 2**20


class FormatError(ValueError):
    """A format was asked for that the model or the arguments cannot take; the message
    names the format, the layer or the argument at fault."""


@dataclass(frozen=True)
class Format:
    """One quantization format: what it quantizes and what its ONNX file needs."""

    name: str
    title: str
    activations: str  # "int8", "fp8" or "float"
    weights: str  # "int8", "fp8" or "int4"
    min_opset: int

    @property
    def weight_only(self) -> bool:
        return self.activations == "float"

    @property
    def weight_bits(self) -> int | tuple[int, int]:
        """``num_bits`` of the weights: 8, 4 or ``(4, 3)`` for FP8."""
        return {"int8": 8, "int4": 4, "fp8": FP8_E4M3}[self.weights]

    def __str__(self) -> str:
        return self.title


#: Every format by name (``--format`` on the command line).
FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("int8", "INT8 Q/DQ", "int8", "int8", 13),
    Format("fp8", "FP8 E4M3 Q/DQ", "fp8", "fp8", 19),
    Format("w8", "INT8 weight-only", "float", "int8", 13),
    Format("w4", "INT4 weight-only", "float", "int4", 21),
)}


def get_format(name: str | Format) -> Format:
    """The format called ``name``; one FormatError listing the names otherwise."""
    if isinstance(name, Format):
        return name
    try:
        return FORMATS[str(name).lower()]
    except KeyError:
        raise FormatError(f"unknown quantization format {name!r}; choose one of "
                          f"{', '.join(FORMATS)}") from None


# ---------------------------------------------------------------------- Q/DQ formats
def _retyped(q: TensorQuantizer, num_bits) -> TensorQuantizer:
    desc = q.descriptor.replace(num_bits=num_bits, unsigned=False, narrow_range=False,
                                amax=None, learn_amax=False)
    new = TensorQuantizer(desc)
    new.set_state(q.get_state())
    new.placed_by = q.placed_by
    new.backend = q.backend
    if q.amax is not None:
        new._set_amax(q.amax.detach().clone(), allow_zero=True)
        new.calibrated_by = q.calibrated_by
        if q.learn_amax:
            new.init_learn_amax()
    return new.to(q._device_anchor.device)


def set_format(model: nn.Module, name: str | Format) -> int:
    """Re-describe every quantizer of ``model`` as INT8 or FP8 E4M3, in place.

    Axis, calibrator kind, state, amax, the placing rule and shared quantizers (one object
    under several names) are kept; collected calibration statistics are not, so call this
    before calibrating. INT8 quantizers become signed and full range. Returns how many
    quantizers changed.
    """
    fmt = get_format(name)
    if fmt.weight_only:
        raise FormatError(f"{fmt.name} is weight-only: use weight_only(model, bits="
                          f"{fmt.weight_bits}) on the float model instead of quantizers")
    found = list(quantizers(model))
    if not found:
        raise FormatError(f"{fmt.name}: the model has no quantizers; insert them first "
                          "(qdq.replace_modules(model) or quant_modules.initialize())")
    replaced: dict[int, TensorQuantizer] = {}
    for _, q in found:
        if id(q) not in replaced and q.num_bits != fmt.weight_bits:
            replaced[id(q)] = _retyped(q, fmt.weight_bits)
    for module in model.modules():
        for key, child in list(module._modules.items()):
            if child is not None and id(child) in replaced:
                module._modules[key] = replaced[id(child)]
    name_quantizers(model)
    return len(replaced)


# ------------------------------------------------------------------ weight-only formats
def weight_only_candidates(model: nn.Module, ignore=None) -> list[tuple[str, nn.Module]]:
    """``(name, layer)`` of every layer :func:`weight_only` would replace, in model order."""
    is_ignored = _ignore_predicate(ignore)
    found: list[tuple[str, nn.Module]] = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for child_name, child in parent.named_children():
            name = f"{prefix}{child_name}"
            if is_ignored(name, child):
                continue
            if twin_class(child, WEIGHT_ONLY_TWINS) is not None:
                found.append((name, child))
                continue
            if type(child) is nn.MultiheadAttention:
                continue  # its own code reads out_proj's weight (qdq.layer_kinds)
            visit(child, name + ".")

    visit(model, "")
    return found


def indivisible_weights(model: nn.Module, block_size: int | None, ignore=None
                        ) -> list[tuple[str, str, int]]:
    """``(layer, weight, input dimension)`` for every weight :func:`weight_only` would
    quantize whose input dimension ``block_size`` does not divide (none for None).

    Example: keep those layers per channel while the rest get blocks::

        rest = sorted({layer for layer, _, _ in indivisible_weights(model, 128)})
        weight_only(model, bits=4, block_size=128, ignore=rest)
        weight_only(model, bits=4)                  # the rest, one scale per channel
    """
    if block_size is None:
        return []
    return [(name, wname, int(w.shape[1])) for name, layer in weight_only_candidates(model, ignore)
            for wname, w in twin_class(layer, WEIGHT_ONLY_TWINS).weights_of(layer).items()
            if w.shape[1] % block_size]


def _method_configs(method: str, options: Mapping[str, Any] | None
                    ) -> tuple[AWQConfig | None, GPTQConfig | None, bool]:
    """The AWQ and GPTQ configs ``method`` uses, from ``options`` (their field names), and
    ``sequential`` (default True: each layer calibrated after the earlier ones are
    quantized, one pass over the data per layer or input group; False: a pass per
    chunk of layers, on float inputs)."""
    kinds = [cls for name, cls in (("awq", AWQConfig), ("gptq", GPTQConfig))
             if name in method.split("+")]
    options = dict(options or {})
    sequential = options.pop("sequential", True) if kinds else True
    if not isinstance(sequential, bool):
        raise FormatError(f"method_options sequential must be True or False, got "
                          f"{sequential!r}")
    known = {f.name for cls in kinds for f in dataclasses.fields(cls)}
    if kinds:
        known.add("sequential")
    unknown = sorted(set(options) - known)
    if unknown:
        raise FormatError(f"method_options {unknown} do not apply to method {method!r}"
                          + (f"; it takes {sorted(known)}" if known else ""))
    made: dict[type, Any] = {}
    for cls in kinds:
        mine = {k: v for k, v in options.items()
                if k in {f.name for f in dataclasses.fields(cls)}}
        try:
            made[cls] = cls(**{k: tuple(v) if isinstance(v, list) else v
                               for k, v in mine.items()})
        except (TypeError, ValueError) as err:
            raise FormatError(f"method {method!r}: {err}") from None
    return made.get(AWQConfig), made.get(GPTQConfig), sequential


def _check_batches(method: str, batches) -> list:
    """The calibration batches as a list; one FormatError if they are missing or empty."""
    if batches is None:
        raise FormatError(f"method {method!r} needs calibration data: pass batches=... (an "
                          "iterable of model inputs: tensors, tuples or keyword dicts)")
    if isinstance(batches, (torch.Tensor, Mapping)):
        raise FormatError(f"method {method!r}: batches must be an iterable of batches, got "
                          f"one {type(batches).__name__} (wrap it in a list)")
    try:
        data = list(batches)
    except TypeError:
        raise FormatError(f"method {method!r}: batches must be an iterable of batches, got "
                          f"{type(batches).__name__}") from None
    if not data:
        raise FormatError(f"method {method!r}: the calibration batches are empty")
    return data


def _check_weight_only_args(model, bits, block_size, amax_method, clip_ratios) -> None:
    if not isinstance(model, nn.Module):
        raise FormatError(f"model must be an nn.Module, got {type(model).__name__}")
    if bits not in WEIGHT_BITS:
        raise FormatError(f"weight-only bits must be one of {WEIGHT_BITS}, got {bits!r}")
    if block_size is not None and (isinstance(block_size, bool)
                                   or not isinstance(block_size, int) or block_size < 1):
        raise FormatError(f"block_size must be None or a positive int, got {block_size!r}")
    if amax_method not in AMAX_METHODS:
        raise FormatError(f"amax_method {amax_method!r}: choose one of "
                          f"{', '.join(AMAX_METHODS)}")
    if not clip_ratios or any(not 0 < r <= 1 for r in clip_ratios):
        raise FormatError(f"clip_ratios must be in (0, 1], got {clip_ratios!r}")


def weight_only(model: nn.Module, bits: int = 8, block_size: int | None = None, ignore=None,
                amax_method: str = "max", clip_ratios: tuple[float, ...] = MSE_CLIP_RATIOS,
                fold_bn: bool = True, *, method: str | None = None,
                batches: Iterable | None = None,
                forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                method_options: Mapping[str, Any] | None = None,
                embedding_bits: int | None = 8,
                progress: bool = True) -> list[Replacement]:
    """Quantize the weights of every Linear, Conv1d/2d/3d, LSTM and Embedding in place;
    activations stay float.

    Args:
        bits: 8 (INT8, one scale per output channel by default) or 4 (INT4).
        block_size: ``None`` for one scale per output channel, or ``B`` for one scale per
            ``B`` consecutive inputs (blocks along the input dimension: ``in_features``,
            ``in_channels / groups``, the LSTM input or hidden size). ``B`` must divide
            the input dimension of every layer quantized: the error lists those it does
            not, before anything changes (ignore them, or call again with another size;
            :func:`indivisible_weights` lists them).
        ignore: module names, compiled regexes or ``callable(name, module)``, as in
            :func:`qdq.replace_modules`.
        amax_method: ``"max"`` (the largest ``|w|`` of each channel or block) or ``"mse"``
            (the best of ``clip_ratios`` times that, by squared error).
        fold_bn: fold eval-mode BatchNorm into the conv before it first, so the weights
            quantized are the ones the folded ONNX graph runs.
        embedding_bits: bits of ``nn.Embedding`` tables, rounded to nearest whatever
            ``method`` is: a table is looked up, not multiplied, so nothing compensates
            its rounding, and INT8 keeps it nearly exact at a quarter of its size (the
            default, also in INT4 models, whose INT8 tables get one scale per row);
            otherwise blocks of ``block_size`` along a row. None: ``bits``.
        method: how the codes are chosen (:data:`WEIGHT_METHODS`; None: ``amax_method``).
            ``"max"``/``"mse"`` round each weight to nearest. ``"gptq"`` compensates
            rounding errors with the layer's calibration inputs (:mod:`qdq.gptq`; the grid
            per block follows ``amax_method``), ``"awq"`` scales input channels by their
            activations and searches clips (:mod:`qdq.awq`), ``"awq+gptq"`` does AWQ's
            scaling then GPTQ. Layers whose inputs cannot be read (LSTM, grouped or 3-d
            convs) or that the data never reaches fall back to ``amax_method``, with a
            warning.
        batches: calibration inputs for the data methods (tensors, ``(inputs, labels)``
            tuples or keyword dicts, as ``sensitivity.calibrate`` takes them).
        forward_fn: ``forward_fn(model, batch)`` for models with their own signature.
        method_options: :class:`qdq.gptq.GPTQConfig` / :class:`qdq.awq.AWQConfig` fields,
            e.g. ``{"act_order": True}``, and ``sequential`` (default True: each layer's
            statistics come from the model with the earlier layers already quantized, one
            pass over ``batches`` per layer or group of layers reading one input, each
            pass stopping once those layers have their inputs; False: float inputs, one
            pass per 256 MiB of ``X^T X``).

    Every layer records its ``method``, and AWQ layers their ``input_scale``, so
    ``qdq.save`` / ``qdq.restore`` rebuild them without data. Returns the replacements
    made. Example::

        weight_only(model, bits=4, block_size=128, ignore=["classifier"])
        weight_only(model2, 4, 128, method="gptq", batches=calib,
                    method_options={"act_order": True})
    """
    _check_weight_only_args(model, bits, block_size, amax_method, clip_ratios)
    if embedding_bits is not None and embedding_bits not in WEIGHT_BITS:
        raise FormatError(f"embedding_bits must be None or one of {WEIGHT_BITS}, got "
                          f"{embedding_bits!r}")
    method = amax_method if method is None else method
    if method not in WEIGHT_METHODS:
        raise FormatError(f"weight-only method {method!r}: choose one of "
                          f"{', '.join(WEIGHT_METHODS)}")
    if method in AMAX_METHODS:
        amax_method = method
    awq_config, gptq_config, sequential = _method_configs(method, method_options)
    data = _check_batches(method, batches) if method in _DATA_METHODS else None
    layers = weight_only_candidates(model, ignore)
    bad = [f"{name}.{wname} ({dim})"
           for name, wname, dim in indivisible_weights(model, block_size, ignore)]
    if bad:
        shown = ", ".join(bad[:8]) + (f" and {len(bad) - 8} more" if len(bad) > 8 else "")
        raise FormatError(f"block_size {block_size} does not divide the input dimension of "
                          f"{len(bad)} weight(s): {shown}; ignore those layers or choose "
                          "another block_size (None: one scale per output channel)")
    if fold_bn:
        from qdq.rules.fold import fold_batchnorm

        fold_batchnorm(model)
    tables = [(n, m) for n, m in layers if isinstance(m, nn.Embedding)]
    rest = [(n, m) for n, m in layers if not isinstance(m, nn.Embedding)]
    if data is not None:
        rest = _calibrated(model, rest, bits, block_size, amax_method, tuple(clip_ratios),
                           method, data, forward_fn or feed_batch, awq_config, gptq_config,
                           sequential, progress)
    for name, layer in rest:
        cls = twin_class(layer, WEIGHT_ONLY_TWINS)
        _put(model, name, cls.from_float(layer, bits, block_size, amax_method,
                                         tuple(clip_ratios)))
    table_bits = embedding_bits or bits
    for name, table in tables:
        cls = twin_class(table, WEIGHT_ONLY_TWINS)
        # INT8 tables of an INT4 model: one scale per row (the INT4 blocks would only add
        # scales to store); otherwise the model's own block size
        table_block = None if (table_bits, bits) == (8, 4) else block_size
        _put(model, name, cls.from_float(table, table_bits, table_block, amax_method,
                                         tuple(clip_ratios)))
    return [Replacement(name, type(layer).__name__,
                        twin_class(layer, WEIGHT_ONLY_TWINS).__name__) for name, layer in layers]


def _put(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, attr, module)


# ------------------------------------------------------- weight-only from calibration data
def _on_device(forward: Callable[[nn.Module, Any], Any], model: nn.Module):
    device = next((t.device for t in [*model.parameters(), *model.buffers()]),
                  torch.device("cpu"))

    def run(m: nn.Module, batch: Any) -> Any:
        return forward(m, to_device(batch, device))
    return run


@torch.no_grad()
def _input_groups(model: nn.Module, layers: list[tuple[str, nn.Module]], batch: Any,
                  forward: Callable[[nn.Module, Any], Any]) -> list[list[tuple[str, nn.Module]]]:
    """``layers`` in the order the model first calls them, consecutive layers that read
    the very same input tensor (q/k/v) in one group; layers never called come last,
    alone."""
    order: list[int] = []
    groups: list[list[int]] = []
    last: list[Any] = [None]

    def hook(i: int):
        def record(module, args, kwargs):
            if i in order:
                return
            x = args[0] if args else kwargs.get("input")
            if groups and x is not None and x is last[0]:
                groups[-1].append(i)
            else:
                groups.append([i])
            order.append(i)
            last[0] = x
        return record

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, (_, m) in enumerate(layers)]
    try:
        forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    last[0] = None
    groups += [[i] for i in range(len(layers)) if i not in order]
    return [[layers[i] for i in g] for g in groups]


def _quantized_layer(name: str, module: nn.Module, stats: InputStatistics, bits: int,
                     block_size: int | None, amax_method: str, clip_ratios: tuple[float, ...],
                     method: str, awq_config: AWQConfig | None,
                     gptq_config: GPTQConfig | None, input_scale: torch.Tensor | None
                     ) -> nn.Module:
    """The weight-only layer for ``module`` from its input statistics."""
    weight = module.weight.detach()
    if gptq_config is not None:
        codes, scale = gptq_quantize(weight, stats.hessian(), bits, block_size, amax_method,
                                     clip_ratios, gptq_config)
    elif awq_config.clip_ratios:
        amax = search_clip(to_matrix(weight), stats.hessian(), bits, block_size,
                           awq_config.clip_ratios)
        amax = matrix_scale_to_layout(amax, weight.shape, block_size)
        codes, scale = quantize_with_amax(weight, amax, bits, block_size)
    else:
        weight_q = QuantizedWeight.from_weight(weight, bits, block_size, amax_method,
                                               clip_ratios)
        codes, scale = weight_q.codes, weight_q.scale
    cls = twin_class(module, WEIGHT_ONLY_TWINS)
    weight_q = QuantizedWeight(codes.to(weight.device), scale.to(weight.device), bits,
                               block_size, weight.dtype)
    return cls.from_quantized(module, weight_q, method, input_scale)


def _chunks(groups: list[list[tuple[str, nn.Module]]], sequential: bool
            ) -> list[list[list[tuple[str, nn.Module]]]]:
    """Groups read in one calibration pass: one each when ``sequential``, else as many
    consecutive groups as fit :data:`STATISTICS_BYTES` of ``X^T X``."""
    if sequential:
        return [[g] for g in groups]
    chunks: list[list] = []
    used = STATISTICS_BYTES + 1
    for group in groups:
        size = sum(4 * to_matrix(m.weight).shape[1] ** 2 for _, m in group)
        if used + size > STATISTICS_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append(group)
        used += size
    return chunks


class _StandIns:
    """While later layers are calibrated, a quantized float layer keeps running with its
    dequantized weight in place of the float one (no dequantization per call); the
    weight-only layers go in at the end, and the float weights come back on failure."""

    def __init__(self) -> None:
        self.saved: list[tuple[nn.Module, torch.Tensor]] = []
        self.made: list[tuple[str, nn.Module]] = []

    def add(self, name: str, module: nn.Module, new: nn.Module) -> None:
        self.saved.append((module, module.weight.data))
        module.weight.data = new.weight_q().to(module.weight.dtype)
        self.made.append((name, new))

    def undo(self) -> None:
        for module, data in self.saved:
            module.weight.data = data


def _calibrated(model: nn.Module, layers: list[tuple[str, nn.Module]], bits: int,
                block_size: int | None, amax_method: str, clip_ratios: tuple[float, ...],
                method: str, data: list, forward: Callable[[nn.Module, Any], Any],
                awq_config: AWQConfig | None, gptq_config: GPTQConfig | None,
                sequential: bool, progress: bool) -> list[tuple[str, nn.Module]]:
    """Replace the layers whose inputs can be read, in model order, one pass over the data
    per group (``sequential``: its statistics then come from the model with every earlier
    layer quantized) or per chunk of groups; returns the layers left for round to
    nearest."""
    readable = [(n, m) for n, m in layers if supports_statistics(m) is None]
    rest = [(n, m) for n, m in layers if supports_statistics(m) is not None]
    forward = _on_device(forward, model)
    was_training = model.training
    model.eval()
    report, stand_ins, unseen = AWQReport(), _StandIns(), []
    try:
        groups = _input_groups(model, readable, data[0], forward)
        if awq_config is not None:
            try:
                report = apply_scales(model, _chunks(groups, False), data, forward, bits,
                                      block_size, amax_method, clip_ratios, awq_config,
                                      progress)
            except ValueError as err:
                raise FormatError(f"weight-only {method}: {err}") from None
        for chunk in tqdm(_chunks(groups, sequential), desc=f"weight-only {method}",
                          unit="pass", leave=False, disable=not progress):
            members = [layer for group in chunk for layer in group]
            stats = collect_statistics(model, [m for _, m in members], data, forward)
            for (name, module), st in zip(members, stats, strict=True):
                if st.rows == 0:
                    unseen.append((name, module))
                    continue
                stand_ins.add(name, module, _quantized_layer(
                    name, module, st, bits, block_size, amax_method, clip_ratios, method,
                    awq_config, gptq_config, report.input_scales.get(id(module))))
        for name, new in stand_ins.made:
            _put(model, name, new)
    except BaseException:
        stand_ins.undo()
        raise
    finally:
        report.remove_hooks()
        model.train(was_training)
    fallback = [f"{n} ({supports_statistics(m)})" for n, m in rest]
    fallback += [f"{n} (the calibration data never reaches it)" for n, _ in unseen]
    if fallback:
        warnings.warn(f"weight-only {method}: {len(fallback)} layer(s) rounded to nearest "
                      f"({amax_method}) instead: {'; '.join(fallback[:6])}", stacklevel=3)
    return rest + unseen


# ------------------------------------------------------------- GPTQ for Q/DQ weights
def _gptq_target(module: nn.Module) -> str | None:
    """None when GPTQ can choose ``module``'s Q/DQ weights; else why not."""
    q = getattr(module, "_weight_quantizer", None)
    if not isinstance(q, TensorQuantizer) or not isinstance(module, (nn.Linear, nn.Conv1d,
                                                                     nn.Conv2d)):
        return "not a quantized Linear/Conv1d/Conv2d"
    if not q.is_quant_enabled:
        return "its weight quantizer is off"
    if q.is_fp8 or q.num_bits != 8 or q.unsigned or q.axis not in (0, (0,)):
        return ("GPTQ here chooses INT8 codes per output channel; the weight quantizer is "
                f"{q.extra_repr().split(' amax')[0]}")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups != 1:
        return f"grouped convolution (groups={module.groups})"
    return None


@torch.no_grad()
def gptq_weights(model: nn.Module, batches: Iterable, *,
                 method_options: Mapping[str, Any] | None = None,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None) -> list[str]:
    """GPTQ for the weights of an INT8 Q/DQ model, in place: each quant Linear/Conv's
    weight becomes the dequantized GPTQ codes (per output channel, from the Hessian of the
    input the weight sees, after any SmoothQuant ``input_scale``), and its weight
    quantizer's amax ``127 x`` GPTQ's scale, so fake quantization and the exported
    QuantizeLinear reproduce GPTQ's codes exactly. Activation quantizers are untouched
    (calibrate them before or after). ``method_options``: :class:`qdq.gptq.GPTQConfig`
    fields. Returns the layers done; FP8 weight quantizers are refused (GPTQ's grid here is
    integer), other layers are left as they are.
    """
    config = GPTQConfig(**dict(method_options or {}))
    layers = [(name, m) for name, m in model.named_modules() if _gptq_target(m) is None]
    fp8 = [name for name, m in model.named_modules()
           if isinstance(getattr(m, "_weight_quantizer", None), TensorQuantizer)
           and m._weight_quantizer.is_fp8]
    if fp8:
        raise FormatError(f"gptq_weights: {fp8[0]} has an FP8 weight quantizer; GPTQ here "
                          "chooses integer codes (INT8 Q/DQ models, or weight_only)")
    if not layers:
        raise FormatError("gptq_weights: no quant Linear/Conv with an enabled INT8 "
                          "per-channel weight quantizer")
    data = _check_batches("gptq", batches)
    with disable_quantization(model):
        stats = collect_statistics(model, [m for _, m in layers], data,
                                   _on_device(forward_fn or feed_batch, model))
    for (_, layer), st in zip(layers, stats, strict=True):
        h = st.hessian()
        pre = layer._buffers.get("input_scale")
        if pre is not None:  # the weight multiplies x * input_scale
            pre = pre.to(h)
            h = pre.reshape(-1, 1) * h * pre.reshape(1, -1)
        codes, scale = gptq_quantize(layer.weight, h, 8, None, "max", config=config)
        layer.weight.copy_(dequantize_weight(codes, scale).to(layer.weight.dtype))
        layer._weight_quantizer.amax = (scale.float() * 127).reshape(
            [-1] + [1] * (layer.weight.dim() - 1))
    return [name for name, _ in layers]


# ---------------------------------------------------------------------------- dispatch
def apply_format(model: nn.Module, name: str | Format, **options) -> list[Replacement] | int:
    """Put ``model`` in format ``name``: :func:`set_format` for ``int8``/``fp8`` (a model
    with quantizers), :func:`weight_only` for ``w8``/``w4`` (a float model; ``options``
    go to it)."""
    fmt = get_format(name)
    if fmt.weight_only:
        return weight_only(model, bits=fmt.weight_bits, **options)
    if options:
        raise FormatError(f"{fmt.name} takes no options, got {sorted(options)}")
    return set_format(model, fmt)


def format_of(model: nn.Module) -> str:
    """The name of the format ``model`` is in: one of :data:`FORMATS`, ``"float"`` (nothing
    quantized) or ``"mixed"`` (quantizers of several kinds, or quantizers and
    weight-only layers together). Embedding tables, INT8 by default in both weight-only
    formats, count only in a model with no other weight-only layer."""
    kinds = {"w8" if w.bits == 8 else "w4" for w in _format_weights(model)}
    for _, q in quantizers(model):
        if q.is_enabled:
            kinds.add("fp8" if q.is_fp8 else "int8" if q.num_bits == 8 else f"int{q.num_bits}")
    if not kinds:
        return "float"
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed"


def _deciding_layers(model: nn.Module) -> list[WeightOnlyLayer]:
    """The weight-only layers that say a model's format and method: all but the embedding
    tables (INT8 and rounded to nearest by default), or the tables when there is nothing
    else."""
    layers = [m for m in model.modules() if isinstance(m, WeightOnlyLayer)]
    return [m for m in layers if not isinstance(m, WeightOnlyEmbedding)] or layers


def _format_weights(model: nn.Module) -> list[QuantizedWeight]:
    return [w for m in _deciding_layers(model) for w in m.modules()
            if isinstance(w, QuantizedWeight)]


def weight_method_of(model: nn.Module) -> str | None:
    """How the weight-only layers of ``model`` got their codes (one of
    :data:`WEIGHT_METHODS`), ``"mixed"`` if they differ, None without such layers."""
    methods = {getattr(m, "method", "max") for m in _deciding_layers(model)}
    if not methods:
        return None
    return methods.pop() if len(methods) == 1 else "mixed"
