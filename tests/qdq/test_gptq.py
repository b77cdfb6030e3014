"""GPTQ: output error against round to nearest on correlated inputs, RTN itself for an
identity Hessian, codes and scales the weight-only layers hold exactly, act_order, Conv,
and weight_only(method=...) with its refusals and the checkpoint round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import qdq
from qdq.blockwise import dequantize_weight, quantize_weight
from qdq.formats import FormatError, weight_method_of, weight_only
from qdq.gptq import (
    GPTQConfig,
    InputStatistics,
    collect_statistics,
    from_matrix,
    gptq_quantize,
    to_matrix,
)
from qdq.nn.weight_only import WeightOnlyConv2d, WeightOnlyLinear


def correlated_inputs(rows: int, dim: int, rank: int = 12, seed: int = 0) -> torch.Tensor:
    """Inputs living near a low-rank subspace: where GPTQ's compensation pays off."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(rows, rank, generator=g) @ torch.randn(rank, dim, generator=g)
            + 0.05 * torch.randn(rows, dim, generator=g))


def output_error(x: torch.Tensor, w: torch.Tensor, codes, scale, block) -> float:
    wq = dequantize_weight(codes, scale, block)
    return float((x @ (wq - w).T).pow(2).mean())


@pytest.fixture(scope="module")
def layer_data():
    x = correlated_inputs(1024, 128)
    w = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    return x, w, 2 * x.T @ x / x.shape[0]


@pytest.mark.parametrize("block", [None, 32])
@pytest.mark.parametrize("amax_method", ["max", "mse"])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(layer_data, block, amax_method):
    x, w, h = layer_data
    rtn = output_error(x, w, *quantize_weight(w, 4, block, amax_method), block)
    gptq = output_error(x, w, *gptq_quantize(w, h, 4, block, amax_method), block)
    ordered = output_error(x, w, *gptq_quantize(w, h, 4, block, amax_method,
                                                config=GPTQConfig(act_order=True)), block)
    assert gptq < 0.3 * rtn
    assert ordered < 0.3 * rtn


@pytest.mark.parametrize("bits,block,amax_method", [(4, None, "max"), (4, 16, "mse"),
                                                    (8, 64, "max"), (8, None, "mse")])
def test_identity_hessian_is_round_to_nearest(bits, block, amax_method):
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(2))
    expected = quantize_weight(w, bits, block, amax_method)
    got = gptq_quantize(w, torch.eye(128), bits, block, amax_method)
    assert torch.equal(got[0], expected[0])
    assert torch.equal(got[1], expected[1])


def test_codes_and_scales_are_what_the_layer_holds(layer_data):
    x, w, h = layer_data
    codes, scale = gptq_quantize(w, h, 4, 32, "mse", config=GPTQConfig(act_order=True))
    assert codes.dtype == torch.int8 and int(codes.min()) >= -8 and int(codes.max()) <= 7
    assert scale.shape == (48, 4)
    linear = nn.Linear(128, 48)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = WeightOnlyLinear.from_quantized(
        linear, qdq.nn.weight_only.QuantizedWeight(codes, scale, 4, 32), "gptq")
    assert torch.equal(layer.weight, codes.float() * scale.repeat_interleave(32, 1))
    assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, linear.bias))


def test_act_order_keeps_the_layout_and_blocks(layer_data):
    """The codes come back in the weight's own column order: they re-quantize to
    themselves with their scales, and most of them equal plain GPTQ's."""
    _, w, h = layer_data
    plain = gptq_quantize(w, h, 4, 32, "max")
    ordered_codes, ordered_scale = gptq_quantize(w, h, 4, 32, "max",
                                                 config=GPTQConfig(act_order=True))
    deq = dequantize_weight(ordered_codes, ordered_scale, 32)
    again = torch.round(deq / ordered_scale.repeat_interleave(32, 1))
    assert torch.equal(again, ordered_codes.float())
    # the static block scales are those of the unchanged weight: blockwise max
    assert torch.equal(ordered_scale, quantize_weight(w, 4, 32, "max")[1])
    assert (ordered_codes == plain[0]).float().mean() > 0.5


def test_dead_inputs_get_zero_weight(layer_data):
    x, w, _ = layer_data
    x = x.clone()
    x[:, 5] = 0
    h = 2 * x.T @ x / x.shape[0]
    codes, _ = gptq_quantize(w, h, 4, 32, "max")
    assert torch.all(codes[:, 5] == 0)
    assert torch.isfinite(codes.float()).all()


def test_conv_matrix_layout_round_trips():
    w = torch.randn(6, 8, 3, 3)
    m = to_matrix(w)
    assert m.shape == (6, 72)
    assert torch.equal(m[:, :8], w[:, :, 0, 0])  # kernel position 0, every channel
    assert torch.equal(from_matrix(m, w.shape), w)


def test_conv_statistics_match_the_unfolded_layer():
    """X^T X over the unfolded patches: the output error it predicts is the conv's."""
    conv = nn.Conv2d(4, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 4, 6, 6)
    stats = InputStatistics(conv, torch.device("cpu"))
    stats.add(x)
    delta = torch.randn_like(conv.weight)
    predicted = float(((to_matrix(delta) @ stats.xtx) * to_matrix(delta)).sum())
    actual = float(torch.nn.functional.conv2d(x, delta, padding=1).pow(2).sum())
    assert predicted == pytest.approx(actual, rel=1e-4)
    assert stats.rows == 2 * 36


class Tower(nn.Module):
    """A small real model: conv stem, then Linears whose inputs are correlated."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = torch.relu(self.conv(x)).mean((2, 3))
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


@pytest.fixture(scope="module")
def tower_batches():
    g = torch.Generator().manual_seed(4)
    base = torch.randn(16, 8, 8, generator=g)
    return [base + 0.3 * torch.randn(16, 16, 8, 8, generator=g) for _ in range(4)]


def test_weight_only_gptq_on_a_model(tower_batches):
    model = Tower().eval()
    reference = [model(b) for b in tower_batches]
    errors = {}
    for method in ("max", "gptq"):
        m = copy.deepcopy(model)
        weight_only(m, 4, 16, method=method, batches=tower_batches,
                    progress=False)
        assert isinstance(m.conv, WeightOnlyConv2d) and isinstance(m.fc1, WeightOnlyLinear)
        assert weight_method_of(m) == method
        with torch.no_grad():
            errors[method] = sum(float((m(b) - r).pow(2).mean())
                                 for b, r in zip(tower_batches, reference, strict=True))
    assert errors["gptq"] < 0.7 * errors["max"]


def test_collect_statistics_feeds_every_kind_of_batch():
    model = nn.Sequential(nn.Linear(8, 4))
    x = torch.randn(5, 8)
    for batches in ([x, x], [(x, torch.zeros(5))], [{"input": x, "labels": 1}]):
        stats = collect_statistics(model, [model[0]], batches)[0]
        assert stats.rows == 5 * len(batches)
        assert torch.allclose(stats.xtx, len(batches) * x.T @ x, rtol=1e-5)


def test_method_errors_change_nothing(tower_batches):
    model = Tower().eval()
    before = copy.deepcopy(model.state_dict())
    cases = [
        (dict(method="gptq"), "needs calibration data"),
        (dict(method="awq", batches=[]), "batches are empty"),
        (dict(method="gptq", batches=tower_batches[0]), "wrap it in a list"),
        (dict(method="gptq", batches=5), "must be an iterable"),
        (dict(method="rtn", batches=tower_batches), "choose one of max, mse, awq, gptq"),
        (dict(method="gptq", batches=tower_batches, method_options={"alpha": 1}),
         r"method_options \['alpha'\] do not apply"),
        (dict(method="gptq", batches=tower_batches, method_options={"percdamp": 2}),
         "percdamp must be in"),
    ]
    for kwargs, message in cases:
        with pytest.raises(FormatError, match=message):
            weight_only(model, 4, 16, **kwargs)
        assert type(model.fc1) is nn.Linear
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_save_restore_round_trip_bit_for_bit(tmp_path, tower_batches):
    model = Tower().eval()
    weight_only(model, 4, 16, method="gptq", batches=tower_batches, progress=False,
                method_options={"act_order": True})
    path = qdq.save(model, tmp_path / "gptq.qdq.pt")
    restored = qdq.restore(Tower().eval(), path)  # no calibration data
    assert restored.fc1.method == "gptq" and weight_method_of(restored) == "gptq"
    for key, value in model.state_dict().items():
        assert torch.equal(value, restored.state_dict()[key]), key
    x = tower_batches[0]
    assert torch.equal(model(x), restored(x))


def test_layers_whose_inputs_are_not_read_fall_back_with_a_warning():
    torch.manual_seed(9)
    model = nn.Sequential(nn.Conv2d(16, 16, 3, groups=4), nn.Flatten(),
                          nn.Linear(16 * 4 * 4, 8)).eval()
    data = [torch.randn(4, 16, 6, 6) for _ in range(2)]
    with pytest.warns(UserWarning, match=r"1 layer\(s\) rounded to nearest \(max\) instead: "
                                         r"0 \(grouped convolution \(groups=4\)\)"):
        weight_only(model, 4, None, method="gptq", batches=data, progress=False)
    assert model[0].method == "max" and model[2].method == "gptq"
    assert weight_method_of(model) == "mixed"


def test_gptq_weights_of_an_int8_qdq_model(tmp_path):
    """GPTQ chooses the INT8 weights of a Q/DQ model: the weight quantizer reproduces the
    codes exactly (so the exported QuantizeLinear does too), and the layer output moves
    less than with round-to-nearest weights on correlated inputs."""
    import copy

    import sensitivity
    from export import to_onnx, verify
    from qdq.formats import FormatError, gptq_weights

    torch.manual_seed(0)
    mix = torch.randn(32, 32)
    batches = [torch.randn(64, 32) @ mix for _ in range(4)]
    float_model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval()
    rtn = copy.deepcopy(float_model)
    qdq.replace_modules(rtn)
    sensitivity.calibrate(rtn, batches, progress=False)
    model = copy.deepcopy(rtn)
    done = gptq_weights(model, batches)
    assert done == ["0", "2"]
    for layer in (model[0], model[2]):
        with torch.no_grad():
            assert torch.equal(layer._weight_quantizer(layer.weight), layer.weight)
    x = torch.randn(256, 32) @ mix
    with torch.no_grad(), qdq.disable_quantization(model), qdq.disable_quantization(rtn):
        # the first layer with float inputs: GPTQ's weights are already their codes, the
        # round-to-nearest ones need their weight quantizer on
        ref = float_model[0](x)
        err_gptq = (model[0](x) - ref).pow(2).mean()
        rtn[0]._weight_quantizer.enable()
        err_rtn = (rtn[0](x) - ref).pow(2).mean()
    assert err_gptq < err_rtn
    path = tmp_path / "g.onnx"
    to_onnx(model, x[:2], path)
    assert verify(model, path, x[:8]).ok()
    with pytest.raises(FormatError, match="no quant Linear/Conv"):
        gptq_weights(copy.deepcopy(float_model), batches)
