"""FP8 E4M3: the grid against a decoder written from the format's definition, fake quant
against torch's own cast and against ONNX Runtime's Q/DQ-19, the descriptor, the quantizer
(calibration, gradients) and switching a model between INT8 and FP8."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import qdq
from qdq import QuantDescriptor, TensorQuantizer
from qdq.calib import HistogramCalibrator
from qdq.calib.base import CalibrationError
from qdq.fp8 import (
    FP8_E4M3_MAX,
    fp8_boundary_distance,
    fp8_codes,
    fp8_mse_amax,
    round_to_fp8,
)
from qdq.tensor_quant import fake_quant, scale_from_amax, tensor_quant
from tests.conftest import needs_cuda

FP8 = (4, 3)


def e4m3_values() -> list[float]:
    """Every finite non-negative E4M3FN value, decoded from the definition: 1 sign, 4
    exponent (bias 7), 3 mantissa bits; exponent 0 is subnormal; S.1111.111 is NaN."""
    values = []
    for exponent, mantissa in itertools.product(range(16), range(8)):
        if exponent == 15 and mantissa == 7:
            continue
        if exponent == 0:
            values.append(mantissa / 8 * 2.0 ** -6)
        else:
            values.append((1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return values


GRID = np.array(e4m3_values())


def plain_round(r: float) -> float:
    """Nearest E4M3 value to ``r`` (ties to the even mantissa), saturating at 448."""
    sign = -1.0 if r < 0 else 1.0
    a = min(abs(r), 448.0)
    i = int(np.searchsorted(GRID, a))
    if i == 0:
        return sign * GRID[0]
    if i == len(GRID):
        return sign * GRID[-1]
    lo, hi = GRID[i - 1], GRID[i]
    if a - lo < hi - a:
        return sign * lo
    if a - lo > hi - a:
        return sign * hi
    return sign * (lo if (i - 1) % 2 == 0 else hi)  # even code = even mantissa


def test_grid_from_the_definition_is_torchs_grid():
    assert len(GRID) == 127 and GRID[-1] == 448.0 and GRID[1] == 2.0 ** -9
    codes = torch.arange(127, dtype=torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    assert np.array_equal(codes, GRID)


def test_round_to_fp8_equals_a_plain_rounding_of_every_kind_of_value(rng):
    mids = (GRID[1:] + GRID[:-1]) / 2
    values = np.concatenate([
        GRID, -GRID, mids, -mids,                                    # ties
        np.nextafter(mids, 0), np.nextafter(mids, 1e9),              # just either side
        torch.randn(20000, generator=rng).double().numpy() * 40,
        torch.rand(2000, generator=rng).double().numpy() * 2.0 ** -8,  # subnormals
        [500.0, -1e6, 464.0, 447.9, 0.0],
    ]).astype(np.float32)
    ours = round_to_fp8(torch.from_numpy(values)).numpy()
    plain = np.array([plain_round(float(v)) for v in values], dtype=np.float32)
    assert np.array_equal(ours, plain)


@pytest.mark.parametrize("shape, amax_shape", [((64, 33), ()), ((8, 3, 5, 5), (8, 1, 1, 1))])
def test_fake_quant_is_torchs_cast_times_the_scale(rng, shape, amax_shape):
    x = torch.randn(shape, generator=rng) * 3
    amax = torch.rand(amax_shape, generator=rng) * 4 + 0.1
    scale = amax / 448
    expected = (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale
    assert torch.equal(fake_quant(x, amax, FP8), expected)
    assert torch.equal(scale_from_amax(amax, FP8), scale)
    grid, step = tensor_quant(x, amax, FP8)
    assert torch.equal(grid, (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float())
    assert torch.equal(step, 448 / amax)  # pytorch-quantization's scale: 1 / step


def test_fake_quant_equals_onnx_runtime_quantize_dequantize_19(rng):
    import onnxruntime as ort
    from onnx import TensorProto, checker, helper, numpy_helper

    x = (torch.randn(4, 4096, generator=rng) * 5).numpy()
    x[0, :4] = [1e5, -1e5, 0.0, 3e-6]
    scale = np.float32(0.0173)
    zp = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0.0])
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"])], "fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [zp, numpy_helper.from_array(np.array(scale), "s")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])
    checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    ours = fake_quant(torch.from_numpy(x), torch.tensor(scale * 448), FP8).numpy()
    assert np.array_equal(ours, y)


def test_straight_through_gradient_and_amax_gradient():
    x = torch.tensor([0.1, -0.7, 2.0, -3.0], requires_grad=True)
    amax = torch.tensor(1.0, requires_grad=True)
    fake_quant(x, amax, FP8).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0, 0.0]
    # saturated values move with amax (+1 and -1); the inside ones by their rounding error
    inside = [(round_to_fp8(torch.tensor(v * 448)) - v * 448) / 448 for v in (0.1, -0.7)]
    assert amax.grad.item() == pytest.approx(float(sum(inside)) + 1 - 1, abs=1e-6)


def test_codes_and_boundaries_follow_the_grid():
    grid = torch.from_numpy(np.concatenate([-GRID[::-1], GRID[1:]])).float()
    codes = fp8_codes(grid)
    assert codes.tolist() == list(range(-126, 127))
    mids = (grid[1:] + grid[:-1]) / 2
    assert torch.all(fp8_boundary_distance(mids) < 1e-6)
    assert torch.all(fp8_boundary_distance(grid) == 0.5)
    quarter = grid[:-1] + (grid[1:] - grid[:-1]) / 4
    assert torch.allclose(fp8_boundary_distance(quarter), torch.full_like(quarter, 0.25))
    assert fp8_boundary_distance(torch.tensor([1e4])).item() == 0.5


def test_descriptor_spelling_and_bad_values():
    desc = QuantDescriptor(num_bits=[4, 3], axis=0)
    assert desc.num_bits == FP8 and desc.is_fp8 and not QuantDescriptor().is_fp8
    assert QuantDescriptor.from_dict(desc.to_dict()) == desc
    with pytest.raises(ValueError, match=r"FP8 E4M3 only, num_bits=\(4, 3\); got \(5, 2\)"):
        QuantDescriptor(num_bits=(5, 2))
    with pytest.raises(ValueError, match="signed and full range"):
        QuantDescriptor(num_bits=FP8, unsigned=True)


def plain_fp8_mse(counts: list[int], width: float, start: int) -> float:
    """The candidate edge with the smallest sum of count * squared FP8 error of the bin
    centres, by a loop over candidates and bins (smallest edge on ties)."""
    best, best_err = None, None
    for i in range(start, len(counts) + 1):
        amax = i * width
        scale = amax / 448
        err = 0.0
        for b, c in enumerate(counts):
            if c:
                x = (b + 0.5) * width
                err += c * (x - scale * plain_round(x / scale)) ** 2
        if best_err is None or err < best_err * (1 - 1e-9):
            best, best_err = amax, err
    return best


def test_fp8_mse_search_equals_a_plain_loop(rng):
    counts = torch.histc(torch.randn(5000, generator=rng).abs() ** 2, bins=256, min=0, max=8)
    counts = counts.long()
    counts[240] += 3  # a few outliers far out
    ours = float(fp8_mse_amax(counts, 8 / 256, start_bin=16))
    assert ours == pytest.approx(plain_fp8_mse(counts.tolist(), 8 / 256, 16), rel=1e-6)


def test_quantizer_calibrates_fp8_with_max_and_histogram(rng):
    data = [torch.randn(4096, generator=rng) for _ in range(3)]
    top = max(float(d.abs().max()) for d in data)
    for method, calib in (("max", "max"), ("percentile", "histogram"), ("mse", "histogram")):
        q = TensorQuantizer(QuantDescriptor(num_bits=FP8, calib_method=calib))
        q.disable_quant()
        q.enable_calib()
        for d in data:
            q(d)
        q.load_calib_amax(method if calib == "histogram" else None)
        q.enable_quant()
        q.disable_calib()
        assert 0 < float(q.amax) <= top
        assert torch.equal(q.step_size, q.amax / 448)
        x = torch.randn(100, generator=rng)
        assert torch.equal(q(x), fake_quant(x, q.amax, FP8))
    assert "fp8 e4m3" in repr(q)


def test_entropy_is_refused_for_fp8_with_the_methods_that_apply():
    q = TensorQuantizer(QuantDescriptor(num_bits=FP8, calib_method="histogram"))
    q.name = "conv1._input_quantizer"
    q.disable_quant()
    q.enable_calib()
    q(torch.randn(1000))
    with pytest.raises(CalibrationError, match="conv1._input_quantizer.*mse, percentile, max"):
        q.load_calib_amax("entropy")


def test_histogram_mse_goes_through_the_fp8_search():
    calib = HistogramCalibrator(FP8)
    calib.collect(torch.linspace(-3, 3, 4001))
    from qdq.fp8 import fp8_histogram_amax

    expected = fp8_mse_amax(calib.counts, calib.bin_width)
    assert torch.equal(fp8_histogram_amax(calib, "mse"), torch.minimum(expected, calib.max))


def _residual_net() -> nn.Module:
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(4, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            y = self.b(torch.relu(self.a(x))) + x
            return self.fc(y.mean((2, 3)))

    return Net().eval()


def test_set_format_keeps_ties_rules_state_and_amax():
    from qdq.rules import apply_rules

    torch.manual_seed(0)
    model = _residual_net()
    x = torch.randn(2, 4, 6, 6)
    qdq.replace_modules(model)
    model = apply_rules(model, (x,))
    before = {n: (q.get_state(), q.placed_by, q.axis) for n, q in qdq.quantizers(model)}
    objects = len({id(q) for _, q in qdq.quantizers(model)})
    model.a._weight_quantizer.amax = torch.rand(4, 1, 1, 1) + 0.5
    amax = model.a._weight_quantizer.amax.clone()
    assert qdq.format_of(model) == "int8"
    changed = qdq.set_format(model, "fp8")
    assert changed == objects and qdq.format_of(model) == "fp8"
    after = {n: (q.get_state(), q.placed_by, q.axis) for n, q in qdq.quantizers(model)}
    assert after == before
    assert len({id(q) for _, q in qdq.quantizers(model)}) == objects
    assert all(q.is_fp8 for _, q in qdq.quantizers(model))
    assert torch.equal(model.a._weight_quantizer.amax, amax)
    assert qdq.set_format(model, "int8") == objects and qdq.format_of(model) == "int8"
    with pytest.raises(qdq.formats.FormatError, match="choose one of int8, fp8, w8, w4"):
        qdq.set_format(model, "fp4")
    with pytest.raises(qdq.formats.FormatError, match="no quantizers"):
        qdq.set_format(_residual_net(), "fp8")


def test_fp8_max_value_constant():
    assert FP8_E4M3_MAX == float(torch.finfo(torch.float8_e4m3fn).max)


@needs_cuda
def test_fp8_quantizer_on_cuda_equals_cpu(rng):
    x = torch.randn(64, 300, generator=rng) * 4
    q = TensorQuantizer(QuantDescriptor(num_bits=FP8, amax=3.0))  # backend auto: eager FP8
    assert torch.equal(q.cuda()(x.cuda()).cpu(), q.cpu()(x))
    w = torch.randn(16, 256, generator=rng)
    from qdq.nn.weight_only import QuantizedWeight

    qw = QuantizedWeight.from_weight(w, 4, 128)
    assert torch.equal(qw.cuda()().cpu(), qw.cpu()())


def test_batched_load_calib_amaxes_sends_fp8_quantizers_to_the_e4m3_search():
    from qdq.quantizer import load_calib_amaxes

    torch.manual_seed(0)
    data = [torch.randn(4000) * 2, torch.randn(4000).exp()]

    def quantizers():
        made = [TensorQuantizer(QuantDescriptor(num_bits=bits, calib_method="histogram",
                                                name=f"q{i}"))
                for i, bits in enumerate((FP8, 8))]
        for q, x in zip(made, data, strict=True):
            q.disable_quant()
            q.enable_calib()
            q(x)
        return made

    one_by_one = quantizers()
    for q in one_by_one:
        q.load_calib_amax("mse")
    batched = quantizers()
    load_calib_amaxes(batched, "mse")
    for a, b in zip(one_by_one, batched, strict=True):
        assert torch.equal(a.amax, b.amax)
    # the FP8 quantizer's amax is the E4M3-grid search, not INT8's
    calib = batched[0].calibrator
    assert torch.equal(batched[0].amax, torch.minimum(
        fp8_mse_amax(calib.counts, calib.bin_width), calib.max))
    with pytest.raises(CalibrationError, match="q0.*mse, percentile, max"):
        load_calib_amaxes(quantizers(), "entropy")
