"""The placement rules, each a small registered function (see :mod:`qdq.rules.registry`).

Graph rewrites (run first):

- ``attention``: ``nn.MultiheadAttention`` -> :class:`QuantMultiheadAttention` (quantized
  projections, ``q @ k^T`` and ``attn @ v`` through ``QuantMatMul``).
- ``residual_add``: an add with one input coming from a quantized Conv/ConvTranspose
  (possibly through BatchNorm, ReLU, dropout or stochastic depth) becomes
  ``QuantAdd`` with only the other, identity input quantized; the conv side stays float
  so TensorRT fuses the add into the conv. When both inputs come from convs the second
  one is quantized.
- ``matmul``: ``torch.matmul``/``bmm``/``@`` -> ``QuantMatMul`` (both operands).
- ``concat``: ``torch.cat`` -> ``QuantConcat`` (one quantizer for every input).

Ties (run after the rewrites; one quantizer object per group):

- ``concat_shared``: a concat's quantizer and every quantizer reading its output.
- ``maxpool_shared``: a max pool's input quantizer and every quantizer reading its output.
- ``same_tensor``: quantizers that read the same tensor (up to reshapes, flatten,
  dropout and other ops in ``graph.TRANSPARENT``, which commute with Q/DQ exactly).

ReLU, average pooling and activations are not treated as commuting: their output range
differs from their input's, so tying would widen the scale on one side.

A concat or a residual identity fed by a nearest-neighbour upsample (an FPN's top-down
add, a YOLO neck's concat) is quantized too, and its quantizer also reads the upsample's
input: nearest resizing commutes with Q/DQ exactly, so the function is the same and
TensorRT runs the resize in INT8 with that scale. After other resizes (bilinear,
grid_sample) the concat or identity is quantized after the resize only.

``maxpool``: a functional max pool (``F.max_pool2d``) becomes a ``QuantMaxPool2d``, so
``maxpool_shared`` ties it like the module form.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdq.nn.functional import QuantAdd, QuantConcat, QuantMatMul
from qdq.nn.pooling import QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
from qdq.rules.attention import swap_attention
from qdq.rules.graph import (
    ADD,
    CAT,
    CONV_WEIGHTED,
    FUSIBLE,
    MATMUL,
    MAXPOOL,
    RESIZE,
    TRANSPARENT,
    is_tensor,
    matches,
    module_of,
    producer,
    sites,
)
from qdq.rules.registry import RuleContext, register_rule

__all__ = ["from_weighted_layer"]


def _nearest_resize(ctx: RuleContext, node) -> fx.Node | None:
    """The resize producing ``node`` when it is nearest-neighbour (commutes with Q/DQ)."""
    src = producer(ctx.gm, node)
    if not isinstance(src, fx.Node) or not matches(ctx.gm, src, RESIZE) or not src.args:
        return None
    if src.op == "call_module":
        module = module_of(ctx.gm, src)
        nearest = isinstance(module, nn.UpsamplingNearest2d) or (
            type(module) is nn.Upsample and module.mode == "nearest")
        return src if nearest else None
    if src.target in (F.interpolate, F.upsample):
        mode = src.kwargs.get("mode", src.args[3] if len(src.args) > 3 else "nearest")
        return src if mode == "nearest" else None
    return None


def _quantize_first_input(ctx: RuleContext, node: fx.Node, q, stem: str) -> None:
    """``node`` reads its first argument through ``q`` (an existing quantizer: a tie)."""
    target = ctx.add_module(node, stem, q)
    with ctx.gm.graph.inserting_before(node):
        quantized = ctx.gm.graph.call_module(target, (node.args[0],))
    node.update_arg(0, quantized)


def from_weighted_layer(ctx: RuleContext, node) -> bool:
    """Whether ``node`` is the output of a quantized Conv/ConvTranspose, up to fusible ops.

    Linear and attention outputs do not count: TensorRT's guidance to quantize a residual
    identity is for the Add it fuses into a convolution, and in a transformer the identity
    is the residual stream, whose INT8 copy costs accuracy (all-MiniLM-L6-v2, every Linear
    INT8 with SmoothQuant: min cosine 0.996 with the stream in float, 0.982 quantized).
    """
    src = producer(ctx.gm, node, FUSIBLE)
    if not isinstance(src, fx.Node):
        return False
    module = module_of(ctx.gm, src)
    return isinstance(module, CONV_WEIGHTED) and module._weight_quantizer.is_enabled


def _replace_call(ctx: RuleContext, node: fx.Node, stem: str, module, args: tuple) -> fx.Node:
    target = ctx.add_module(node, stem, module)
    with ctx.gm.graph.inserting_before(node):
        new = ctx.gm.graph.call_module(target, args)
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    ctx.gm.graph.erase_node(node)
    return new


def _binary_args(node: fx.Node) -> tuple | None:
    """``(a, b)`` for a plain two-tensor call, or None (alpha=, out=, scalars...)."""
    if node.kwargs and set(node.kwargs) - {"other"}:
        return None
    args = list(node.args) + ([node.kwargs["other"]] if "other" in node.kwargs else [])
    if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
        return None
    if any(is_tensor(a) is False for a in args):
        return None
    return tuple(args)


@register_rule("attention")
def _attention(ctx: RuleContext) -> int:
    swapped, skipped = swap_attention(ctx.gm)
    for name, why in skipped:
        ctx.notes.append(f"attention: {ctx.qualify(name)} left as is ({why})")
    return len(swapped)


@register_rule("residual_add")
def _residual_add(ctx: RuleContext) -> int:
    changed = 0
    for node in list(ctx.gm.graph.nodes):
        if not matches(ctx.gm, node, ADD):
            continue
        args = _binary_args(node)
        if args is None:
            continue
        weighted = [from_weighted_layer(ctx, a) for a in args]
        if not any(weighted):
            continue
        identity = 1 if weighted[0] else 0  # both from convs: quantize the second
        resize = _nearest_resize(ctx, args[identity])
        add = QuantAdd()
        conv_side = add._other_quantizer if identity == 0 else add._input_quantizer
        conv_side.disable()
        conv_side.placed_by = "residual_add"
        quantized = add._input_quantizer if identity == 0 else add._other_quantizer
        quantized.placed_by = "residual_add"
        _replace_call(ctx, node, "residual_add", add, args)
        if resize is not None:  # an FPN's top-down path: the identity's scale before it too
            _quantize_first_input(ctx, resize, quantized, "resize_quantizer")
        changed += 1
    return changed


@register_rule("matmul")
def _matmul(ctx: RuleContext) -> int:
    changed = 0
    for node in list(ctx.gm.graph.nodes):
        if not matches(ctx.gm, node, MATMUL):
            continue
        args = _binary_args(node)
        if args is None:
            continue
        mm = QuantMatMul()
        mm._input_quantizer.placed_by = mm._other_quantizer.placed_by = "matmul"
        _replace_call(ctx, node, "matmul", mm, args)
        changed += 1
    return changed


def _cat_args(node: fx.Node) -> tuple[list, int] | None:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        return None
    if not tensors or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    if any(is_tensor(t) is False for t in tensors):
        return None
    return list(tensors), dim


@register_rule("concat")
def _concat(ctx: RuleContext) -> int:
    changed = 0
    for node in list(ctx.gm.graph.nodes):
        if not matches(ctx.gm, node, CAT):
            continue
        parsed = _cat_args(node)
        if parsed is None:
            continue
        tensors, dim = parsed
        resizes = [r for r in (_nearest_resize(ctx, t) for t in tensors) if r is not None]
        cat = QuantConcat(dim=dim)
        cat._input_quantizer.placed_by = "concat"
        _replace_call(ctx, node, "concat", cat, (tensors,))
        for resize in dict.fromkeys(resizes):  # the same scale before the resize: INT8
            _quantize_first_input(ctx, resize, cat._input_quantizer, "resize_quantizer")
        changed += 1
    return changed


#: functional max pools -> the module twin that runs them with a quantized input
_MAXPOOL_CALLS = {F.max_pool1d: QuantMaxPool1d, F.max_pool2d: QuantMaxPool2d,
                  F.max_pool3d: QuantMaxPool3d, torch.max_pool1d: QuantMaxPool1d,
                  torch.max_pool2d: QuantMaxPool2d, torch.max_pool3d: QuantMaxPool3d}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode",
              "return_indices")


@register_rule("maxpool")
def _maxpool(ctx: RuleContext) -> int:
    """``F.max_pool2d(x, ...)`` (inception's reduction blocks) becomes a QuantMaxPool2d,
    so its input is quantized and ``maxpool_shared`` ties it to its readers."""
    changed = 0
    for node in list(ctx.gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MAXPOOL_CALLS:
            continue
        bound = dict(zip(_POOL_ARGS, node.args, strict=False)) | dict(node.kwargs)
        if bound.get("return_indices") or not isinstance(bound.get("input"), fx.Node):
            continue
        values = [bound.get(k) for k in _POOL_ARGS[1:6]]
        if any(isinstance(v, fx.Node) for v in values) or values[0] is None:
            continue
        kernel, stride, padding, dilation, ceil_mode = values
        pool = _MAXPOOL_CALLS[node.target](
            kernel, stride if stride not in (None, [], ()) else None,
            0 if padding is None else padding, 1 if dilation is None else dilation,
            ceil_mode=bool(ceil_mode))
        pool._input_quantizer.placed_by = "maxpool"
        _replace_call(ctx, node, "maxpool", pool, (bound["input"],))
        changed += 1
    return changed


def _tie_readers(ctx: RuleContext, kinds: tuple, rule: str) -> int:
    """Tie the input quantizer of each ``kinds`` node to the quantizers reading its output."""
    all_sites = sites(ctx.gm)
    tied = 0
    for node in ctx.gm.graph.nodes:
        module = module_of(ctx.gm, node)
        if not isinstance(module, kinds) or not module._input_quantizer.is_enabled:
            continue
        for site in all_sites:
            if producer(ctx.gm, site.source) is node:
                tied += ctx.tie(module._input_quantizer, site.quantizer, rule)
    return tied


@register_rule("concat_shared")
def _concat_shared(ctx: RuleContext) -> int:
    return _tie_readers(ctx, (QuantConcat,), "concat_shared")


@register_rule("maxpool_shared")
def _maxpool_shared(ctx: RuleContext) -> int:
    return _tie_readers(ctx, MAXPOOL, "maxpool_shared")


@register_rule("same_tensor")
def _same_tensor(ctx: RuleContext) -> int:
    by_source: dict[fx.Node, list] = {}
    for site in sites(ctx.gm):
        by_source.setdefault(producer(ctx.gm, site.source, TRANSPARENT), []).append(site)
    tied = 0
    for group in by_source.values():
        for site in group[1:]:
            tied += ctx.tie(group[0].quantizer, site.quantizer, "same_tensor")
    return tied
