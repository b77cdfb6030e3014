"""pytorch-quantization's behaviour that its users' scripts rely on, as qdq gives it.

Dynamic amax before calibration, state_dicts that carry amax only once known, the
defaults and scale convention of the bare functions, gradients, error types.
"""

import warnings

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import qdq
from qdq import QuantDescriptor, TensorQuantizer, quant_modules
from qdq import nn as quant_nn
from qdq.quantizer import DynamicAmaxWarning
from qdq.tensor_quant import AMAX_EPS, fake_quant, fake_tensor_quant, tensor_quant
from qdq.utils import reduce_amax


def _quiet(fn, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DynamicAmaxWarning)
        return fn(*args)


# ------------------------------------------------------------------ dynamic amax

@pytest.mark.parametrize("axis", [None, 0, 1, (0, 2)])
def test_dynamic_amax_is_max_abs_over_the_other_dims(axis):
    x = torch.randn(4, 5, 6) * torch.arange(1, 7.0)
    q = TensorQuantizer(QuantDescriptor(axis=axis))
    keep = () if axis is None else (axis if isinstance(axis, tuple) else (axis,))
    reduce = None if axis is None else tuple(d for d in range(3) if d not in keep)
    amax = reduce_amax(x, axis=reduce)
    assert torch.equal(_quiet(q, x), fake_quant(x, amax))
    assert q.amax is None  # nothing stored: the next input gets its own amax
    y = x * 3
    assert torch.equal(_quiet(q, y), fake_quant(y, amax * 3))


def test_dynamic_quantizer_refuses_onnx_export_by_name(tmp_path):
    layer = quant_nn.QuantLinear(4, 3)
    layer._input_quantizer.name = "fc._input_quantizer"
    with pytest.raises(RuntimeError, match="fc._input_quantizer: has no calibrated amax"), \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(layer, (torch.randn(2, 4),), str(tmp_path / "x.onnx"),
                          opset_version=13, dynamo=False)


# --------------------------------------------------------------------- state_dict

def test_uncalibrated_quant_model_has_the_float_state_dict_keys():
    float_model = torchvision.models.resnet18()
    with quant_modules.initialize():
        quant_model = torchvision.models.resnet18()
    assert list(quant_model.state_dict()) == list(float_model.state_dict())


def test_tutorial_flow_float_checkpoint_loads_strictly_then_calibrates(tmp_path):
    """initialize(), build the model, load a float checkpoint (pretrained weights in the
    tutorial), calibrate, save, and load the calibrated state into a fresh quant model."""
    torch.manual_seed(0)
    float_model = torchvision.models.resnet18().eval()
    torch.save(float_model.state_dict(), tmp_path / "float.pt")
    with quant_modules.initialize():
        model = torchvision.models.resnet18()
    model.load_state_dict(torch.load(tmp_path / "float.pt", weights_only=True))  # strict
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    for _, q in qdq.quantizers(model):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(x)
    for _, q in qdq.quantizers(model):
        q.load_calib_amax()
        q.disable_calib()
        q.enable_quant()
    state = model.state_dict()
    # inputs and weights of 20 convs and the fc, inputs of the two pools
    assert sum(k.endswith("._amax") for k in state) == 2 * 21 + 2
    with quant_modules.initialize():
        fresh = torchvision.models.resnet18().eval()
    fresh.load_state_dict(state)  # strict: the _amax buffers are registered on load
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        ref = float_model(x)
        assert 0 < float((model(x) - ref).norm() / ref.norm()) < 0.2


def test_calibrated_state_dict_into_uncalibrated_quantizer_keeps_device_and_shape():
    src = TensorQuantizer(QuantDescriptor(axis=0, amax=[1.0, 2.0, 3.0]))
    dst = TensorQuantizer(QuantDescriptor(axis=0))
    assert "_amax" not in dst.state_dict()
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.amax, src.amax) and not dst.is_dynamic


# ------------------------------------------------------- numerics of bare functions

def test_bare_functions_default_to_narrow_range_and_pq_scale():
    x = torch.tensor([-2.0, -1.0, 0.3, 1.0])
    amax = torch.tensor(1.0)
    q, scale = tensor_quant(x, amax)
    assert q.min() == -127 and float(scale) == 127.0          # 127 / amax
    assert torch.allclose(q / scale, fake_tensor_quant(x, amax))
    assert float(fake_tensor_quant(x, amax).min()) == -1.0   # narrow: -127 steps
    assert float(fake_quant(x, amax).min()) == pytest.approx(-128 / 127)  # full range


def test_amax_at_or_below_2_pow_minus_24_gives_exact_zeros():
    x = torch.randn(3, 8)
    amax = torch.tensor([[1.0], [AMAX_EPS], [0.0]])
    out = fake_quant(x, amax)
    assert torch.all(out[1:] == 0) and torch.equal(out[0], fake_quant(x[0], torch.tensor(1.0)))
    q, scale = tensor_quant(x, amax)
    assert torch.all(q[1:] == 0) and torch.all(scale[1:] == 1)


def test_arithmetic_differs_from_pq_formula_only_in_the_last_bit():
    """qdq dequantizes as q * (amax/127) (ONNX's DequantizeLinear); pytorch-quantization as
    q / (127/amax). Same integers; outputs at most one ulp apart."""
    torch.manual_seed(0)
    x = torch.randn(100_000)
    amax = x.abs().max() * 0.8
    ours = fake_tensor_quant(x, amax)
    scale = 127 / amax
    q = torch.clamp(torch.round(x * scale), -127, 127)
    theirs = q / scale
    assert torch.equal(tensor_quant(x, amax)[0], q) or (tensor_quant(x, amax)[0] != q).sum() < 10
    ulp = torch.abs(theirs - ours) / torch.finfo(torch.float32).eps / theirs.abs().clamp_min(1e-30)
    assert float(ulp.max()) <= 1.0
    assert 0.05 < float((ours != theirs).float().mean()) < 0.5


# --------------------------------------------------------------------- gradients

def test_tensor_quant_has_a_clipped_straight_through_gradient():
    x = torch.tensor([-3.0, -0.5, 0.2, 0.9, 2.0], requires_grad=True)
    q, _ = tensor_quant(x, torch.tensor(1.0))
    q.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_public_fake_tensor_quant_treats_amax_as_a_constant():
    x = torch.randn(50, requires_grad=True)
    amax = torch.tensor(1.0, requires_grad=True)
    out = fake_tensor_quant(x, amax)
    out.sum().backward()
    assert amax.grad is None and x.grad is not None
    # the learned-amax path keeps its gradient
    amax2 = torch.tensor(1.0, requires_grad=True)
    fake_quant(x.detach(), amax2).pow(2).sum().backward()
    assert amax2.grad is not None and float(amax2.grad) != 0


# ------------------------------------------------------------------ errors & types

def test_quant_layers_refuse_integer_quantization():
    real = QuantDescriptor(fake_quant=False)
    for build in (lambda: quant_nn.QuantConv2d(3, 4, 3, quant_desc_weight=real),
                  lambda: quant_nn.QuantLinear(3, 4, quant_desc_input=real),
                  lambda: quant_nn.QuantMaxPool2d(2, quant_desc_input=real)):
        with pytest.raises(ValueError, match="Only fake quantization is supported"):
            build()
    # a bare quantizer may still return integers, with pytorch-quantization's scale
    q = TensorQuantizer(QuantDescriptor(fake_quant=False, amax=2.0))
    assert q(torch.tensor([1.0, 3.0])).tolist() == [64.0, 127.0]
    assert float(q.scale) == 127 / 2 and float(q.step_size) == pytest.approx(2 / 127)


def test_unknown_layer_keywords_are_named():
    with pytest.raises(TypeError, match=r"Unused keys: \['descriptor'\]"):
        quant_nn.QuantConv2d(3, 4, 3, descriptor=QuantDescriptor())


def test_unsigned_quantizer_refuses_negative_cpu_input_as_type_error():
    q = TensorQuantizer(QuantDescriptor(unsigned=True, amax=1.0))
    with pytest.raises(TypeError, match="Negative values"):
        q(torch.tensor([0.5, -0.1]))
    assert torch.equal(q(torch.tensor([0.5])), fake_quant(torch.tensor([0.5]), 1.0, 8, True))


def test_errors_are_the_builtin_types_pytorch_quantization_raised():
    q = TensorQuantizer()
    q.enable_calib()
    with pytest.raises(RuntimeError, match="Calibrator returned None"):
        q.load_calib_amax()
    with pytest.raises(ValueError):  # still our QuantizerError
        q.load_calib_amax()
    with pytest.raises(TypeError):
        QuantDescriptor(num_bits=(5, 2))
    with pytest.raises(TypeError, match="axis is ignored"):
        QuantDescriptor(axis=0, amax=1.0, learn_amax=True)


def test_clip_stage_of_a_learned_amax():
    desc = QuantDescriptor(amax=0.5, learn_amax=True)
    q = TensorQuantizer(desc, if_quant=False, if_clip=True)
    x = torch.linspace(-0.6, 1, 17)
    assert torch.equal(q(x), x.clamp(-0.5, 0.5))
    q(x).sum().backward()
    # PACT: amax collects the gradient of what it clipped above, minus below
    assert float(q.amax.grad) == float((x >= 0.5).sum() - (x <= -0.5).sum())
    assert float(q.clip.clip_value_min) == -0.5


def test_pytorch_quantization_learned_amax_checkpoint_loads():
    """Its learned-amax checkpoints store the clip bounds instead of _amax."""
    q = TensorQuantizer(QuantDescriptor(learn_amax=True))
    q.load_state_dict({"clip.clip_value_min": torch.tensor(-1.5),
                       "clip.clip_value_max": torch.tensor(1.25)})
    assert q.learn_amax and float(q.amax) == 1.5


def test_initialize_twice_is_harmless():
    original = nn.Conv2d
    try:
        quant_modules.initialize()
        quant_modules.initialize()
        assert nn.Conv2d is quant_nn.QuantConv2d
    finally:
        quant_modules.deactivate()
    assert nn.Conv2d is original


def test_descriptor_amax_is_stored_in_fp32():
    d = QuantDescriptor(amax=np.array([3.142, 2.718]))
    assert d.amax == tuple(np.float32([3.142, 2.718]).tolist())
    q = TensorQuantizer(d)
    assert q.amax.tolist() == list(d.amax)


def test_pre_quant_scale_exports_as_one_mul_and_matches_onnx_runtime(tmp_path):
    import onnx
    import onnxruntime as ort

    from export import to_onnx

    torch.manual_seed(0)
    layer = quant_nn.QuantLinear(6, 4).eval()
    layer._input_quantizer.pre_quant_scale = torch.linspace(0.5, 2.0, 6)
    layer._input_quantizer.amax = 3.0
    layer._weight_quantizer.amax = layer.weight.detach().abs().amax(1, keepdim=True)
    path = tmp_path / "pqs.onnx"
    to_onnx(layer, torch.randn(2, 6), path)
    ops = [n.op_type for n in onnx.load(path).graph.node]
    assert ops.count("Mul") == 1 and ops.index("Mul") < ops.index("QuantizeLinear")
    x = torch.randn(5, 6)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        assert np.allclose(got, layer(x).numpy(), atol=1e-6)
