"""A quantizer that reads a constant (a position-bias table through an MLP, as in Swin V2
and DeBERTa) has no Q node: the exporter folds its Q/DQ into a constant. verify names it
as folded and still says "same"; a quantizer whose Q node is really missing is still
reported."""

from __future__ import annotations

import torch
from torch import nn

import qdq
import sensitivity
from export import to_onnx, verify


class PositionBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("table", torch.linspace(-1, 1, 16).reshape(8, 2))
        self.mlp = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 8))
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return self.fc(x) + self.mlp(self.table).sum(0)


def _quantized():
    torch.manual_seed(0)
    model = PositionBias().eval()
    qdq.replace_modules(model)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(1))
    sensitivity.calibrate(model, [x], progress=False)
    return model, x


def test_a_quantizer_on_a_constant_is_folded_not_missing(tmp_path):
    model, x = _quantized()
    to_onnx(model, x[:1], tmp_path / "m.onnx")
    for batch in (x, x[:1]):  # rows rolled, or one row with noise added
        report = verify(model, tmp_path / "m.onnx", batch)
        assert report.folded_constants == ["mlp.0._input_quantizer#0"]
        assert report.unmatched_quantizers == []
        assert report.ok(), report
        assert "folded their Q/DQ into the graph's constants" in str(report)


def test_a_quantizer_missing_from_the_graph_is_still_reported(tmp_path):
    model, x = _quantized()
    model.fc._input_quantizer.disable()
    to_onnx(model, x[:1], tmp_path / "m.onnx")  # the graph lacks fc's input Q/DQ
    model.fc._input_quantizer.enable()
    report = verify(model, tmp_path / "m.onnx", x)
    assert report.unmatched_quantizers == ["fc._input_quantizer#0"]
    assert not report.ok()
