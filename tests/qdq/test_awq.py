"""AWQ: scales that leave the float model unchanged (folded into LayerNorm / Linear or a
Mul), lower output error than round to nearest on inputs with outlier channels, the clip
search, the checkpoint round trip and the ONNX export (one Mul, DQ-only weights)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import export
import qdq
from qdq.awq import AWQConfig, apply_scales, search_clip, search_scale
from qdq.batches import feed_batch
from qdq.blockwise import dequantize_weight, quantize_weight
from qdq.formats import FormatError, _input_groups, weight_method_of, weight_only
from qdq.gptq import InputStatistics, to_matrix
from qdq.nn.weight_only import WeightOnlyLinear

OUTLIERS = (3, 17, 40)


def outlier_inputs(rows: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Mostly small activations, a few channels 30x larger (as LayerNorm outputs of
    transformers have)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, dim, generator=g)
    x[:, list(OUTLIERS)] *= 30
    return x


class Block(nn.Module):
    """A pre-LN block: LayerNorm read only by q/k (foldable, shared scale), Linear a read
    only by Linear b (foldable), GELU before c (a Mul), a residual."""

    def __init__(self, dim: int = 64) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.ln = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.a = nn.Linear(dim, 128)
        self.b = nn.Linear(128, dim)
        self.c = nn.Linear(dim, dim)
        with torch.no_grad():  # LayerNorm outputs with outlier channels
            self.ln.weight[list(OUTLIERS)] = 25.0

    def forward(self, x):
        h = self.ln(x)
        y = self.q(h) * torch.sigmoid(self.k(h))
        z = self.b(self.a(y))
        return x + self.c(torch.nn.functional.gelu(z))


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(6)
    return [torch.randn(8, 12, 64, generator=g) for _ in range(3)]


def test_scale_search_beats_round_to_nearest_on_outlier_channels():
    x = outlier_inputs(2048, 128)
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    stats = InputStatistics(nn.Linear(128, 64), torch.device("cpu"))
    stats.add(x)
    alpha, s, before, after = search_scale([w], stats, 4, 32)
    assert alpha > 0 and after < 0.8 * before
    # the error it reports is the real one: quantize W * s, run on x / s
    ws = w * s
    q = dequantize_weight(*quantize_weight(ws, 4, 32, "max"), 32)
    real = float(((x / s) @ q.T - x @ w.T).pow(2).sum()) / float((x @ w.T).pow(2).sum())
    assert real == pytest.approx(after, rel=1e-3)
    rtn = dequantize_weight(*quantize_weight(w, 4, 32, "max"), 32)
    real_rtn = float((x @ (rtn - w).T).pow(2).sum()) / float((x @ w.T).pow(2).sum())
    assert real_rtn == pytest.approx(before, rel=1e-3)


def test_clip_search_never_loses_to_max_per_block():
    x = outlier_inputs(1024, 64)
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(2))
    h = x.T @ x
    amax = search_clip(w, h, 4, 16, AWQConfig.clip_ratios)
    largest = w.abs().reshape(32, 4, 16).amax(2)
    assert amax.shape == (32, 4) and torch.all(amax <= largest)
    assert torch.any(amax < largest)  # some block clips
    clipped = dequantize_weight(*qdq.blockwise.quantize_with_amax(w, amax, 4, 16), 16)
    plain = dequantize_weight(*quantize_weight(w, 4, 16, "max"), 16)
    assert float((x @ (clipped - w).T).pow(2).sum()) < float((x @ (plain - w).T).pow(2).sum())


def test_scales_fold_and_keep_the_float_model(batches):
    model = Block().eval()
    reference = model(batches[0])
    layers = [(n, model.get_submodule(n)) for n in ("q", "k", "a", "b", "c")]
    groups = _input_groups(model, layers, batches[0], feed_batch)
    assert [[n for n, _ in g] for g in groups] == [["q", "k"], ["a"], ["b"], ["c"]]
    ln_weight = model.ln.weight.detach().clone()
    report = apply_scales(model, [groups], batches, feed_batch, 4, 16, progress=False)
    into = {", ".join(u.names): u.into for u in report.units}
    assert into["q, k"] == "layernorm ln"  # one shared s, folded
    assert into["c"] == "mul"  # after GELU: a Mul
    assert into["b"] in ("linear a", "-")
    assert not torch.equal(model.ln.weight, ln_weight)
    assert report.float_difference < 1e-5
    torch.testing.assert_close(model(batches[0]), reference, rtol=1e-5, atol=1e-5)
    report.remove_hooks()


def test_awq_lowers_the_model_output_error(batches):
    model = Block().eval()
    reference = [model(b) for b in batches]
    errors = {}
    for method in ("max", "awq"):
        m = copy.deepcopy(model)
        weight_only(m, 4, 16, method=method, batches=batches, progress=False)
        assert weight_method_of(m) == method
        with torch.no_grad():
            errors[method] = sum(float((m(b) - r).pow(2).mean())
                                 for b, r in zip(batches, reference, strict=True))
    assert errors["awq"] < 0.8 * errors["max"]


def test_a_float_change_is_refused_and_undone(batches, monkeypatch):
    """When the check finds the float outputs moved (here: a broken fold), every change
    is undone and weight_only raises one FormatError."""
    model = Block().eval()
    before = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(qdq.awq, "_fold_into", lambda producer, inverse: None)
    with pytest.raises(FormatError, match="changed the float model.*undone"):
        weight_only(model, 4, 16, method="awq", batches=batches, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert type(model.q) is nn.Linear and not model.c._forward_pre_hooks


def test_awq_options_are_checked(batches):
    model = Block().eval()
    with pytest.raises(FormatError, match="alphas must be numbers in"):
        weight_only(model, 4, 16, method="awq", batches=batches,
                    method_options={"alphas": [2.0]})
    with pytest.raises(FormatError, match=r"\['act_order'\] do not apply to method 'awq'"):
        weight_only(model, 4, 16, method="awq", batches=batches,
                    method_options={"act_order": True})
    with pytest.raises(FormatError, match="do not apply to method 'mse'"):
        weight_only(model, 4, 16, method="mse", method_options={"sequential": False})
    assert type(model.q) is nn.Linear


@pytest.mark.parametrize("method", ["awq", "awq+gptq"])
def test_save_restore_round_trip_bit_for_bit(tmp_path, batches, method):
    model = Block().eval()
    weight_only(model, 4, 16, method=method, batches=batches, progress=False,
                method_options={"sequential": False})
    assert model.c.input_scale is not None  # the Mul is state
    path = qdq.save(model, tmp_path / "awq.qdq.pt")
    restored = qdq.restore(Block().eval(), path)  # no calibration data
    assert restored.c.method == method
    state = restored.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key
    assert torch.equal(model(batches[0]), restored(batches[0]))


def test_onnx_export_runs_in_onnx_runtime_like_pytorch(tmp_path, batches):
    pytest.importorskip("onnxruntime")
    import onnx

    model = Block().eval()
    weight_only(model, 4, 16, method="awq", batches=batches, progress=False)
    assert isinstance(model.c, WeightOnlyLinear) and model.c.input_scale is not None
    x = batches[1]
    path = tmp_path / "awq.onnx"
    export.to_onnx(model, x, path)
    graph = onnx.load(str(path)).graph
    kinds = [n.op_type for n in graph.node]
    assert "QuantizeLinear" not in kinds
    assert kinds.count("DequantizeLinear") == 5
    scales = {i.name for i in graph.initializer if i.dims == [64]}
    muls = [n for n in graph.node if n.op_type == "Mul" and set(n.input) & scales]
    assert len(muls) == sum(getattr(m, "input_scale", None) is not None
                            for m in model.modules())
    findings = export.check_qdq(path)
    assert not findings, findings  # no error and no warning about the Mul
    report = export.verify(model, path, x)
    assert report.ok, report


def test_conv_layers_take_awq_with_a_channel_mul():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.GELU(),
                          nn.Conv2d(16, 8, 3, padding=1)).eval()
    g = torch.Generator().manual_seed(8)
    data = [torch.randn(4, 8, 10, 10, generator=g) * torch.linspace(0.1, 10, 8).view(8, 1, 1)
            for _ in range(2)]
    reference = model(data[0])
    m = copy.deepcopy(model)
    weight_only(m, 4, 8, method="awq", batches=data, progress=False)
    assert m[0].method == "awq"
    plain = copy.deepcopy(model)
    weight_only(plain, 4, 8)
    with torch.no_grad():
        err_awq = float((m(data[0]) - reference).pow(2).mean())
        err_rtn = float((plain(data[0]) - reference).pow(2).mean())
    assert err_awq < err_rtn
    assert to_matrix(m[0].weight_q()).shape == (16, 72)
