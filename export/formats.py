"""The ONNX side of the formats beyond INT8: weight-only DQ, packed INT4, FP8 weights, opsets,
and how big the weights are.

* Weight-only layers (:mod:`qdq.nn.weight_only`) trace to one placeholder node per weight
  (domain ``qdq.weight_only``, op ``WeightDQ``, inputs: int8 codes and fp32 scales).
  :func:`lower_weight_dq` turns each into a standard ``DequantizeLinear`` on an integer
  initializer: opset 13 with ``axis=0`` for INT8 per channel; opset 21 with
  ``block_size`` (``axis=1``) and/or an INT4 initializer packed two values per byte (low
  nibble first) otherwise. No QuantizeLinear is left for weights.
* A weight read by one ``Gather`` (a weight-only embedding table,
  :mod:`qdq.nn.weight_only_embedding`) is dequantized after the lookup where the opset
  allows it (21 or newer): ``Gather`` of the integer table (``Cast`` to int8 first for
  INT4, which Gather does not take) and of its scales, then one block-wise
  DequantizeLinear on the last axis, so only the rows looked up are dequantized. Before
  opset 21, or with ``gather_first=False``, the whole table is dequantized, then gathered
  (a DequantizeLinear on a constant with a constant scale: what TensorRT documents).
* FP8 weights stored as ``float8e4m3fn`` initializers (``to_onnx(int8_weights=True)`` on
  an FP8 model): :func:`fp8_initializer`.
* :func:`onnx_format` reads back which format a graph is in; :func:`weight_bytes` what
  its quantized weights take and would take in fp32.

Example::

    proto = onnx.load("w4.onnx")
    onnx_format(proto)          # 'w4'
    weight_bytes(proto)         # (stored, fp32) bytes of the quantized weights
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from export.onnx_io import constant_values, consumers, opset_of, producers
from qdq.fp8 import round_to_fp8
from qdq.nn.weight_only import WEIGHT_DQ_DOMAIN, WEIGHT_DQ_OP

__all__ = ["pack_int4", "int4_initializer", "fp8_initializer", "lower_weight_dq",
           "weight_dq_opset", "onnx_format", "uses_fp8", "uses_int4", "weight_bytes",
           "is_fp8_dtype", "is_int4_dtype", "weight_source", "gathered_dq_table"]

#: the TorchScript exporter writes opsets up to this one; newer ones come from conversion
TORCHSCRIPT_MAX_OPSET = 20


def is_fp8_dtype(array: np.ndarray) -> bool:
    return str(array.dtype) == "float8_e4m3fn"


def is_int4_dtype(array: np.ndarray) -> bool:
    return str(array.dtype) == "int4"


def pack_int4(codes: np.ndarray) -> bytes:
    """Signed 4-bit values (``[-8, 7]``, any integer dtype) packed two per byte, element
    ``2i`` in the low nibble of byte ``i``, ``2i + 1`` in the high one (ONNX's INT4 layout);
    an odd count leaves the last high nibble 0."""
    flat = np.asarray(codes).reshape(-1).astype(np.int16)
    if flat.size and (flat.min() < -8 or flat.max() > 7):
        raise ValueError(f"INT4 codes must lie in [-8, 7], got [{flat.min()}, {flat.max()}]")
    nibbles = (flat & 0xF).astype(np.uint8)
    if nibbles.size % 2:
        nibbles = np.append(nibbles, np.uint8(0))
    return (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()


def int4_initializer(name: str, codes: np.ndarray) -> TensorProto:
    return helper.make_tensor(name, TensorProto.INT4, list(codes.shape), pack_int4(codes),
                              raw=True)


def fp8_initializer(name: str, values: torch.Tensor) -> TensorProto:
    """A float8e4m3fn initializer holding ``values`` (already on the E4M3 grid)."""
    raw = values.float().to(torch.float8_e4m3fn).view(torch.uint8).cpu().numpy().tobytes()
    return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(values.shape), raw,
                              raw=True)


def fp8_weight_codes(w: np.ndarray, scale: np.ndarray) -> torch.Tensor:
    """QuantizeLinear-19 to float8e4m3fn (saturating) of a constant weight, as grid values."""
    return round_to_fp8(torch.from_numpy(np.asarray(w, np.float32) / scale))


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _placeholders(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    return [n for n in graph.node if n.domain == WEIGHT_DQ_DOMAIN and n.op_type == WEIGHT_DQ_OP]


def weight_dq_opset(model: onnx.ModelProto) -> int:
    """The lowest opset the weight DQ nodes need once lowered: 21 for INT4 or blocks, else 13."""
    needs = [21 if _attr(n, "bits", 8) == 4 or _attr(n, "block_size", 0) else 13
             for n in _placeholders(model.graph)]
    return max(needs, default=13)


#: the first opset whose DequantizeLinear takes block-wise scales (gathered rows need them)
GATHER_FIRST_OPSET = 21


def _lone_gather(node: onnx.NodeProto, users: dict, outputs: set[str]) -> onnx.NodeProto | None:
    """The Gather (axis 0) that is the only reader of placeholder ``node``'s weight."""
    out = node.output[0]
    readers = users.get(out, [])
    if out in outputs or len(readers) != 1:
        return None
    gather = readers[0]
    if gather.op_type != "Gather" or gather.input[0] != out or _attr(gather, "axis", 0) != 0:
        return None
    return gather


def _gathered_dq(node: onnx.NodeProto, gather: onnx.NodeProto, codes_name: str,
                 scale_name: str, bits: int, block: int, codes: np.ndarray,
                 scale: np.ndarray, graph: onnx.GraphProto, inits: dict) -> list:
    """Gather of the codes and scales, then block-wise DequantizeLinear of the rows."""
    if bits == 4:
        packed = int4_initializer(codes_name, codes)
    else:
        packed = numpy_helper.from_array(codes.astype(np.int8), codes_name)
    graph.initializer.remove(inits[codes_name])
    graph.initializer.remove(inits[scale_name])
    rows = scale.reshape(scale.shape[0], -1)  # [N, 1] per row, [N, D / B] in blocks
    graph.initializer.extend([packed, numpy_helper.from_array(rows, scale_name)])
    scope = node.name.rsplit("/", 1)[0] if "/" in node.name else ""
    ids, out = gather.input[1], gather.output[0]
    table, made = codes_name, []
    if bits == 4:  # Gather takes no INT4: widen the table to int8 (a constant)
        table = f"{codes_name}_int8"
        made.append(helper.make_node("Cast", [codes_name], [table], name=f"{scope}/Cast",
                                     to=TensorProto.INT8))
    made += [
        helper.make_node("Gather", [table, ids], [f"{out}_codes"], name=f"{scope}/Gather",
                         axis=0),
        helper.make_node("Gather", [scale_name, ids], [f"{out}_scale"],
                         name=f"{scope}/Gather_scale", axis=0),
        helper.make_node("DequantizeLinear", [f"{out}_codes", f"{out}_scale"], [out],
                         name=f"{scope}/DequantizeLinear", axis=-1,
                         block_size=block or int(codes.shape[1])),
    ]
    return made


def lower_weight_dq(model: onnx.ModelProto, gather_first: bool = True) -> int:
    """Replace every ``WeightDQ`` placeholder by a DequantizeLinear on an integer
    initializer, in place; returns how many. Call after the model has its final opset.

    A 2-D weight whose only reader is a ``Gather`` on axis 0 (an embedding lookup) is,
    with ``gather_first`` and opset >= 21, gathered as integers and dequantized after the
    lookup (see the module notes)."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    users = consumers(graph)
    outputs = {o.name for o in graph.output}
    gather_first = gather_first and opset_of(model) >= GATHER_FIRST_OPSET
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(Gather) -> the nodes replacing it
    for node in _placeholders(graph) if gather_first else []:
        gather = _lone_gather(node, users, outputs)
        codes_name, scale_name = node.input[0], node.input[1]
        if (gather is None or codes_name not in inits or scale_name not in inits
                or len(users.get(codes_name, [])) != 1
                or len(users.get(scale_name, [])) != 1 or len(inits[codes_name].dims) != 2):
            continue
        codes = numpy_helper.to_array(inits[codes_name])
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
        replaced[id(gather)] = _gathered_dq(node, gather, codes_name, scale_name,
                                            _attr(node, "bits", 8), _attr(node, "block_size", 0),
                                            codes, scale, graph, inits)
        replaced[id(node)] = []
    nodes, lowered = [], 0
    for node in graph.node:
        if id(node) in replaced:
            nodes.extend(replaced[id(node)])
            lowered += node.domain == WEIGHT_DQ_DOMAIN
            continue
        if node.domain != WEIGHT_DQ_DOMAIN or node.op_type != WEIGHT_DQ_OP:
            nodes.append(node)
            continue
        codes_name, scale_name = node.input[0], node.input[1]
        if codes_name not in inits or scale_name not in inits:
            raise ValueError(f"{node.name}: weight codes and scales must be initializers")
        if len(users.get(codes_name, [])) != 1:
            raise ValueError(f"{node.name}: weight codes {codes_name!r} are shared")
        bits, block = _attr(node, "bits", 8), _attr(node, "block_size", 0)
        codes = numpy_helper.to_array(inits[codes_name])
        scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
        zp_name = f"{scale_name}_zero_point"
        if bits == 4:
            packed = int4_initializer(codes_name, codes)
            zero = int4_initializer(zp_name, np.zeros(scale.shape, np.int8))
        else:
            packed = numpy_helper.from_array(codes.astype(np.int8), codes_name)
            zero = numpy_helper.from_array(np.zeros(scale.shape, np.int8), zp_name)
        graph.initializer.remove(inits[codes_name])
        graph.initializer.extend([packed, zero])
        attrs = {"axis": 1, "block_size": block} if block else {"axis": 0}
        scope = node.name.rsplit("/", 1)[0] if "/" in node.name else ""
        nodes.append(helper.make_node("DequantizeLinear", [codes_name, scale_name, zp_name],
                                      list(node.output), name=f"{scope}/DequantizeLinear",
                                      **attrs))
        lowered += 1
    del graph.node[:]
    graph.node.extend(nodes)
    kept = [o for o in model.opset_import if o.domain != WEIGHT_DQ_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)
    return lowered


def set_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    """``model`` raised to default-domain ``opset`` by ONNX's version converter; a model
    already at that opset or newer is returned as it is."""
    if opset_of(model) >= opset:
        return model
    from onnx import version_converter

    return version_converter.convert_version(model, opset)


# ----------------------------------------------------------------------------- reading
def weight_source(graph: onnx.GraphProto, tensor: str,
                  made_by: dict[str, onnx.NodeProto] | None = None) -> str:
    """The tensor a DequantizeLinear input reads, looking back through the ``Gather``
    (input 0) and ``Cast`` of an embedding lookup dequantized after the gather: the
    table's initializer name for those, ``tensor`` itself otherwise."""
    made_by = producers(graph) if made_by is None else made_by
    node = made_by.get(tensor)
    while node is not None and node.op_type in ("Gather", "Cast") and node.input:
        tensor = node.input[0]
        node = made_by.get(tensor)
    return tensor


def gathered_dq_table(graph: onnx.GraphProto, dq: onnx.NodeProto,
                      made_by: dict[str, onnx.NodeProto] | None = None) -> str | None:
    """For a DequantizeLinear of gathered rows, the name of the Gather's indices; None for
    one that dequantizes a whole weight."""
    made_by = producers(graph) if made_by is None else made_by
    node = made_by.get(dq.input[0])
    return node.input[1] if node is not None and node.op_type == "Gather" else None


def _dq_nodes(graph: onnx.GraphProto, consts: dict[str, np.ndarray]):
    """(DQ node, its constant integer/fp8 input) for weights stored quantized (the table of
    a DQ that reads gathered rows of one)."""
    made_by = producers(graph)
    for node in graph.node:
        if node.op_type == "DequantizeLinear":
            source = weight_source(graph, node.input[0], made_by)
            if source in consts:
                yield node, consts[source]


def _is_table_dq(graph: onnx.GraphProto, node: onnx.NodeProto, made_by, used_by) -> bool:
    """A DequantizeLinear of an embedding table: it reads gathered rows, or a Gather reads
    its output as the data (input 0)."""
    if gathered_dq_table(graph, node, made_by) is not None:
        return True
    return any(user.op_type == "Gather" and user.input[0] == node.output[0]
               for user in used_by.get(node.output[0], []))


def _activation_qs(graph: onnx.GraphProto, consts: dict[str, np.ndarray]):
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in consts:
            yield node


def onnx_format(model: onnx.ModelProto) -> str:
    """``"int8"``, ``"fp8"`` (activations quantized), ``"w8"``, ``"w4"`` (weights only),
    ``"float"`` (no Q/DQ) or ``"mixed"``, read from the graph's Q/DQ nodes."""
    graph = model.graph
    consts = constant_values(graph)
    kinds = set()
    for q in _activation_qs(graph, consts):
        zp = consts.get(q.input[2]) if len(q.input) > 2 else None
        kinds.add("fp8" if zp is not None and is_fp8_dtype(zp) else "int8")
    if not kinds:
        made_by, used_by = producers(graph), consumers(graph)
        weights, tables = set(), set()
        for node, codes in _dq_nodes(graph, consts):
            kind = ("w4" if is_int4_dtype(codes) else "fp8" if is_fp8_dtype(codes)
                    else "w8")
            (tables if _is_table_dq(graph, node, made_by, used_by) else weights).add(kind)
        # embedding tables (INT8 by default in both weight-only formats) decide only when
        # nothing else is quantized, as qdq.formats.format_of does
        kinds = weights or tables
    if not kinds:
        return "float"
    return kinds.pop() if len(kinds) == 1 else "mixed"


def uses_fp8(model: onnx.ModelProto) -> bool:
    """Whether any Q/DQ of the graph has a float8e4m3fn zero point or input."""
    consts = constant_values(model.graph)
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            for name in (node.input[0], node.input[2] if len(node.input) > 2 else ""):
                if name in consts and is_fp8_dtype(consts[name]):
                    return True
    return False


def uses_int4(model: onnx.ModelProto) -> bool:
    """Whether any DequantizeLinear reads an INT4 initializer (or rows gathered from one)."""
    consts = constant_values(model.graph)
    return any(is_int4_dtype(codes) for _, codes in _dq_nodes(model.graph, consts))


def weight_bytes(model: onnx.ModelProto) -> tuple[int, int]:
    """``(stored, fp32)``: bytes the weights stored quantized (integer or fp8 initializers
    feeding a DequantizeLinear) take in the file with their scales and zero points, and
    bytes the same weights take as fp32."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    made_by = producers(graph)
    stored = fp32 = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        names = [weight_source(graph, name, made_by) for name in node.input if name]
        if names[0] not in inits:
            continue
        fp32 += 4 * _numel(inits[names[0]])
        stored += sum(_nbytes(inits[name]) for name in names if name in inits)
    return stored, fp32


def _numel(init: TensorProto) -> int:
    return int(np.prod(init.dims)) if init.dims else 1


def _nbytes(init: TensorProto) -> int:
    if init.raw_data:
        return len(init.raw_data)
    return numpy_helper.to_array(init).nbytes
