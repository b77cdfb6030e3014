"""``check_qdq``: what in a Q/DQ ONNX graph TensorRT will reject (errors) or run slowly (warnings).

Each rule is a function registered under a name and a severity; it receives the graph
context and yields ``(node, message)`` pairs. Rules:

=====================  ========  ==========================================================
rule                   severity  finds
=====================  ========  ==========================================================
opset                  error     default-domain opset below 13 (no per-axis Q/DQ), below
                                 19 with FP8 Q/DQ, below 21 with INT4 or block-wise DQ
zero-point             error     a zero point that is unsigned, missing (uint8), non-zero,
                                 or of a type other than int8, float8e4m3fn (FP8) or
                                 int4 (weights)
scale                  error     a scale that is not a constant, not positive or not finite
per-axis-activation    error     per-axis quantization of a computed tensor
weight-axis            error     per-axis weight with the wrong axis (Conv/Gemm 0, ConvT 1);
                                 block-wise weight not blocked along the input axis
q-without-dq           error     a QuantizeLinear not followed by DequantizeLinear
int4-conv              error     an INT4 (any sub-8-bit) or block-wise weight DequantizeLinear
                                 feeding a Conv/ConvTranspose weight: TensorRT runs such
                                 weights only in MatMul/Gemm (weight-only), no conv kernel
float-input            warning   Conv/ConvTranspose/Gemm/MatMul input that is not from a DQ
                                 (data inputs of weight-only graphs are float by design)
residual-add           warning   Add of a quantized conv branch and an unquantized input
shared-scale           warning   Concat/MaxPool whose inputs and output have other scales
=====================  ========  ==========================================================

A scale gathered (``Gather`` on axis 0) from a constant table counts as constant for the
``scale`` rule: that is a weight-only embedding dequantized after its lookup
(:func:`export.formats.lower_weight_dq`). ONNX Runtime runs it; TensorRT documents
DequantizeLinear scales as build-time constants, so for TensorRT export such tables with
``to_onnx(..., gather_first=False)`` (whole-table DQ with a constant scale, then Gather).

Example::

    findings = check_qdq("model.onnx")
    errors = [f for f in findings if f.severity == "error"]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx

from export.formats import is_fp8_dtype, is_int4_dtype
from export.onnx_io import OnnxFileError, constant_values, consumers, load_onnx, opset_of, producers

__all__ = ["Finding", "LintError", "RULES", "check_qdq", "format_findings"]

ERROR, WARNING = "error", "warning"
#: ops that only move or retype data: a DQ behind them still feeds quantized values
PASS_THROUGH = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Squeeze", "Unsqueeze",
                          "Flatten"})
#: ops TensorRT wants quantized inputs for
HEAVY = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul"})


class LintError(OnnxFileError):
    """The file cannot be linted (missing or unreadable)."""


@dataclass(frozen=True)
class Finding:
    node: str
    rule: str
    severity: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity:<7} {self.rule:<20} {self.node}: {self.message}"


class _Graph:
    """What the rules read: the graph with its constants, producers and consumers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.graph = model.graph
        self.consts = constant_values(model.graph)
        self.producer = producers(model.graph)
        self.consumer = consumers(model.graph)

    def nodes(self, *ops: str) -> Iterator[onnx.NodeProto]:
        return (n for n in self.graph.node if n.op_type in ops)

    def source(self, tensor: str) -> onnx.NodeProto | None:
        """The producer of ``tensor``, looking through data-movement ops."""
        node = self.producer.get(tensor)
        while node is not None and node.op_type in PASS_THROUGH and node.input:
            node = self.producer.get(node.input[0])
        return node

    def dq_scale(self, tensor: str) -> np.ndarray | None:
        """The scale of the DQ feeding ``tensor`` (through data-movement ops), if any."""
        node = self.source(tensor)
        if node is not None and node.op_type == "DequantizeLinear":
            return self.consts.get(node.input[1])
        return None

    def q_scale_after(self, tensor: str) -> np.ndarray | None:
        """The scale of a QuantizeLinear consuming ``tensor``, if one does."""
        for node in self.consumer.get(tensor, []):
            if node.op_type == "QuantizeLinear":
                return self.consts.get(node.input[1])
        return None

    def from_dq(self, tensor: str) -> bool:
        node = self.source(tensor)
        return node is not None and node.op_type == "DequantizeLinear"


Rule = Callable[[_Graph], Iterator[tuple[str, str]]]
#: rule name -> (severity, function)
RULES: dict[str, tuple[str, Rule]] = {}


def rule(name: str, severity: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        RULES[name] = (severity, fn)
        return fn

    return deco


def _label(node: onnx.NodeProto) -> str:
    return node.name or f"{node.op_type}({node.output[0] if node.output else '?'})"


def _axis(node: onnx.NodeProto) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def _attr(node: onnx.NodeProto, name: str, default: int = 0) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


# ------------------------------------------------------------------------------ rules
def _zp_of(g: _Graph, node: onnx.NodeProto) -> np.ndarray | None:
    return g.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None


def _needs_opset(g: _Graph) -> tuple[int, str]:
    """The opset the graph's Q/DQ nodes need, and the feature that needs it."""
    need, why = 13, "per-axis QuantizeLinear/DequantizeLinear"
    for node in g.nodes("QuantizeLinear", "DequantizeLinear"):
        source = g.consts.get(node.input[0])
        zp = _zp_of(g, node)
        if (_attr(node, "block_size") or (source is not None and is_int4_dtype(source))
                or (zp is not None and is_int4_dtype(zp))):
            return 21, f"{_label(node)} (INT4 or block-wise DequantizeLinear)"
        if zp is not None and is_fp8_dtype(zp) and need < 19:
            need, why = 19, f"{_label(node)} (FP8 E4M3 Q/DQ)"
    return need, why


@rule("opset", ERROR)
def _opset(g: _Graph):
    version = opset_of(g.model)
    need, why = _needs_opset(g)
    if version < need:
        yield "model", f"opset {version}: {why} needs opset {need} or newer"


@rule("zero-point", ERROR)
def _zero_point(g: _Graph):
    for node in g.nodes("QuantizeLinear", "DequantizeLinear"):
        if len(node.input) < 3 or not node.input[2]:
            if node.op_type == "QuantizeLinear":
                yield _label(node), "no zero point: the output defaults to uint8 (unsigned)"
            continue
        zp = g.consts.get(node.input[2])
        if zp is None:
            yield _label(node), f"zero point {node.input[2]!r} is not a constant"
        elif not (zp.dtype == np.int8 or is_fp8_dtype(zp) or is_int4_dtype(zp)):
            yield _label(node), (f"zero point is {zp.dtype}, TensorRT needs signed int8 "
                                 "(float8e4m3fn for FP8, int4 for INT4 weights)")
        elif np.any(zp.astype(np.float32) != 0):
            kind = "FP8 " if is_fp8_dtype(zp) else ""
            values = zp.astype(np.float32).reshape(-1)[:4].tolist()
            yield _label(node), f"non-zero {kind}zero point {values}; TensorRT needs 0"


def _gathered_scale_table(g: _Graph, node: onnx.NodeProto) -> np.ndarray | None:
    """The constant table a DQ's scale is gathered from (a weight-only embedding lookup
    dequantized after the Gather, :func:`export.formats.lower_weight_dq`), if it is."""
    gather = g.producer.get(node.input[1])
    if (node.op_type != "DequantizeLinear" or gather is None or gather.op_type != "Gather"
            or _attr(gather, "axis", 0) != 0):
        return None
    return g.consts.get(gather.input[0])


@rule("scale", ERROR)
def _scale(g: _Graph):
    for node in g.nodes("QuantizeLinear", "DequantizeLinear"):
        scale = g.consts.get(node.input[1])
        if scale is None:
            scale = _gathered_scale_table(g, node)
        if scale is None:
            yield _label(node), f"scale {node.input[1]!r} is not a constant"
            continue
        bad = ~np.isfinite(scale) | (scale <= 0)
        if np.any(bad):
            values = scale.reshape(-1)[bad.reshape(-1)][:4].tolist()
            yield _label(node), f"{int(bad.sum())} scale value(s) not positive and finite: {values}"


@rule("per-axis-activation", ERROR)
def _per_axis_activation(g: _Graph):
    for node in g.nodes("QuantizeLinear"):
        scale = g.consts.get(node.input[1])
        if node.input[0] not in g.consts and scale is not None and scale.size > 1:
            yield _label(node), (f"activation {node.input[0]!r} is quantized per axis "
                                 f"({scale.size} scales); TensorRT needs one scale")


def _weight_axes(op: onnx.NodeProto) -> tuple[int, int] | None:
    """(output-channel axis, input axis) of a layer's weight: per-channel scales run along
    the first, blocks along the second."""
    if op.op_type == "Conv":
        return 0, 1
    if op.op_type == "ConvTranspose":
        return 1, 0
    if op.op_type == "Gemm":
        trans_b = next((a.i for a in op.attribute if a.name == "transB"), 0)
        return (0, 1) if trans_b else (1, 0)
    return None


@rule("weight-axis", ERROR)
def _weight_axis(g: _Graph):
    for dq in g.nodes("DequantizeLinear"):
        scale = g.consts.get(dq.input[1])
        if scale is None or scale.size <= 1:
            continue
        blocked = _attr(dq, "block_size") > 0
        for user in _users_through(g, dq.output[0]):
            op, index = user
            axes = _weight_axes(op)
            if index != 1 or axes is None:
                continue
            want = axes[1] if blocked else axes[0]
            axis = _axis(dq)
            rank = _rank_of(g, dq)
            if rank:
                axis %= rank
            if axis != want:
                kind, axes = (("block-wise", "inputs") if blocked
                              else ("per-channel", "output channels"))
                yield _label(dq), (f"{kind} weight of {op.op_type} {_label(op)!r} on axis "
                                   f"{axis}; its {axes} are axis {want}")


def _rank_of(g: _Graph, dq: onnx.NodeProto) -> int | None:
    source = dq.input[0]
    if source in g.consts:
        return g.consts[source].ndim
    q = g.producer.get(source)
    if q is not None and q.op_type == "QuantizeLinear" and q.input[0] in g.consts:
        return g.consts[q.input[0]].ndim
    return None


_RELABEL = frozenset({"Identity", "Cast"})


def _users_through(g: _Graph, tensor: str, through: frozenset[str] = _RELABEL
                   ) -> Iterator[tuple[onnx.NodeProto, int]]:
    """(consumer, input index) of ``tensor``, looking through the ops in ``through``
    that take it as their data input (Identity/Cast by default)."""
    for node in g.consumer.get(tensor, []):
        if node.op_type in through and node.input and node.input[0] == tensor:
            yield from _users_through(g, node.output[0], through)
        else:
            for index, name in enumerate(node.input):
                if name == tensor:
                    yield node, index


@rule("q-without-dq", ERROR)
def _q_without_dq(g: _Graph):
    outputs = {o.name for o in g.graph.output}
    for node in g.nodes("QuantizeLinear"):
        users = g.consumer.get(node.output[0], [])
        others = sorted({u.op_type for u in users if u.op_type != "DequantizeLinear"})
        if not users or others or node.output[0] in outputs:
            what = f"feeds {', '.join(others)}" if others else "has no DequantizeLinear after it"
            yield _label(node), f"QuantizeLinear {what}; TensorRT needs Q -> DQ pairs"


def _low_bit_weight(g: _Graph, dq: onnx.NodeProto) -> str | None:
    """``"INT4"`` (any type narrower than 8 bits) or ``"block-wise"`` when a
    DequantizeLinear is one TensorRT runs only as weight-only MatMul/Gemm; else None."""
    codes, zp = g.consts.get(dq.input[0]), _zp_of(g, dq)
    for array in (codes, zp):
        if array is not None and str(array.dtype) in _SUB_BYTE:
            return "INT4" if str(array.dtype) in ("int4", "uint4") else str(array.dtype)
    return "block-wise" if _attr(dq, "block_size") > 0 else None


#: element types narrower than a byte (numpy names, as onnx's numpy_helper gives them)
_SUB_BYTE = frozenset({"int4", "uint4", "float4_e2m1fn"})


@rule("int4-conv", ERROR)
def _int4_conv(g: _Graph):
    for dq in g.nodes("DequantizeLinear"):
        kind = _low_bit_weight(g, dq)
        if kind is None:
            continue
        for op, index in _users_through(g, dq.output[0], PASS_THROUGH):
            if op.op_type in ("Conv", "ConvTranspose") and index == 1:
                yield _label(op), (f"{kind} weight from {_label(dq)!r}: TensorRT runs INT4 "
                                   "and block-wise weights only in MatMul/Gemm layers, it "
                                   f"has no such {op.op_type}; keep this layer in float, or "
                                   "quantize it as INT8 Q/DQ (weight and input)")


@rule("float-input", WARNING)
def _float_input(g: _Graph):
    weight_only = not any(n.input[0] not in g.consts for n in g.nodes("QuantizeLinear"))
    for node in g.nodes(*HEAVY):
        if weight_only and g.from_dq(node.input[1] if len(node.input) > 1 else ""):
            continue  # activations are float by design; the weight is quantized
        count = 2
        for index, name in enumerate(node.input[:count]):
            if name and not g.from_dq(name):
                what = "data" if index == 0 else "weight"
                yield _label(node), (f"{node.op_type} {what} input {name!r} is not quantized; "
                                     "TensorRT runs the layer in float")


def _quantized_conv_branch(g: _Graph, tensor: str) -> bool:
    node = g.producer.get(tensor)
    while node is not None and node.op_type in ("BatchNormalization", "Identity"):
        node = g.producer.get(node.input[0])
    return (node is not None and node.op_type in ("Conv", "ConvTranspose")
            and g.from_dq(node.input[0]))


@rule("residual-add", WARNING)
def _residual_add(g: _Graph):
    for node in g.nodes("Add"):
        if len(node.input) != 2 or any(i in g.consts for i in node.input):
            continue
        a, b = node.input
        if g.from_dq(a) or g.from_dq(b):
            continue
        if _quantized_conv_branch(g, a) or _quantized_conv_branch(g, b):
            identity = b if _quantized_conv_branch(g, a) else a
            yield _label(node), (f"residual input {identity!r} is not quantized, so TensorRT "
                                 "cannot fuse the Add into the quantized conv")


@rule("shared-scale", WARNING)
def _shared_scale(g: _Graph):
    for node in g.nodes("Concat", "MaxPool"):
        inputs = [i for i in node.input if i and i not in g.consts]
        scales = [g.dq_scale(i) for i in inputs]
        known = [float(s.reshape(-1)[0]) for s in scales if s is not None and s.size == 1]
        after = g.q_scale_after(node.output[0])
        if after is not None and after.size == 1:
            known.append(float(after.reshape(-1)[0]))
        if known and len(known) < len(inputs) + (after is not None) and any(
                s is None for s in scales):
            unquantized = [i for i, s in zip(inputs, scales, strict=True) if s is None]
            yield _label(node), (f"{node.op_type} mixes quantized and float inputs "
                                 f"({', '.join(unquantized[:3])} float)")
        elif len(known) > 1 and not np.allclose(known, known[0], rtol=1e-6, atol=0):
            shown = ", ".join(f"{s:.4g}" for s in dict.fromkeys(known))
            yield _label(node), (f"{node.op_type} inputs and output carry different scales "
                                 f"({shown}); TensorRT adds reformat layers")


# -------------------------------------------------------------------------------- API
def check_qdq(model: str | os.PathLike | onnx.ModelProto,
              rules: list[str] | None = None) -> list[Finding]:
    """Run every rule (or those named in ``rules``) and return the findings, errors first."""
    proto = load_onnx(model, error=LintError)
    unknown = sorted(set(rules or []) - set(RULES))
    if unknown:
        raise LintError(f"unknown lint rule(s) {unknown}; known: {sorted(RULES)}")
    g = _Graph(proto)
    findings = []
    for name, (severity, fn) in RULES.items():
        if rules is not None and name not in rules:
            continue
        findings += [Finding(node, name, severity, message) for node, message in fn(g)]
    return sorted(findings, key=lambda f: f.severity != ERROR)


def format_findings(findings: list[Finding]) -> str:
    if not findings:
        return "no findings: the Q/DQ placement looks right for TensorRT"
    errors = sum(f.severity == ERROR for f in findings)
    lines = [str(f) for f in findings]
    lines.append(f"{errors} error(s), {len(findings) - errors} warning(s)")
    return "\n".join(lines)
