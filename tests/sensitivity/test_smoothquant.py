"""sensitivity.smoothquant: exact in float, folded into LayerNorm where it may be, a Mul
elsewhere, lower quantization error, exported as Mul -> QuantizeLinear."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import qdq
import sensitivity
from export import check_qdq, to_onnx, verify
from sensitivity import SensitivityError
from sensitivity.smoothquant import quantized_output_error, smoothing_scale


class PreLNBlock(nn.Module):
    """A pre-LN transformer block without attention: LayerNorm -> q/k/v (LN output read by
    Linears only), LayerNorm -> fc1 -> GELU -> fc2, residuals around both."""

    def __init__(self, d: int = 16, outliers: tuple[int, ...] = (3, 11)) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.q, self.k, self.v = (nn.Linear(d, d) for _ in range(3))
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        with torch.no_grad():  # a few channels with a huge range, as trained LayerNorms have
            for ln in (self.ln1, self.ln2):
                ln.weight[list(outliers)] = 25.0
                ln.bias.uniform_(-0.5, 0.5)

    def forward(self, x):
        h = self.ln1(x)
        x = x + torch.tanh(self.q(h) * self.k(h)) * self.v(h)
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


def _data(rng, n=6):
    return [torch.randn(4, 10, 16, generator=rng) for _ in range(n)]


def _quantized_error(model, calib, test) -> float:
    sensitivity.calibrate(model, calib, progress=False)
    with torch.no_grad():
        quant = torch.cat([model(x) for x in test])
        with qdq.disable_quantization(model):
            ref = torch.cat([model(x) for x in test])
    return float((quant - ref).pow(2).mean() / ref.pow(2).mean())


def test_smoothing_scale_formula():
    act = torch.tensor([4.0, 0.5, 0.0, 2.0])
    weight = torch.tensor([0.25, 1.0, 0.3, 0.0])
    s = smoothing_scale(act, weight, 0.75).numpy()
    a, w = act.numpy().astype(np.float64), weight.numpy().astype(np.float64)
    expected = [a[0] ** 0.75 / w[0] ** 0.25, a[1] ** 0.75 / w[1] ** 0.25, 1.0, 1.0]
    np.testing.assert_allclose(s, expected, rtol=1e-12)


def test_quantized_output_error_matches_a_plain_numpy_version(rng):
    x = torch.randn(64, 8, generator=rng) * torch.tensor([1, 1, 9, 1, 1, 1, 1, 0.1])
    w = torch.randn(5, 8, generator=rng)
    s = torch.rand(8, generator=rng) + 0.5
    amax = float((x / s).abs().max()) * 0.9  # some values saturate
    got = quantized_output_error(x, w, s, amax)

    xs, ws = (x / s).double().numpy(), (w * s).double().numpy()
    step_x = np.float32(amax) / 127
    xq = np.clip(np.rint(xs.astype(np.float32) / step_x), -128, 127) * step_x
    step_w = np.abs(ws).max(axis=1, keepdims=True).astype(np.float32) / 127
    wq = np.clip(np.rint(ws.astype(np.float32) / step_w), -128, 127) * step_w
    want = np.mean((xq @ wq.T - x.double().numpy() @ w.double().numpy().T) ** 2)
    assert got == pytest.approx(want, rel=1e-4)


def test_smoothquant_exact_in_float_folds_and_lowers_the_error(rng):
    torch.manual_seed(0)
    float_model = PreLNBlock().eval()
    calib, test = _data(rng), _data(rng, 3)
    plain = copy.deepcopy(float_model)
    qdq.replace_modules(plain)
    smoothed = copy.deepcopy(plain)
    with torch.no_grad():
        reference = [float_model(x) for x in test]

    report = sensitivity.smoothquant(smoothed, calib, progress=False)

    by_layers = {tuple(r.layers): r for r in report.rows}
    assert set(by_layers) == {("q", "k", "v"), ("fc1",), ("fc2",)}
    assert by_layers[("q", "k", "v")].into == "layernorm ln1"
    assert by_layers[("fc1",)].into == "layernorm ln2"
    assert by_layers[("fc2",)].into in ("mul", "-")
    for row in report.smoothed:
        assert row.error_after < row.error_before
        assert row.act_max_after < row.act_max_before
    assert report.float_difference <= 1e-5
    with torch.no_grad(), qdq.disable_quantization(smoothed):
        for x, ref in zip(test, reference, strict=True):
            out = smoothed(x)
            assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5
    # LayerNorm folding moved the outliers out of the LayerNorm itself
    assert float(smoothed.ln1.weight.abs().max()) < float(float_model.ln1.weight.abs().max())
    assert _quantized_error(smoothed, calib, test) < 0.5 * _quantized_error(plain, calib, test)
    assert "layernorm ln1" in str(report) and report.to_dict()["rows"]


def test_mul_before_the_input_quantizer_exports_and_verifies(tmp_path, rng):
    torch.manual_seed(0)
    model = PreLNBlock().eval()
    qdq.replace_modules(model)
    calib = _data(rng)
    report = sensitivity.smoothquant(model, calib, alpha=0.5, layers=["fc2"], progress=False)
    (row,) = report.rows
    assert row.alpha == 0.5 and row.into == "mul"
    scale = model.fc2.input_scale
    assert scale.shape == (64,) and not torch.allclose(scale, torch.ones(64))
    sensitivity.calibrate(model, calib, progress=False)
    path = tmp_path / "smoothed.onnx"
    to_onnx(model, calib[0], path)
    graph = onnx.load(str(path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear"
               and n.name.startswith("/fc2/_input_quantizer")]
    assert len(q_nodes) == 1 and producer[q_nodes[0].input[0]].op_type == "Mul"
    assert [f for f in check_qdq(path) if f.severity == "error"] == []
    assert verify(model, path, calib[1]).ok()
    # state_dict round trip into a fresh model carries the scale
    fresh = PreLNBlock().eval()
    qdq.replace_modules(fresh)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh.fc2.input_scale, scale)


def test_smoothquant_bad_input(rng):
    model = PreLNBlock().eval()
    with pytest.raises(SensitivityError, match="no quantized Linear"):
        sensitivity.smoothquant(model, _data(rng), progress=False)
    qdq.replace_modules(model)
    with pytest.raises(SensitivityError, match="alpha"):
        sensitivity.smoothquant(model, _data(rng), alpha=1.5, progress=False)
    with pytest.raises(SensitivityError, match="no batch"):
        sensitivity.smoothquant(model, [], progress=False)
    with pytest.raises(SensitivityError, match="nope"):
        sensitivity.smoothquant(model, _data(rng), layers=["nope"], progress=False)
    assert getattr(model.fc2, "input_scale", None) is None  # nothing changed
