"""to_onnx: graph structure, numerics, options and failures, on real models and files."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from torch import nn

import qdq
from export import ExportError, check_qdq, to_onnx, verify
from export.onnx_export import dynamo_exporter_available
from tests.export.conftest import calibrate, quantized_torchvision


def small_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.ConvTranspose2d(8, 4, 2, stride=2), nn.Flatten(),
                         nn.Linear(4 * 16 * 16, 10)).eval()


@pytest.fixture
def net():
    torch.manual_seed(0)
    model = small_net()
    qdq.replace_modules(model)
    calibrate(model, torch.randn(8, 3, 8, 8))
    return model


def _run(path, x: torch.Tensor) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_every_enabled_quantizer_becomes_q_dq(net, tmp_path):
    net[5]._weight_quantizer.disable()
    result = to_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "n.onnx", fold_bn=False)
    model = onnx.load(str(tmp_path / "n.onnx"))
    enabled = [n for n, q in qdq.quantizers(net) if q.is_enabled]
    assert result.quantize_nodes == result.dequantize_nodes == len(enabled) == 5
    consts = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    by_name = {n.name: n for n in model.graph.node if n.op_type == "QuantizeLinear"}
    for name, q in qdq.quantizers(net):
        if not q.is_enabled:
            continue
        node = next(v for k, v in by_name.items() if k.startswith(f"/{name.replace('.', '/')}/"))
        scale, zp = consts[node.input[1]], consts[node.input[2]]
        # scale = amax / 127 in fp32, bit for bit; int8 zero point 0
        expected = (q.amax.float().clamp_min(2.0**-24) / 127).reshape(-1).numpy()
        assert np.array_equal(scale.reshape(-1), expected)
        assert zp.dtype == np.int8 and not zp.any()
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if "weight" in name:
            assert axis == (1 if name.startswith("3.") else 0)
    assert check_qdq(model) == [] or all(f.severity == "warning" for f in check_qdq(model))
    report = verify(net, tmp_path / "n.onnx", torch.randn(16, 3, 8, 8))
    assert report.ok() and report.rel_l2 <= 1e-5


def test_batchnorm_folded_before_export(tmp_path):
    model, inputs = quantized_torchvision("resnet18", 32)
    before = copy.deepcopy(model.state_dict())
    result = to_onnx(model, inputs[:1], tmp_path / "r.onnx")
    graph = onnx.load(str(tmp_path / "r.onnx")).graph
    assert not [n for n in graph.node if n.op_type == "BatchNormalization"]
    assert len(result.folded_batchnorms) == 20 and "bn1" in result.folded_batchnorms
    # the caller's model is untouched
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    report = verify(model, tmp_path / "r.onnx", inputs[:16])  # folds a copy to compare
    assert report.ok(), report
    assert not [f for f in check_qdq(tmp_path / "r.onnx") if f.severity == "error"]


def test_export_says_when_batchnorm_was_folded_already(tmp_path):
    """A model folded when its weights were quantized (or by the placement rules) exports
    with "BatchNorm already folded in the model (N)", not "0 BatchNorm folded"; the same
    after qdq.save/restore."""
    x = torch.randn(2, 3, 8, 8)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="float model"):
        plain = to_onnx(small_net(), x[:1], tmp_path / "plain.onnx")
    assert plain.folded_batchnorms == ["1"] and plain.folded_before == []
    assert ", 1 BatchNorm folded); float model: no enabled quantizer" in str(plain)
    torch.manual_seed(0)
    w4 = small_net()
    qdq.weight_only(w4, bits=4, block_size=4, ignore=["0"])
    result = to_onnx(w4, x[:1], tmp_path / "w4.onnx")
    assert result.folded_batchnorms == [] and result.folded_before == ["1"]
    assert str(result).endswith(", BatchNorm already folded in the model (1))")
    qdq.save(w4, tmp_path / "w4.qdq.pt")
    restored = qdq.restore(small_net(), tmp_path / "w4.qdq.pt")
    again = to_onnx(restored, x[:1], tmp_path / "again.onnx")
    assert again.folded_before == ["1"] and again.folded_batchnorms == []
    torch.manual_seed(0)
    ruled = qdq.rules.apply_rules(small_net(), x[:1])
    calibrate(ruled, x)
    result = to_onnx(ruled, x[:1], tmp_path / "ruled.onnx")
    assert result.folded_before == ["1"] and "already folded in the model (1)" in str(result)
    assert to_onnx(small_net(), x[:1], tmp_path / "kept.onnx", fold_bn=False
                   ).batchnorm_text() == "no BatchNorm folded"


def test_int8_weights_smaller_and_identical(net, tmp_path):
    x = torch.randn(4, 3, 8, 8)
    a = to_onnx(net, x[:1], tmp_path / "f32.onnx", fold_bn=False)
    b = to_onnx(net, x[:1], tmp_path / "i8.onnx", fold_bn=False, int8_weights=True)
    assert b.bytes < a.bytes / 3
    assert b.quantize_nodes == a.quantize_nodes - 3
    np.testing.assert_array_equal(_run(a.path, x), _run(b.path, x))


def test_dynamic_batch(net, tmp_path):
    to_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "n.onnx", fold_bn=False)
    assert _run(tmp_path / "n.onnx", torch.randn(5, 3, 8, 8)).shape == (5, 10)


def test_dead_channel_exports_positive_scale(net, tmp_path):
    with torch.no_grad():
        net[0].weight[2].zero_()
    calibrate(net, torch.randn(8, 3, 8, 8))
    assert float(net[0]._weight_quantizer.amax.reshape(-1)[2]) == 0.0
    to_onnx(net, torch.randn(1, 3, 8, 8), tmp_path / "n.onnx", fold_bn=False)
    assert not [f for f in check_qdq(tmp_path / "n.onnx") if f.rule == "scale"]
    assert np.isfinite(_run(tmp_path / "n.onnx", torch.randn(2, 3, 8, 8))).all()


def test_uncalibrated_is_refused_by_name(tmp_path):
    model = small_net()
    qdq.replace_modules(model)
    with pytest.raises(ExportError,
                       match=r"6 enabled quantizers have no calibrated amax.*0\._input_q"):
        to_onnx(model, torch.randn(1, 3, 8, 8), tmp_path / "n.onnx")
    assert _leftovers(tmp_path) == []


def test_fp16_model_keeps_fp32_qdq_with_casts(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval()
    qdq.replace_modules(model)
    calibrate(model, torch.randn(4, 3, 8, 8))
    to_onnx(model.half(), torch.randn(1, 3, 8, 8).half(), tmp_path / "h.onnx", fold_bn=False)
    graph = onnx.load(str(tmp_path / "h.onnx")).graph
    producers = {o: n for n in graph.node for o in n.output}
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in producers:
            assert producers[node.input[0]].op_type == "Cast"
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert not [f for f in check_qdq(tmp_path / "h.onnx") if f.severity == "error"]


def test_dynamo_exporter_passes_the_same_checks(net, tmp_path):
    x = torch.randn(2, 3, 8, 8)
    if not dynamo_exporter_available():  # torch 2.4: one clear error, no file
        with pytest.raises(ExportError, match="torch 2.5 or newer"):
            to_onnx(net, x, tmp_path / "d.onnx", dynamo=True, dynamic_batch=False)
        assert list(tmp_path.iterdir()) == []
        pytest.skip(f"torch {torch.__version__} has no dynamo ONNX exporter with dynamic_shapes")
    result = to_onnx(net, x, tmp_path / "d.onnx", dynamo=True, dynamic_batch=False,
                     fold_bn=False)
    assert result.quantize_nodes == 6
    assert not [f for f in check_qdq(tmp_path / "d.onnx") if f.severity == "error"]
    assert verify(net, tmp_path / "d.onnx", x).ok()
    with pytest.raises(ExportError, match="dynamic_batch=False"):
        to_onnx(net, x, tmp_path / "e.onnx", dynamo=True)


class NoTrace(nn.Module):
    def forward(self, x):
        return float(x.mean())  # a Python number: the tracer cannot record it


@pytest.mark.parametrize("case", ["not-traceable", "wrong-shape", "missing-folder",
                                  "parent-is-file", "opset"])
def test_bad_input_one_error_no_file(net, tmp_path, case):
    x = torch.randn(1, 3, 8, 8)
    target = tmp_path / "out.onnx"
    if case == "not-traceable":
        with pytest.raises(ExportError, match="model output output is a float, not a tensor"):
            to_onnx(NoTrace(), x, target)
    elif case == "wrong-shape":
        with pytest.raises(ExportError, match="does not run on the example inputs"):
            to_onnx(net, torch.randn(1, 5, 8, 8), target, fold_bn=False)
    elif case == "missing-folder":
        with pytest.raises(ExportError, match="does not exist"):
            to_onnx(net, x, tmp_path / "nope" / "out.onnx", fold_bn=False)
    elif case == "parent-is-file":
        (tmp_path / "afile").write_text("x")
        with pytest.raises(ExportError, match="not a folder"):
            to_onnx(net, x, tmp_path / "afile" / "out.onnx", fold_bn=False)
    else:
        with pytest.raises(ExportError, match="opset 11"):
            to_onnx(net, x, target, opset=11)
    assert [p for p in _leftovers(tmp_path) if p != "afile"] == []
