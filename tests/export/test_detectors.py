"""Detectors end to end: a YOLO-style network (C2f, SPPF, upsample + concat, three heads)
and the tensor part of torchvision detectors (backbone + FPN, dict outputs) quantize,
take the placement rules, export with every output named and only the batch dynamic,
lint, verify, and save/restore bit for bit."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision

import qdq
from export import check_qdq, to_onnx, verify
from qdq.rules import apply_rules
from tests.export.conftest import calibrate, settle_batchnorm
from tests.export.yolo_tiny import TinyYolo


def _dims(values) -> list[list]:
    return [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values]


def _yolo() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = TinyYolo().eval()
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    settle_batchnorm(model, x)
    return model, x


def test_yolo_style_detector_end_to_end(tmp_path):
    model, x = _yolo()
    qdq.replace_modules(model)
    model = apply_rules(model, x[:1])
    report = model.qdq_rules_report
    assert not report.reverted_parts and not getattr(report, "untraced", None)
    assert report.changes["maxpool_shared"] >= 3  # SPPF's chain shares one scale
    assert report.changes["concat_shared"] >= 1
    calibrate(model, x)
    result = to_onnx(model, x[:1], tmp_path / "yolo.onnx")
    assert result.output_names == ["output0", "output1", "output2"]
    findings = check_qdq(tmp_path / "yolo.onnx")
    assert findings == [], "\n".join(map(str, findings))
    proto = onnx.load(str(tmp_path / "yolo.onnx"))
    assert [d[0] for d in _dims(proto.graph.output)] == ["batch"] * 3
    assert _dims(proto.graph.input) == [["batch", 3, 64, 64]]
    checked = verify(model, tmp_path / "yolo.onnx", x)
    assert checked.ok(1e-3), checked
    path = qdq.save(model, tmp_path / "yolo.qdq.pt")
    fresh = qdq.restore(TinyYolo(), path).eval()
    with torch.no_grad():
        for a, b in zip(fresh(x), model(x), strict=True):
            assert torch.equal(a, b)


@pytest.mark.parametrize("build", [
    lambda: torchvision.models.detection.fasterrcnn_mobilenet_v3_large_fpn(
        weights=None, weights_backbone=None, num_classes=3),
    lambda: torchvision.models.detection.retinanet_resnet50_fpn(
        weights=None, weights_backbone=None, num_classes=3),
], ids=["fasterrcnn_mobilenet_v3_fpn", "retinanet_resnet50_fpn"])
def test_torchvision_detector_backbone_exports_every_feature_map(tmp_path, build):
    """The tensor part of a detector (backbone + FPN) returns a dict of feature maps:
    each becomes a named ONNX output, and only the batch is dynamic."""
    torch.manual_seed(0)
    backbone = build().backbone.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    settle_batchnorm(backbone, x)
    with torch.no_grad():
        keys = list(backbone(x).keys())
    qdq.replace_modules(backbone)
    calibrate(backbone, x)
    result = to_onnx(backbone, x[:1], tmp_path / "fpn.onnx")
    assert result.output_names == [f"output{k}" if k[0].isdigit() else k for k in keys]
    proto = onnx.load(str(tmp_path / "fpn.onnx"))
    assert _dims(proto.graph.input) == [["batch", 3, 64, 64]]
    assert all(d[0] == "batch" and all(isinstance(v, int) or "batch" not in str(v)
                                       for v in d[1:2]) for d in _dims(proto.graph.output))
    session = ort.InferenceSession(str(tmp_path / "fpn.onnx"),
                                   providers=["CPUExecutionProvider"])
    three = torch.randn(3, 3, 64, 64).numpy()
    outs = session.run(None, {"input": three})
    with torch.no_grad():
        ref = backbone(torch.from_numpy(three))
    assert [o.shape for o in outs] == [tuple(ref[k].shape) for k in keys]
    # random weights make the free run drift through one-step rounding flips; the
    # forced run (PyTorch fed ONNX Runtime's quantized activations) must agree
    checked = verify(backbone, tmp_path / "fpn.onnx", x)
    assert checked.ok(1e-3), checked
