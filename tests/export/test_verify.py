"""ONNX Runtime against PyTorch on real torchvision models and a transformer layer.

The free run drifts for deep CNNs: a handful of values sit within float rounding of a
k+0.5 boundary after a conv, round one way in PyTorch and the other in ONNX Runtime, and
each flip moves many values downstream. The forced run (PyTorch takes ONNX Runtime's
quantized activations) shows the two compute the same function: identical Q/DQ on the same
input, only one-step flips at rounding boundaries, outputs equal to float rounding.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import qdq
from export import VerifyError, to_onnx, verify
from tests.export.conftest import calibrate, quantized_torchvision


def _assert_same_function(report, classifier: bool = True) -> None:
    print(report)
    assert report.qdq_mismatches == 0
    assert report.only_boundary_flips, report
    assert report.forced_rel_l2 <= 1e-3
    assert report.unmatched_quantizers == []
    assert len(report.quantizers) > 0
    if classifier:
        assert report.forced_outputs[0].top1 == 1.0
        assert report.top1 == 1.0


def test_resnet18_differences_are_rounding_flips(resnet18_onnx):
    model, inputs, path = resnet18_onnx
    report = verify(model, path, inputs)
    _assert_same_function(report)
    # every enabled activation quantizer call was matched to a Q node (the exporter merges
    # the identical input quantizers of conv1 and downsample.0 into one Q node)
    assert len(report.quantizers) == 23
    # the drift of the free run is explained by flips: the first quantizers where the free
    # run differs hold exactly the forced-run flips
    first = next(q for q in report.quantizers if q.free_differing)
    assert first.free_differing <= first.flips + 20
    for q in report.quantizers:
        if q.flips:
            assert q.max_flip_steps == 1 and q.max_boundary_distance <= 1e-3
            assert q.max_input_diff_steps < 1e-3


def test_mobilenet_v2_same_function():
    model, inputs = quantized_torchvision("mobilenet_v2", 32, settle=True)
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mobilenet_v2.onnx"
        to_onnx(model, inputs[:1], path, fold_bn=False)
        report = verify(model, path, inputs)
    _assert_same_function(report)
    assert len(report.quantizers) >= 50


class EncoderModel(nn.Module):
    """One transformer encoder layer, batch first; its two Linear layers get quantized."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0)

    def forward(self, x):
        return self.layer(x)


def test_transformer_encoder_layer_matches_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = EncoderModel().eval()
    qdq.replace_modules(model)
    x = torch.randn(16, 64, 64)  # (sequence, batch 64, features)
    calibrate(model, x[:, :16])
    path = tmp_path / "encoder.onnx"
    to_onnx(model, x, path, fold_bn=False, dynamic_batch=False, opset=14)
    report = verify(model, path, x)
    _assert_same_function(report, classifier=False)
    assert report.rel_l2 <= 1e-3  # shallow: the free run itself agrees
    assert {q.name for q in report.quantizers} == {"layer.linear1._input_quantizer",
                                                   "layer.linear2._input_quantizer"}


def test_verify_catches_a_model_that_differs(resnet18_onnx, tmp_path):
    """The checks can fail: a weight changed after export and an amax changed after export."""
    model, inputs, path = resnet18_onnx
    import copy

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.layer3[0].conv1.weight.mul_(1.05)
    report = verify(changed, path, inputs[:8])
    assert not report.only_boundary_flips and not report.ok()
    worst = max(report.quantizers, key=lambda q: q.max_input_diff_steps)
    assert worst.name == "layer3.0.conv2._input_quantizer" and worst.max_flip_steps > 1

    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.fc.bias.add_(0.1)
    report = verify(changed, path, inputs[:8])
    assert report.forced_rel_l2 > 1e-3 and not report.ok()

    changed = copy.deepcopy(model)
    q = changed.layer2[0].conv2._input_quantizer
    q.amax = q.amax * 1.01
    report = verify(changed, path, inputs[:8])
    assert report.unmatched_quantizers == ["layer2.0.conv2._input_quantizer#0"]
    assert not report.ok() and "no Q node of the same shape and scale" in str(report)


def test_report_text_shows_flips(resnet18_onnx):
    model, inputs, path = resnet18_onnx
    text = str(verify(model, path, inputs[:4], noise_floor=True))
    assert "rel L2" in text and "forced run" in text and "noise floor" in text
    assert "maxpool._input_quantizer" in text


@pytest.mark.parametrize("what", ["missing", "corrupt", "shape", "count"])
def test_bad_input_one_clear_error(resnet18_onnx, tmp_path, what):
    model, inputs, path = resnet18_onnx
    if what == "missing":
        with pytest.raises(VerifyError, match="no such file"):
            verify(model, tmp_path / "nope.onnx", inputs[:2])
    elif what == "corrupt":
        bad = tmp_path / "bad.onnx"
        bad.write_bytes(b"\x08\x07 this is not protobuf" * 10)
        with pytest.raises(VerifyError, match="bad.onnx"):
            verify(model, bad, inputs[:2])
    elif what == "shape":
        with pytest.raises(VerifyError, match=r"expects shape \['\?', 3, 64, 64\]"):
            verify(model, path, torch.randn(2, 3, 32, 32))
    else:
        with pytest.raises(VerifyError, match="takes 1 inputs, got 2"):
            verify(model, path, (inputs[:2], inputs[:2]))


def test_identical_when_nothing_is_quantized(tmp_path):
    """With every quantizer off, the exported graph is the float model."""
    model, inputs = quantized_torchvision("resnet18", 32)
    with qdq.disable_quantization(model):
        to_onnx(model, inputs[:1], tmp_path / "f.onnx", fold_bn=False)
        report = verify(model, tmp_path / "f.onnx", inputs[:8])
    assert report.rel_l2 < 1e-5 and report.quantizers == []
    assert np.isfinite(report.max_abs)
