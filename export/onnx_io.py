"""Reading ONNX files and their constants, shared by the lint, the check and the fp16 pass."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["OnnxFileError", "load_onnx", "constant_values", "opset_of", "producers",
           "consumers"]


class OnnxFileError(ValueError):
    """An ONNX file that is missing or cannot be read; the message names the file."""


def load_onnx(source: str | os.PathLike | onnx.ModelProto,
              error: type[Exception] = OnnxFileError) -> onnx.ModelProto:
    """Load an ONNX model (or pass one through); one clear error for a missing or corrupt file."""
    if isinstance(source, onnx.ModelProto):
        return source
    path = Path(source)
    if not path.is_file():
        raise error(f"ONNX file {path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as err:  # noqa: BLE001 - any parse failure gets one message
        text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise error(f"ONNX file {path}: not a readable ONNX model ({text})") from err
    if not model.graph.node:
        raise error(f"ONNX file {path}: the graph has no nodes (not an ONNX model?)")
    return model


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and Constant node outputs, by tensor name."""
    values = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def opset_of(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    table: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                table.setdefault(name, []).append(node)
    return table
