"""Fake quantization math: ONNX Runtime bit-exactness, torch's ops, gradients, properties."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from qdq.tensor_quant import (
    AMAX_EPS,
    fake_quant,
    quant_bounds,
    scale_from_amax,
    tensor_quant,
)
from tests.conftest import needs_cuda


def _ort_qdq(x: np.ndarray, scale: np.ndarray, axis: int | None = None) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear at opset 13 in a real ONNX Runtime session."""
    zp = np.zeros(scale.shape, dtype=np.int8)
    attrs = {} if axis is None else {"axis": axis}
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"], **attrs),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], **attrs)]
    graph = helper.make_graph(
        nodes, "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(x.shape))],
        [numpy_helper.from_array(scale.astype(np.float32), "s"),
         numpy_helper.from_array(zp, "z")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x})[0]


def _boundary_values(scale: float, n: int, gen: torch.Generator) -> torch.Tensor:
    """Values exactly on, and one ulp either side of, the rounding midpoints k + 0.5."""
    k = torch.randint(-140, 140, (n,), generator=gen).float()
    mid = ((k + 0.5) * scale).float()
    return torch.cat([mid, torch.nextafter(mid, mid + 1), torch.nextafter(mid, mid - 1)])


@pytest.mark.parametrize("amax", [0.37, 1.0, 6.5, 123.0])
def test_per_tensor_matches_onnx_runtime_bit_for_bit(amax, rng):
    scale = amax / 127
    x = torch.cat([torch.randn(20000, generator=rng) * amax, _boundary_values(scale, 5000, rng)])
    ours = fake_quant(x, torch.tensor(amax))
    ref = _ort_qdq(x.numpy(), scale_from_amax(torch.tensor(amax)).numpy())
    assert np.array_equal(ours.numpy(), ref)


def test_per_channel_matches_onnx_runtime_bit_for_bit(rng):
    w = torch.randn(16, 8, 3, 3, generator=rng) * torch.rand(16, 1, 1, 1, generator=rng) * 3
    amax = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    amax[3] = 0.0  # a dead channel still quantizes (to exact zeros)
    w[3] = 0.0
    ours = fake_quant(w, amax)
    scale = scale_from_amax(amax).reshape(-1).numpy()
    assert np.all(scale > 0) and np.all(np.isfinite(scale))
    ref = _ort_qdq(w.numpy(), scale, axis=0)
    assert np.array_equal(ours.numpy(), ref)
    assert torch.all(ours[3] == 0)


def test_matches_torch_fake_quant_except_reciprocal_rounding(rng):
    """torch multiplies by 1/scale, ONNX divides by scale; they differ only where those two
    products round to different integers. Everywhere else the results are identical."""
    amax = torch.tensor(2.3)
    scale = scale_from_amax(amax)
    x = torch.cat([torch.randn(50000, generator=rng) * 3,
                   _boundary_values(float(scale), 3000, rng)])
    ours = fake_quant(x, amax)
    theirs = torch.fake_quantize_per_tensor_affine(x, scale, torch.tensor(0, dtype=torch.int32),
                                                   -128, 127)
    xs = x.numpy()
    s = scale.numpy()
    by_div = np.clip(np.rint(xs / s), -128, 127)
    by_mul = np.clip(np.rint(xs * (np.float32(1) / s)), -128, 127)
    differ = torch.from_numpy(by_div != by_mul)
    assert torch.equal(ours[~differ], theirs[~differ])
    assert differ.sum() < len(x) * 0.2  # only some boundary values, never ordinary data


def test_per_channel_matches_torch_per_channel_op(rng):
    w = torch.randn(8, 4, 3, 3, generator=rng)
    amax = w.abs().amax(dim=(1, 2, 3), keepdim=True)
    scale = scale_from_amax(amax).reshape(-1)
    theirs = torch.fake_quantize_per_channel_affine(
        w, scale, torch.zeros(8, dtype=torch.int32), 0, -128, 127)
    ours = fake_quant(w, amax)
    assert (ours != theirs).float().mean() < 1e-4


def test_round_half_to_even_and_saturation():
    amax = torch.tensor(127.0)  # scale 1
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5, 127.4, 200.0, -127.5, -128.4, -300.0])
    q, scale = tensor_quant(x, amax, narrow_range=False)
    assert float(scale) == 1.0
    assert q.tolist() == [0, 2, 2, -0, -2, -2, 126, 127, 127, -128, -128, -128]
    qn, _ = tensor_quant(x, amax)  # pytorch-quantization's default: narrow range
    assert qn.min() == -127
    qu, su = tensor_quant(x.abs(), amax, unsigned=True)
    # pytorch-quantization's scale: qmax / amax (multiply to quantize)
    assert float(su) == pytest.approx(255 / 127) and qu.max() == 255 and qu.min() >= 0


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_bounds_and_scale_for_widths(bits):
    qmin, qmax, div = quant_bounds(bits)
    assert (qmin, qmax, div) == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1, 2 ** (bits - 1) - 1)
    x = torch.linspace(-3, 3, 1001)
    q, _ = tensor_quant(x, torch.tensor(2.0), num_bits=bits)
    assert q.min() >= qmin and q.max() <= qmax


@pytest.mark.parametrize("bits", [1, 17, 0])
def test_num_bits_out_of_range(bits):
    with pytest.raises(ValueError, match="num_bits"):
        fake_quant(torch.ones(3), torch.tensor(1.0), num_bits=bits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_compute_in_fp32(dtype, rng):
    x = torch.randn(4096, generator=rng)
    amax = torch.tensor(2.5)
    out = fake_quant(x.to(dtype), amax)
    assert out.dtype == dtype
    ref = fake_quant(x.to(dtype).float(), amax).to(dtype)
    assert torch.equal(out, ref)


def test_zero_amax_gives_positive_scale_and_zeros():
    scale = scale_from_amax(torch.tensor([0.0, 1.0]))
    assert torch.all(scale > 0) and torch.all(torch.isfinite(scale))
    assert float(scale[0]) == pytest.approx(AMAX_EPS / 127)
    assert torch.equal(fake_quant(torch.zeros(5), torch.tensor(0.0)), torch.zeros(5))


def test_straight_through_gradient_mask():
    x = torch.tensor([-3.0, -1.0, -0.2, 0.0, 0.7, 1.0, 1.01, 5.0], requires_grad=True)
    fake_quant(x, torch.tensor(1.0)).sum().backward()
    assert x.grad.tolist() == [0, 1, 1, 1, 1, 1, 0, 0]


def test_amax_gradient_matches_its_definition():
    x = torch.tensor([0.3, -0.45, 2.0, -3.0])
    amax = torch.tensor(1.0, requires_grad=True)
    out = fake_quant(x, amax)
    out.sum().backward()
    s = 1.0 / 127
    q = torch.clamp(torch.round(x / s), -128, 127)
    inside = x.abs() <= 1.0
    expected = torch.where(inside, q - x / s, q) / 127
    assert amax.grad is not None
    assert float(amax.grad) == pytest.approx(float(expected.sum()), rel=1e-5)


def test_per_channel_amax_gradient_has_amax_shape():
    w = torch.randn(4, 3, 2, 2)
    amax = w.abs().amax(dim=(1, 2, 3), keepdim=True).mul(0.5).requires_grad_()
    fake_quant(w, amax).pow(2).sum().backward()
    assert amax.grad.shape == amax.shape and torch.isfinite(amax.grad).all()


def test_no_gradient_work_without_learnable_amax():
    x = torch.randn(10, requires_grad=True)
    amax = torch.tensor(1.0)
    fake_quant(x, amax).sum().backward()
    assert amax.grad is None and x.grad is not None


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=64),
    amax=st.floats(float(np.float32(1e-3)), 1e3, width=32),
    bits=st.integers(2, 12),
    narrow=st.booleans(),
)
def test_quantizer_invariants(values, amax, bits, narrow):
    x = torch.tensor(values, dtype=torch.float32)
    a = torch.tensor(amax, dtype=torch.float32)
    out = fake_quant(x, a, num_bits=bits, narrow_range=narrow)
    qmin, qmax, _ = quant_bounds(bits, narrow_range=narrow)
    scale = scale_from_amax(a, bits, narrow_range=narrow)
    steps = out / scale
    # on the integer grid, within the integer range
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert steps.min() >= qmin - 1e-3 and steps.max() <= qmax + 1e-3
    # bounded by the representable range
    assert out.abs().max() <= scale * max(-qmin, qmax) * (1 + 1e-6)
    # idempotent
    assert torch.equal(fake_quant(out, a, num_bits=bits, narrow_range=narrow), out)
    # within half a step of the input where the input is in range
    inside = x.abs() <= a
    assert torch.all((out - x)[inside].abs() <= scale * 0.5 * (1 + 1e-5) + 1e-6)
    # gradient mask: 1 exactly inside [-amax, amax]
    xg = x.clone().requires_grad_()
    fake_quant(xg, a, num_bits=bits, narrow_range=narrow).sum().backward()
    assert torch.equal(xg.grad, inside.float())


@needs_cuda
def test_cuda_matches_cpu_and_does_not_sync():
    x = torch.randn(1 << 16)
    amax = torch.tensor(2.0)
    cpu = fake_quant(x, amax)
    xc, ac = x.cuda(), amax.cuda()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gpu = fake_quant(xc, ac)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(gpu.cpu(), cpu)
