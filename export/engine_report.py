"""Parse TensorRT's engine inspector JSON into a per-layer precision table.

``IEngineInspector.get_engine_information(LayerInformationFormat.JSON)`` on an engine
built with ``ProfilingVerbosity.DETAILED`` gives ``{"Layers": [...], ...}``. Each layer
has ``Name``, ``LayerType`` and ``Inputs``/``Outputs`` lists of tensors. The schema moved
between major versions:

* TensorRT 10.x: tensors carry one string ``"Format/Datatype"`` (e.g. ``"Channel major
  INT8 format where channel % 32 == 0"``); the engine's I/O names sit in ``"Bindings"``.
* TensorRT 11.x: ``"Bindings"`` became ``"I/O Tensors"``, a list of objects with
  ``"DataType"`` (``"Float"``, ``"Half"``, ``"Int8"``...) and ``"Format"``; layer tensors
  may carry the same two keys instead of ``"Format/Datatype"``.

The parser reads both, and also the ``LAYER_NAMES_ONLY`` form (layers as plain strings),
for which precision is unknown. It needs no TensorRT, so it is tested everywhere.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

__all__ = ["EngineReport", "LayerInfo", "TensorInfo", "parse_engine_json", "precision_of"]

#: (pattern, precision) checked in order against a datatype/format string
_PRECISIONS = [
    (re.compile(r"\bint8\b", re.I), "INT8"),
    (re.compile(r"\bfp8\b|\be4m3\b", re.I), "FP8"),
    (re.compile(r"\bint4\b", re.I), "INT4"),
    (re.compile(r"\bbf16\b|\bbfloat16?\b", re.I), "BF16"),
    (re.compile(r"\bfp16\b|\bhalf\b", re.I), "FP16"),
    (re.compile(r"\bfp32\b|\bfloat\b|\bfloat32\b", re.I), "FP32"),
    (re.compile(r"\bint32\b", re.I), "INT32"),
    (re.compile(r"\bint64\b", re.I), "INT64"),
    (re.compile(r"\bbool\b", re.I), "BOOL"),
]
#: layer types that carry the FLOPs (matched case-insensitively as substrings)
_HEAVY = ("conv", "gemm", "matrixmultiply", "fullyconnected", "deconv")
_QDQ_PART = re.compile(r"(quantizelinear|dequantizelinear|quantize|dequantize)", re.I)


def precision_of(text: str | None) -> str:
    """``"Row major linear FP16 format"`` or ``"Half"`` -> ``"FP16"``; unknown -> ``"?"``."""
    if not text:
        return "?"
    for pattern, name in _PRECISIONS:
        if pattern.search(text):
            return name
    return "?"


@dataclass
class TensorInfo:
    name: str
    precision: str
    format: str = ""
    dims: list[int] = field(default_factory=list)

    @classmethod
    def parse(cls, item) -> TensorInfo:
        if isinstance(item, str):
            return cls(item, "?")
        if "Format/Datatype" in item:  # 10.x
            text = str(item["Format/Datatype"])
            return cls(str(item.get("Name", "")), precision_of(text), text,
                       list(item.get("Dimensions", [])))
        dtype = str(item.get("DataType", ""))  # 11.x
        fmt = str(item.get("Format", ""))
        return cls(str(item.get("Name", "")), precision_of(dtype or fmt), fmt or dtype,
                   list(item.get("Dimensions", [])))


@dataclass
class LayerInfo:
    name: str
    layer_type: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    tactic: str = ""

    @property
    def precision(self) -> str:
        """The type the layer computes in: its first known input type, else its output's."""
        for t in [*self.inputs, *self.outputs]:
            if t.precision != "?":
                return t.precision
        return "?"

    @property
    def is_reformat(self) -> bool:
        return self.layer_type.lower() == "reformat" or self.name.startswith("Reformatting")

    @property
    def is_heavy(self) -> bool:
        kind = self.layer_type.lower()
        return any(k in kind for k in _HEAVY)

    @property
    def is_unfused_qdq(self) -> bool:
        """A layer made of Q/DQ nodes only: TensorRT could not fold them into compute."""
        if self.is_reformat:
            return False
        kind = self.layer_type.lower()
        if kind in ("quantize", "dequantize", "quantizelinear", "dequantizelinear"):
            return True
        parts = [p.strip() for p in self.name.split(" + ") if p.strip()]
        return bool(parts) and all(_QDQ_PART.search(p.rsplit("/", 1)[-1]) for p in parts)


@dataclass
class EngineReport:
    schema: str  # "10.x", "11.x" or "names-only"
    layers: list[LayerInfo]
    io_tensors: list[TensorInfo] = field(default_factory=list)

    def _fraction(self, layers: list[LayerInfo], precision: str) -> float:
        if not layers:
            return 0.0
        return sum(layer.precision == precision for layer in layers) / len(layers)

    @property
    def compute_layers(self) -> list[LayerInfo]:
        return [la for la in self.layers if not la.is_reformat]

    @property
    def heavy_layers(self) -> list[LayerInfo]:
        return [la for la in self.layers if la.is_heavy]

    @property
    def int8_fraction(self) -> float:
        """Share of non-reformat layers that run in INT8."""
        return self._fraction(self.compute_layers, "INT8")

    @property
    def heavy_int8_fraction(self) -> float:
        """Share of conv/gemm/matmul layers that run in INT8 (what speed depends on)."""
        return self._fraction(self.heavy_layers, "INT8")

    @property
    def reformat_layers(self) -> list[LayerInfo]:
        return [la for la in self.layers if la.is_reformat]

    @property
    def unfused_qdq_layers(self) -> list[LayerInfo]:
        return [la for la in self.layers if la.is_unfused_qdq]

    def precision_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for layer in self.compute_layers:
            counts[layer.precision] = counts.get(layer.precision, 0) + 1
        return counts

    def table(self) -> str:
        width = min(70, max((len(la.name) for la in self.layers), default=10))
        lines = [f"{'layer':<{width}}  {'type':<24} precision"]
        for la in self.layers:
            name = la.name if len(la.name) <= width else la.name[: width - 3] + "..."
            flag = (" (reformat)" if la.is_reformat
                    else " (unfused Q/DQ)" if la.is_unfused_qdq else "")
            lines.append(f"{name:<{width}}  {la.layer_type[:24]:<24} {la.precision}{flag}")
        return "\n".join(lines)

    def summary(self) -> str:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(self.precision_counts().items()))
        return (f"TensorRT {self.schema} engine: {len(self.layers)} layers ({counts}); "
                f"INT8 {self.int8_fraction:.0%} of layers, {self.heavy_int8_fraction:.0%} of "
                f"{len(self.heavy_layers)} conv/gemm/matmul layers; "
                f"{len(self.reformat_layers)} reformat layers; "
                f"{len(self.unfused_qdq_layers)} unfused Q/DQ layers")

    def __str__(self) -> str:
        return self.table() + "\n" + self.summary()


def parse_engine_json(text: str | dict) -> EngineReport:
    """Parse the inspector's JSON (a string or an already loaded dict)."""
    data = json.loads(text) if isinstance(text, str) else text
    if not isinstance(data, dict) or "Layers" not in data:
        raise ValueError("not TensorRT engine inspector JSON: no 'Layers' list")
    raw_layers = data["Layers"]
    if not isinstance(raw_layers, list):
        raise ValueError("engine inspector JSON: 'Layers' is not a list")
    layers = []
    names_only = bool(raw_layers) and all(isinstance(la, str) for la in raw_layers)
    for item in raw_layers:
        if isinstance(item, str):
            layers.append(LayerInfo(item, "?", [], []))
            continue
        layers.append(LayerInfo(
            name=str(item.get("Name", "")), layer_type=str(item.get("LayerType", "?")),
            inputs=[TensorInfo.parse(t) for t in item.get("Inputs", [])],
            outputs=[TensorInfo.parse(t) for t in item.get("Outputs", [])],
            tactic=str(item.get("TacticValue", item.get("TacticName", "")))))
    if "I/O Tensors" in data:
        schema = "11.x"
        io = [TensorInfo.parse(t) for t in data["I/O Tensors"]]
    else:
        schema = "10.x"
        io = [TensorInfo(str(b), "?") for b in data.get("Bindings", [])]
    return EngineReport("names-only" if names_only else schema, layers, io)
