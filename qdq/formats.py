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
* Weight-only formats: :func:`weight_only` swaps Linear, Conv and LSTM layers of a float
  model for layers holding integer weights (:mod:`qdq.nn.weight_only`); no calibration.

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

from dataclasses import dataclass

from torch import nn

from qdq.blockwise import AMAX_METHODS, MSE_CLIP_RATIOS, WEIGHT_BITS
from qdq.fp8 import FP8_E4M3
from qdq.nn.weight_only import WEIGHT_ONLY_TWINS, QuantizedWeight
from qdq.quantizer import TensorQuantizer
from qdq.replace import Replacement, _ignore_predicate, name_quantizers, quantizers

__all__ = ["Format", "FORMATS", "FormatError", "get_format", "set_format", "weight_only",
           "weight_only_candidates", "indivisible_weights", "apply_format", "format_of"]


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
            if type(child) in WEIGHT_ONLY_TWINS:
                found.append((name, child))
                continue
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
            for wname, w in WEIGHT_ONLY_TWINS[type(layer)].weights_of(layer).items()
            if w.shape[1] % block_size]


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
                fold_bn: bool = True) -> list[Replacement]:
    """Quantize the weights of every Linear, Conv1d/2d/3d and LSTM in place; activations
    stay float.

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

    Returns the replacements made. Example::

        weight_only(model, bits=4, block_size=128, ignore=["classifier"])
    """
    _check_weight_only_args(model, bits, block_size, amax_method, clip_ratios)
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
    done: list[Replacement] = []
    for name, layer in layers:
        cls = WEIGHT_ONLY_TWINS[type(layer)]
        new = cls.from_float(layer, bits, block_size, amax_method, tuple(clip_ratios))
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
        done.append(Replacement(name, type(layer).__name__, cls.__name__))
    return done


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
    weight-only layers together)."""
    kinds = set()
    for module in model.modules():
        if isinstance(module, QuantizedWeight):
            kinds.add("w8" if module.bits == 8 else "w4")
    for _, q in quantizers(model):
        if q.is_enabled:
            kinds.add("fp8" if q.is_fp8 else "int8" if q.num_bits == 8 else f"int{q.num_bits}")
    if not kinds:
        return "float"
    if len(kinds) == 1:
        return kinds.pop()
    return "mixed"
