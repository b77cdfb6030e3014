"""TensorRT: the inspector JSON parser everywhere (fixtures written from the documented
10.x and 11.x schemas); build/inspect/benchmark where TensorRT and a GPU exist."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from export import (
    TensorRTUnavailable,
    benchmark_engine,
    build_engine,
    inspect_engine,
    parse_engine_json,
    tensorrt_available,
)
from export.engine_report import precision_of

FIXTURES = Path(__file__).parent / "fixtures"
needs_tensorrt = pytest.mark.skipif(
    not tensorrt_available(),
    reason="needs TensorRT: pip install tensorrt polygraphy (on a machine with an NVIDIA GPU)")


def _load(name: str) -> str:
    return (FIXTURES / name).read_text()


@pytest.mark.parametrize("text, expected", [
    ("Channel major INT8 format where channel % 32 == 0", "INT8"),
    ("Row major linear FP16 format", "FP16"),
    ("Row major linear FP32 format", "FP32"),
    ("Half", "FP16"), ("Float", "FP32"), ("Int8", "INT8"), ("BFloat16", "BF16"),
    ("Int32", "INT32"), ("", "?"), ("something else", "?"),
])
def test_precision_of(text, expected):
    assert precision_of(text) == expected


def test_parse_trt10_schema():
    report = parse_engine_json(_load("engine_trt10.json"))
    assert report.schema == "10.x"
    assert [t.name for t in report.io_tensors] == ["input", "output"]
    assert len(report.layers) == 9
    assert [la.name for la in report.reformat_layers] == [
        "Reformatting CopyNode for Input Tensor 0 to /conv1/_input_quantizer/QuantizeLinear",
        "Reformatting CopyNode for Output Tensor 0 to /fc/Gemm"]
    assert [la.name for la in report.unfused_qdq_layers] == [
        "/conv1/_input_quantizer/QuantizeLinear", "/avgpool/_input_quantizer/DequantizeLinear"]
    heavy = report.heavy_layers
    assert [la.precision for la in heavy] == ["INT8", "INT8", "FP16"]
    assert report.heavy_int8_fraction == pytest.approx(2 / 3)
    # 7 non-reformat layers, 4 computing in INT8 (the quantize layer reads FP16)
    assert report.int8_fraction == pytest.approx(4 / 7)
    assert report.precision_counts() == {"INT8": 4, "FP16": 3}
    text = str(report)
    assert "(unfused Q/DQ)" in text and "(reformat)" in text and "2 reformat layers" in text


def test_parse_trt11_schema():
    report = parse_engine_json(_load("engine_trt11.json"))
    assert report.schema == "11.x"
    assert [(t.name, t.precision) for t in report.io_tensors] == [("input", "FP16"),
                                                                  ("output", "FP32")]
    assert [la.precision for la in report.layers] == ["FP16", "INT8", "FP16", "FP16", "INT8"]
    assert [la.name for la in report.unfused_qdq_layers] == [
        "/conv1/_input_quantizer/QuantizeLinear"]
    assert len(report.reformat_layers) == 1
    assert report.heavy_int8_fraction == pytest.approx(2 / 3)
    assert "TensorRT 11.x engine" in report.summary()


def test_parse_names_only_and_bad_json():
    report = parse_engine_json(_load("engine_names_only.json"))
    assert report.schema == "names-only" and {la.precision for la in report.layers} == {"?"}
    with pytest.raises(ValueError, match="no 'Layers'"):
        parse_engine_json(json.dumps({"Bindings": []}))
    with pytest.raises(ValueError):
        parse_engine_json("{not json")


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
@pytest.mark.parametrize("call", [
    lambda p: build_engine(p / "m.onnx", p / "m.engine"),
    lambda p: inspect_engine(p / "m.engine"),
    lambda p: benchmark_engine(p / "m.engine"),
])
def test_without_tensorrt_one_clear_error(call, tmp_path):
    with pytest.raises(TensorRTUnavailable, match="pip install tensorrt polygraphy"):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


@needs_tensorrt
def test_build_inspect_benchmark_resnet18(tmp_path):
    import torch

    from export import to_fp16, to_onnx
    from tests.export.conftest import quantized_torchvision

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, inputs = quantized_torchvision("resnet18", 64)
    to_onnx(model, inputs[:1], tmp_path / "r.onnx")
    to_fp16(tmp_path / "r.onnx", tmp_path / "r16.onnx")
    engine = build_engine(tmp_path / "r16.onnx", tmp_path / "r.engine",
                          min_shape=(1, 3, 64, 64), opt_shape=(32, 3, 64, 64),
                          max_shape=(64, 3, 64, 64), timing_cache=tmp_path / "cache")
    report = inspect_engine(engine)
    assert report.heavy_int8_fraction > 0.9, report
    result = benchmark_engine(engine, (32, 3, 64, 64), iterations=20)
    assert result.p50_ms > 0 and result.p99_ms >= result.p50_ms
