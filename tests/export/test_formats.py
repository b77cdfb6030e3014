"""FP8 and weight-only formats in ONNX: what ONNX Runtime runs, what the export writes, how
big it is, what the lint and the check say, and the refusals."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

import qdq
from export import BuildError, ExportError, build_engine, check_qdq, to_onnx, verify
from export.formats import onnx_format, pack_int4, weight_bytes
from export.tensorrt import fp8_device_problem
from qdq.rules import apply_rules
from tests.export.conftest import calibrate
from tests.export.tiny import SmallCNN


def _session(path_or_model):
    source = (path_or_model.SerializeToString() if isinstance(path_or_model, onnx.ModelProto)
              else str(path_or_model))
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = _session(path)
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _nodes(path, op: str) -> list[onnx.NodeProto]:
    return [n for n in onnx.load(str(path)).graph.node if n.op_type == op]


# ------------------------------------------------------------- what ONNX Runtime runs
def test_pack_int4_is_the_layout_onnx_reads(rng):
    codes = torch.randint(-8, 8, (5, 7), generator=rng).numpy()  # odd count: a pad nibble
    tensor = helper.make_tensor("w", TensorProto.INT4, list(codes.shape), pack_int4(codes),
                                raw=True)
    assert len(tensor.raw_data) == 18
    assert np.array_equal(numpy_helper.to_array(tensor).astype(np.int64), codes)
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        pack_int4(np.array([8]))


def test_onnx_runtime_runs_int4_dequantize_linear_21_with_block_size(rng):
    codes = torch.randint(-8, 8, (6, 64), generator=rng).numpy()
    scale = (torch.rand(6, 2, generator=rng) + 0.01).numpy()
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["w", "s"], ["y"], axis=1, block_size=32)], "g",
        [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6, 64])],
        [helper.make_tensor("w", TensorProto.INT4, [6, 64], pack_int4(codes), raw=True),
         numpy_helper.from_array(scale, "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    onnx.checker.check_model(model, full_check=True)
    y = _session(model).run(None, {})[0]
    assert np.array_equal(y, codes.astype(np.float32) * np.repeat(scale, 32, axis=1))


def test_ort_session_keeps_a_relu_in_front_of_an_fp8_quantize_linear(rng):
    from export.verify import ort_session
    from qdq.tensor_quant import fake_quant

    x = torch.randn(2, 64, generator=rng)
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]),
         helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])], "relu_fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [zp, numpy_helper.from_array(np.array(0.01, np.float32), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    y = ort_session(model).run(None, {"x": x.numpy()})[0]
    expected = fake_quant(torch.relu(x), torch.tensor(0.01 * 448), (4, 3))
    assert np.array_equal(y, expected.numpy()) and (y >= 0).all()


# ----------------------------------------------------------------------- weight-only
class MLP(nn.Module):
    def __init__(self, width: int = 512):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width),
                                    nn.ReLU(), nn.Linear(width, width))
        self.head = nn.Linear(width, 16)

    def forward(self, x):
        return self.head(self.layers(x))


class Recurrent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(16, 32, 3, padding=1)
        self.lstm = nn.LSTM(32, 32, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(64, 8)

    def forward(self, x):
        y = torch.relu(self.conv(x)).transpose(1, 2)
        out, _ = self.lstm(y)
        return self.fc(out.mean(1))


@pytest.mark.parametrize("bits, block, opset", [(8, None, 13), (4, 16, 21), (4, None, 21)])
def test_weight_only_export_is_integer_initializers_feeding_dq(tmp_path, bits, block, opset):
    torch.manual_seed(0)
    model = Recurrent().eval()
    qdq.weight_only(model, bits=bits, block_size=block)
    x = torch.randn(4, 16, 12)
    result = to_onnx(model, x[:1], tmp_path / "w.onnx")
    assert result.format == ("w8" if bits == 8 else "w4") and result.opset == opset
    # conv, 2 x 2 LSTM weights (both directions), fc
    assert result.quantize_nodes == 0 and result.dequantize_nodes == 6
    proto = onnx.load(str(tmp_path / "w.onnx"))
    assert onnx_format(proto) == result.format
    inits = {i.name: i for i in proto.graph.initializer}
    for dq in _nodes(tmp_path / "w.onnx", "DequantizeLinear"):
        codes = inits[dq.input[0]]
        assert codes.data_type == (TensorProto.INT8 if bits == 8 else TensorProto.INT4)
        attrs = {a.name: a.i for a in dq.attribute}
        assert attrs == ({"axis": 1, "block_size": block} if block else {"axis": 0})
    with torch.no_grad():
        ours = model(x).numpy()
    assert np.allclose(_run(tmp_path / "w.onnx", x), ours, rtol=0, atol=1e-5)
    report = verify(model, tmp_path / "w.onnx", x)
    assert report.ok(rel_l2=1e-5), str(report)
    assert len(report.weights) == 6 and report.weight_mismatches == 0
    assert report.forced_outputs == report.outputs and report.format == result.format
    assert "INT4 weight-only" in str(report) or bits == 8
    # ONNX Runtime runs the INT4 Conv; TensorRT has none, and the lint says so
    findings = [(f.rule, f.node) for f in check_qdq(tmp_path / "w.onnx")]
    conv = next(n.name for n in proto.graph.node if n.op_type == "Conv")
    assert findings == ([("int4-conv", conv)] if bits == 4 else [])


def test_file_sizes_of_fp32_w8_and_w4(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(2, 512)
    sizes = {}
    for name, bits, block in (("fp32", None, None), ("w8", 8, None), ("w4", 4, 128)):
        model = MLP().eval()
        if bits:
            qdq.weight_only(model, bits=bits, block_size=block)
        result = to_onnx(model, x, tmp_path / f"{name}.onnx")
        sizes[name] = result
        assert result.bytes == (tmp_path / f"{name}.onnx").stat().st_size
    fp32 = sizes["fp32"].bytes
    assert sizes["fp32"].fp32_bytes == fp32 and sizes["fp32"].compression == 1.0
    ratio8, ratio4 = fp32 / sizes["w8"].bytes, fp32 / sizes["w4"].bytes
    assert 3.8 < ratio8 <= 4.0, ratio8
    assert 7.0 < ratio4 < 8.0, ratio4
    for name in ("w8", "w4"):  # the reported FP32 size is the real one, to 0.5%
        assert sizes[name].fp32_bytes == pytest.approx(fp32, rel=5e-3)
        assert f"{sizes[name].compression:.1f}x smaller than FP32" in str(sizes[name])
    stored, as_fp32 = weight_bytes(onnx.load(str(tmp_path / "w4.onnx")))
    blocks = 3 * 512 * 4 + 16 * 4  # one fp32 scale and one int4 zero point each
    assert as_fp32 == 4 * (3 * 512 * 512 + 16 * 512)
    assert stored == as_fp32 // 8 + 4 * blocks + blocks // 2


def test_verify_finds_a_changed_int4_weight(tmp_path):
    torch.manual_seed(0)
    model = MLP(128).eval()
    qdq.weight_only(model, bits=4, block_size=32)
    x = torch.randn(8, 128)
    to_onnx(model, x[:1], tmp_path / "w4.onnx")
    proto = onnx.load(str(tmp_path / "w4.onnx"))
    init = next(i for i in proto.graph.initializer if i.name == "head.weight_q.codes")
    codes = numpy_helper.to_array(init).astype(np.int64)
    codes[0, 0] = 7 if codes[0, 0] != 7 else -8
    init.CopyFrom(helper.make_tensor(init.name, TensorProto.INT4, list(codes.shape),
                                     pack_int4(codes), raw=True))
    onnx.save(proto, str(tmp_path / "bad.onnx"))
    report = verify(model, tmp_path / "bad.onnx", x)
    assert report.weight_mismatches == 1 and not report.ok()
    assert "1 differ" in str(report)


def test_opset_below_the_format_is_refused_and_nothing_is_written(tmp_path):
    model = MLP(64).eval()
    qdq.weight_only(model, bits=4, block_size=32)
    with pytest.raises(ExportError, match=r"opset 19: INT4 or block-wise weights .* needs "
                                          r"opset >= 21"):
        to_onnx(model, torch.randn(1, 64), tmp_path / "w4.onnx", opset=19)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- FP8
@pytest.fixture
def fp8_cnn():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(16, 3, 12, 12)
    qdq.replace_modules(model)
    model = apply_rules(model, (x[:2],))
    qdq.set_format(model, "fp8")
    calibrate(model, x)
    return model, torch.randn(32, 3, 12, 12)


def test_fp8_export_is_q_dq_19_with_a_float8_zero_point(fp8_cnn, tmp_path):
    model, x = fp8_cnn
    result = to_onnx(model, x[:1], tmp_path / "fp8.onnx")
    assert result.format == "fp8" and result.opset == 19 and result.quantize_nodes > 0
    proto = onnx.load(str(tmp_path / "fp8.onnx"))
    consts = {i.name: i for i in proto.graph.initializer}
    for node in proto.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            zp = consts[node.input[2]]
            assert zp.data_type == TensorProto.FLOAT8E4M3FN
            assert not numpy_helper.to_array(zp).astype(np.float32).any()
    assert check_qdq(tmp_path / "fp8.onnx") == []
    report = verify(model, tmp_path / "fp8.onnx", x)
    assert report.format == "fp8" and "FP8 E4M3 Q/DQ" in str(report)
    assert report.qdq_mismatches == 0 and report.only_boundary_flips
    assert report.ok(), str(report)
    assert report.forced_rel_l2 < 1e-5 and report.top1 >= 0.9


def test_fp8_weights_stored_as_float8(fp8_cnn, tmp_path):
    model, x = fp8_cnn
    full = to_onnx(model, x[:1], tmp_path / "full.onnx")
    small = to_onnx(model, x[:1], tmp_path / "small.onnx", int8_weights=True)
    weights = [n for n in _nodes(tmp_path / "small.onnx", "DequantizeLinear")
               if n.input[0] in {i.name for i in onnx.load(
                   str(tmp_path / "small.onnx")).graph.initializer}]
    assert len(weights) == 3 and small.quantize_nodes == full.quantize_nodes - 3
    assert small.bytes < full.bytes and small.fp32_bytes > small.bytes
    assert np.array_equal(_run(tmp_path / "small.onnx", x), _run(tmp_path / "full.onnx", x))


def test_lint_knows_fp8_zero_points_and_opsets(fp8_cnn, tmp_path):
    model, x = fp8_cnn
    to_onnx(model, x[:1], tmp_path / "fp8.onnx")
    proto = onnx.load(str(tmp_path / "fp8.onnx"))
    q = next(n for n in proto.graph.node if n.op_type == "QuantizeLinear")
    bad = copy.deepcopy(proto)
    zp = next(i for i in bad.graph.initializer if i.name == q.input[2])
    zp.CopyFrom(helper.make_tensor(zp.name, TensorProto.FLOAT8E4M3FN, [], [1.0]))
    findings = check_qdq(bad)
    assert [f.rule for f in findings if f.severity == "error"] == ["zero-point"] * len(
        [n for n in bad.graph.node if q.input[2] in n.input])
    assert "non-zero FP8 zero point [1.0]" in findings[0].message
    old = copy.deepcopy(proto)
    old.opset_import[0].version = 17
    opset_errors = [f for f in check_qdq(old) if f.rule == "opset"]
    assert len(opset_errors) == 1 and "FP8 E4M3 Q/DQ) needs opset 19" in opset_errors[0].message


def test_fp8_needs_the_torchscript_exporter_and_opset_19(fp8_cnn, tmp_path):
    model, x = fp8_cnn
    with pytest.raises(ExportError, match="dynamo=False"):
        to_onnx(model, x[:1], tmp_path / "a.onnx", dynamo=True, dynamic_batch=False)
    with pytest.raises(ExportError, match="FP8 E4M3 Q/DQ .* needs opset >= 19"):
        to_onnx(model, x[:1], tmp_path / "a.onnx", opset=17)
    assert list(tmp_path.iterdir()) == []


def test_build_engine_says_fp8_needs_compute_capability_8_9(fp8_cnn, tmp_path):
    assert fp8_device_problem((9, 0)) is None and fp8_device_problem((8, 9)) is None
    assert "8.9" in fp8_device_problem((8, 6), "an A10") and "an A10 is 8.6" in \
        fp8_device_problem((8, 6), "an A10")
    assert "no CUDA device" in fp8_device_problem(None)
    model, x = fp8_cnn
    to_onnx(model, x[:1], tmp_path / "fp8.onnx")
    capable = (torch.cuda.is_available()
               and torch.cuda.get_device_capability() >= (8, 9))
    if capable:  # the check passes; what follows needs TensorRT
        pytest.skip("this GPU builds FP8; the engine build is tested with TensorRT")
    with pytest.raises(BuildError, match=r"compute capability >= 8\.9"):
        build_engine(tmp_path / "fp8.onnx", tmp_path / "fp8.engine")
    assert not (tmp_path / "fp8.engine").exists()
