"""``to_fp16``: the float part of a Q/DQ graph in fp16, the Q/DQ themselves in fp32.

TensorRT 11 builds strongly typed networks only: each layer runs in the type the ONNX graph
gives it, so float layers meant to run in FP16 must be FP16 in the file. At opset 13
QuantizeLinear takes fp32 input and DequantizeLinear returns fp32, so they keep fp32 and
Casts go around them:

    x16 -> Cast(fp32) -> Q -> DQ -> Cast(fp16) -> Conv(fp16) ...

Scales, zero points and fp32 weights that feed Q stay as they are; other float initializers
and Constant values become fp16. With ``keep_io_types`` the model's float inputs and outputs
stay fp32 (a Cast at each edge), so callers feed the same arrays as before.

Example::

    to_fp16("model.onnx", "model_fp16.onnx")
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.onnx_io import load_onnx
from qdq.fileio import atomic_write

__all__ = ["convert_to_fp16", "to_fp16"]

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
#: (op, input index) that must stay fp32 whatever the rest of the graph is
FP32_INPUTS = frozenset({("QuantizeLinear", 0), ("QuantizeLinear", 1),
                         ("DequantizeLinear", 1), ("Resize", 1), ("Resize", 2)})
_PREFIX = "fp16_pass/"


def _locked(node: onnx.NodeProto, index: int) -> bool:
    return (node.op_type, index) in FP32_INPUTS


def convert_to_fp16(model: onnx.ModelProto, keep_io_types: bool = True) -> onnx.ModelProto:
    """Return a copy of ``model`` with its float part in fp16 and Q/DQ kept in fp32."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    nodes = list(graph.node)
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in nodes:
        for i, name in enumerate(node.input):
            if name:
                uses.setdefault(name, []).append((node, i))
    new_nodes: list[onnx.NodeProto] = []
    rename: dict[tuple[int, int], str] = {}  # (id(node), input index) -> new input name

    # 1. initializers: fp16 unless every use must stay fp32; a copy for mixed uses
    for init in list(graph.initializer):
        if init.data_type != FLOAT:
            continue
        users = uses.get(init.name, [])
        locked = [u for u in users if _locked(*u)]
        free = [u for u in users if not _locked(*u)]
        if not free:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16),
                                       init.name if not locked else f"{init.name}.fp16")
        if locked:
            graph.initializer.append(half)
            for node, i in free:
                rename[(id(node), i)] = half.name
        else:
            init.CopyFrom(half)

    # 2. graph inputs: cast to fp16 at the edge (or change their type)
    for inp in graph.input:
        if inp.type.tensor_type.elem_type != FLOAT or any(
                i.name == inp.name for i in graph.initializer):
            continue
        if keep_io_types:
            cast_out = f"{_PREFIX}{inp.name}"
            new_nodes.append(helper.make_node("Cast", [inp.name], [cast_out], to=HALF,
                                              name=f"{_PREFIX}cast_in_{inp.name}"))
            for node, i in uses.get(inp.name, []):
                if not _locked(node, i):
                    rename[(id(node), i)] = cast_out
                else:
                    rename[(id(node), i)] = inp.name
        else:
            inp.type.tensor_type.elem_type = HALF

    # 3. the nodes themselves
    for node in nodes:
        for i in range(len(node.input)):
            if (id(node), i) in rename:
                node.input[i] = rename[(id(node), i)]
        if node.op_type == "QuantizeLinear":
            src = node.input[0]
            if not any(init.name == src and init.data_type == FLOAT
                       for init in graph.initializer):
                if not (keep_io_types and any(inp.name == src for inp in graph.input)):
                    cast_out = f"{_PREFIX}{node.name or src}/to_fp32"
                    new_nodes.append(helper.make_node("Cast", [src], [cast_out], to=FLOAT,
                                                      name=f"{_PREFIX}{node.name}/cast_in"))
                    node.input[0] = cast_out
            new_nodes.append(node)
        elif node.op_type == "DequantizeLinear":
            out = node.output[0]
            fp32 = f"{_PREFIX}{out}/fp32"
            node.output[0] = fp32
            new_nodes.append(node)
            new_nodes.append(helper.make_node("Cast", [fp32], [out], to=HALF,
                                              name=f"{_PREFIX}{node.name}/cast_out"))
        else:
            if node.op_type == "Cast":
                for attr in node.attribute:
                    if attr.name == "to" and attr.i == FLOAT:
                        attr.i = HALF
            elif node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type == FLOAT and not any(
                            _locked(u, i) for u, i in uses.get(node.output[0], [])):
                        attr.t.CopyFrom(numpy_helper.from_array(
                            numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
            elif node.op_type == "ConstantOfShape":
                for attr in node.attribute:
                    if attr.name == "value" and attr.t.data_type == FLOAT:
                        attr.t.CopyFrom(numpy_helper.from_array(
                            numpy_helper.to_array(attr.t).astype(np.float16), attr.t.name))
            new_nodes.append(node)

    # 4. graph outputs: back to fp32 at the edge (or change their type)
    for out in graph.output:
        if out.type.tensor_type.elem_type != FLOAT:
            continue
        if keep_io_types:
            inner = f"{_PREFIX}{out.name}/fp16"
            for node in new_nodes:
                for i, name in enumerate(node.output):
                    if name == out.name:
                        node.output[i] = inner
                for i, name in enumerate(node.input):
                    if name == out.name:
                        node.input[i] = inner
            new_nodes.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT,
                                              name=f"{_PREFIX}cast_out_{out.name}"))
        else:
            out.type.tensor_type.elem_type = HALF

    del graph.node[:]
    graph.node.extend(new_nodes)
    del graph.value_info[:]  # intermediate types changed; ONNX Runtime re-infers them
    onnx.checker.check_model(model)
    return model


def to_fp16(src: str | os.PathLike | onnx.ModelProto, dst: str | os.PathLike,
            keep_io_types: bool = True) -> Path:
    """Convert ``src`` and write it to ``dst`` atomically; returns ``dst``."""
    model = convert_to_fp16(load_onnx(src), keep_io_types)
    dst = Path(dst)
    if not dst.parent.is_dir():
        raise FileNotFoundError(f"output folder {dst.parent} does not exist")
    atomic_write(dst, lambda tmp: onnx.save(model, str(tmp)), parents=False)
    return dst
