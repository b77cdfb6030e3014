"""The fp16 pass: float layers in fp16, Q/DQ in fp32 with Casts; runs in ONNX Runtime."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from export import check_qdq, to_fp16, to_onnx
from export.onnx_io import OnnxFileError
from tests.export.conftest import quantized_torchvision


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model, inputs = quantized_torchvision("resnet18", 32)
    folder = tmp_path_factory.mktemp("fp16")
    to_onnx(model, inputs[:1], folder / "fp32.onnx")
    to_fp16(folder / "fp32.onnx", folder / "fp16.onnx")
    return folder, inputs


def _run(path, x):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


def test_qdq_stay_fp32_with_casts_around(exported):
    folder, _ = exported
    graph = onnx.load(str(folder / "fp16.onnx")).graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users = {}
    for n in graph.node:
        for name in n.input:
            users.setdefault(name, []).append(n)
    for node in graph.node:
        if node.op_type == "QuantizeLinear":
            src = node.input[0]
            if src in inits:
                assert inits[src].data_type == TensorProto.FLOAT  # fp32 weight -> Q
            elif src == graph.input[0].name:  # the fp32 model input feeds Q directly
                assert graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT
            else:
                cast = producer[src]
                assert cast.op_type == "Cast" and cast.attribute[0].i == TensorProto.FLOAT
            assert inits[node.input[1]].data_type == TensorProto.FLOAT
        if node.op_type == "DequantizeLinear":
            after = users[node.output[0]]
            assert [n.op_type for n in after] == ["Cast"]
            assert after[0].attribute[0].i == TensorProto.FLOAT16
    # every other float constant is fp16 now (conv biases from folded BatchNorm included)
    feeds_qdq = {n.input[i] for n in graph.node if n.op_type in ("QuantizeLinear",
                                                                 "DequantizeLinear")
                 for i in range(len(n.input))}
    for name, init in inits.items():
        if init.data_type == TensorProto.FLOAT:
            assert name in feeds_qdq, name
    conv_biases = [n.input[2] for n in graph.node if n.op_type == "Conv" and len(n.input) > 2]
    assert conv_biases and all(inits[b].data_type == TensorProto.FLOAT16 for b in conv_biases)
    assert not [f for f in check_qdq(folder / "fp16.onnx") if f.severity == "error"]


def test_runs_in_ort_close_to_fp32(exported):
    folder, inputs = exported
    x = inputs.numpy()
    full, half = _run(folder / "fp32.onnx", x), _run(folder / "fp16.onnx", x)
    assert half.dtype == np.float32  # fp32 interface kept
    rel = np.linalg.norm(full - half) / np.linalg.norm(full)
    print(f"fp16 vs fp32 in ONNX Runtime: rel L2 {rel:.3g}")
    assert rel < 1e-2
    assert np.mean(full.argmax(1) == half.argmax(1)) >= 0.95


def test_fp16_io_types(exported, tmp_path):
    folder, inputs = exported
    to_fp16(folder / "fp32.onnx", tmp_path / "io16.onnx", keep_io_types=False)
    out = _run(tmp_path / "io16.onnx", inputs[:2].numpy().astype(np.float16))
    assert out.dtype == np.float16 and np.isfinite(out).all()


def test_bad_input(tmp_path):
    with pytest.raises(OnnxFileError, match="no such file"):
        to_fp16(tmp_path / "none.onnx", tmp_path / "out.onnx")
    assert list(tmp_path.iterdir()) == []
