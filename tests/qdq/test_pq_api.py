"""The pytorch-quantization-compatible API surface qdq provides: reduce_amax, the optimizer
helpers, Clip, QuantInstanceNorm, the short layer names, enable_onnx_export, the module
replacement helper, scaled_e4m3, affine fake quant, descriptor extras, quantizer setters
and the plain-torch ``cuda_ext``."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import qdq.nn
import qdq.nn.conv
import qdq.nn.linear
import qdq.nn.pooling
import qdq.nn.rnn
from qdq import quant_modules
from qdq.clipping import ClipFunction
from qdq.clipping import clip as clip_function
from qdq.compat import cuda_ext
from qdq.descriptor import QuantDescriptor
from qdq.nn import (
    Clip,
    QuantConv2d,
    QuantInstanceNorm1d,
    QuantInstanceNorm2d,
    QuantInstanceNorm3d,
    QuantLinear,
)
from qdq.nn.mixin import QuantInputMixin
from qdq.optim import helper
from qdq.quant_modules import QuantModuleReplacementHelper, enable_onnx_export
from qdq.quantizer import DynamicAmaxWarning, TensorQuantizer
from qdq.tensor_quant import fake_affine_tensor_quant, fake_quant, fake_tensor_quant, scaled_e4m3
from qdq.utils import reduce_amax


def _randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def _calibrated(desc: QuantDescriptor | None = None, seed=1) -> TensorQuantizer:
    q = TensorQuantizer(desc)
    data = _randn(4096, seed=seed, scale=2.0)
    if q.unsigned:
        data = data.abs()
    q.disable_quant()
    q.enable_calib()
    q(data)
    q.load_calib_amax()
    q.disable_calib()
    q.enable_quant()
    return q


# --------------------------------------------------------------------------- reduce_amax
@pytest.mark.parametrize("axis, keepdims, shape", [
    (None, True, ()),
    (None, False, ()),
    (1, True, (2, 1, 4)),
    (1, False, (2, 4)),
    (-1, True, (2, 3, 1)),
    ((0, 2), True, (1, 3, 1)),
    ((0, 2), False, (3,)),
    ([0, 2], True, (1, 3, 1)),
    ((1,), True, (2, 1, 4)),
    ((0, 1, 2), True, ()),
    ((0, 1, 2), False, ()),
])
def test_reduce_amax_values_and_shapes(axis, keepdims, shape):
    x = _randn(2, 3, 4)
    x[1, 2, 3] = -50.0  # the largest magnitude is negative: abs must be taken
    out = reduce_amax(x, axis=axis, keepdims=keepdims)
    assert tuple(out.shape) == shape
    if axis is None:
        expected = x.abs().max()
    else:
        dims = (axis,) if isinstance(axis, int) else tuple(axis)
        expected = x.abs().amax(dim=dims, keepdim=True).reshape(shape)
    assert torch.equal(out, expected)
    assert float(out.max()) == 50.0


def test_reduce_amax_has_no_gradient_and_leaves_input_alone():
    x = _randn(3, 5).requires_grad_(True)
    before = x.detach().clone()
    out = reduce_amax(x, axis=0)
    assert not out.requires_grad and out.grad_fn is None
    assert torch.equal(x.detach(), before)
    assert torch.equal(out, before.abs().amax(dim=0, keepdim=True))


def test_reduce_amax_refuses_more_axes_than_dimensions():
    with pytest.raises(ValueError):
        reduce_amax(torch.ones(2, 2), axis=(0, 1, 2))


# ------------------------------------------------------------------------- optim.helper
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Linear(4, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x):
        return self.head(torch.relu(self.features(x)))


def _ids(params):
    return [id(p) for p in params]


def test_match_parameters_searches_names_and_yields_once_per_pattern():
    net = _Net()
    f, h = net.features, net.head
    assert _ids(helper.match_parameters(net, ["weight"])) == _ids([f.weight, h.weight])
    # re.search, not re.match: "eat" is inside "features"
    assert _ids(helper.match_parameters(net, ["eat"])) == _ids([f.weight, f.bias])
    assert _ids(helper.match_parameters(net, ["^head"])) == _ids([h.weight, h.bias])
    assert _ids(helper.match_parameters(net, ["nothing"])) == []
    # a parameter two patterns match comes out twice
    both = _ids(helper.match_parameters(net, ["features", "weight"]))
    assert both == _ids([f.weight, f.weight, f.bias, h.weight])


def test_group_parameters_builds_sgd_groups_with_their_hyperparameters():
    net = _Net()
    groups = helper.group_parameters(net, [["^features"], ["^head"]], lrs=[0.1, 0.0],
                                     momentums=[0.9, 0.0], weight_decays=[1e-2, 0.0])
    assert [g["lr"] for g in groups] == [0.1, 0.0]
    assert [g["momentum"] for g in groups] == [0.9, 0.0]
    assert [g["weight_decay"] for g in groups] == [1e-2, 0.0]
    opt = torch.optim.SGD(groups, lr=1.0)
    assert len(opt.param_groups) == 2
    assert _ids(opt.param_groups[0]["params"]) == _ids([net.features.weight, net.features.bias])
    assert _ids(opt.param_groups[1]["params"]) == _ids([net.head.weight, net.head.bias])
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.0

    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    net(_randn(5, 4)).pow(2).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters()}
    opt.step()
    for name, p in net.named_parameters():
        if name.startswith("head"):
            assert torch.equal(p.detach(), before[name]), name  # lr 0: untouched
        else:
            # first SGD step: p - lr * (grad + weight_decay * p)
            expected = before[name] - 0.1 * (grads[name] + 1e-2 * before[name])
            torch.testing.assert_close(p.detach(), expected)
            assert not torch.equal(p.detach(), before[name])


def test_group_parameters_without_hyperparameters_uses_optimizer_defaults():
    net = _Net()
    groups = helper.group_parameters(net, [["weight"], ["bias"]])
    assert all(set(g) == {"params"} for g in groups)
    opt = torch.optim.SGD(groups, lr=0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]
    assert _ids(opt.param_groups[1]["params"]) == _ids([net.features.bias, net.head.bias])


@pytest.mark.parametrize("patterns_list", [[("features",)], ["features"], [["head"], "bias"]])
def test_group_parameters_refuses_pattern_items_that_are_not_lists(patterns_list):
    with pytest.raises(TypeError):
        helper.group_parameters(_Net(), patterns_list)


@pytest.mark.parametrize("key", ["lrs", "momentums", "weight_decays"])
def test_group_parameters_refuses_hyperparameters_of_another_length(key):
    with pytest.raises(TypeError, match="must match"):
        helper.group_parameters(_Net(), [["features"], ["head"]], **{key: [0.1]})


def test_freeze_parameters_stops_gradients_of_matching_parameters():
    net = _Net()
    helper.freeze_parameters(net, ["bias$"])
    flags = {n: p.requires_grad for n, p in net.named_parameters()}
    assert flags == {"features.weight": True, "features.bias": False,
                     "head.weight": True, "head.bias": False}
    net(_randn(3, 4)).sum().backward()
    assert net.features.bias.grad is None and net.head.bias.grad is None
    assert net.features.weight.grad is not None and net.head.weight.grad is not None


def test_quant_weight_inplace_replaces_weights_by_their_quantized_values():
    conv = QuantConv2d(3, 4, 3)
    lin = QuantLinear(5, 6)
    plain = nn.Linear(5, 6)
    model = nn.ModuleDict({"conv": conv, "lin": lin, "plain": plain})
    conv.weight_quantizer.amax = reduce_amax(conv.weight, axis=(1, 2, 3))
    lin.weight_quantizer.amax = reduce_amax(lin.weight, axis=1)
    originals = {n: m.weight.detach().clone() for n, m in model.items()}
    expected = {n: model[n].weight_quantizer(model[n].weight).detach() for n in ("conv", "lin")}
    params = {n: m.weight for n, m in model.items()}

    helper.quant_weight_inplace(model)

    for name in ("conv", "lin"):
        module = model[name]
        assert module.weight is params[name]  # written in place
        assert torch.equal(module.weight.detach(), expected[name])
        assert not torch.equal(module.weight.detach(), originals[name])
        # quantizing again changes nothing
        assert torch.equal(module.weight_quantizer(module.weight).detach(),
                           module.weight.detach())
        for channel in module.weight.detach():
            assert channel.unique().numel() <= 255
    assert torch.equal(plain.weight.detach(), originals["plain"])


# --------------------------------------------------------------------------------- Clip
def test_clip_module_matches_clamp_and_functional_names_agree():
    x = _randn(50, scale=3.0)
    expected = x.clamp(-1.0, 2.0)
    assert torch.equal(Clip(-1.0, 2.0)(x), expected)
    assert torch.equal(clip_function(x, -1.0, 2.0), expected)
    assert torch.equal(ClipFunction.apply(x, -1.0, 2.0), expected)
    assert qdq.nn.functional.clip is clip_function


def test_clip_broadcasts_tensor_bounds_and_passes_gradient_strictly_inside():
    x = _randn(2, 3, 4, scale=2.0).requires_grad_(True)
    lo = -torch.rand(3, 1, generator=torch.Generator().manual_seed(3)) - 0.1
    hi = torch.rand(1, 4, generator=torch.Generator().manual_seed(4)) + 0.1
    out = Clip(lo, hi)(x)
    assert out.shape == x.shape
    assert torch.equal(out, torch.clamp(x.detach(), lo, hi))
    out.sum().backward()
    inside = ((x.detach() > lo) & (x.detach() < hi)).float()
    assert torch.equal(x.grad, inside)
    assert 0 < inside.sum() < inside.numel()


def test_clip_gradient_is_zero_on_the_bounds_themselves():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], requires_grad=True)
    clip_function(x, -1.0, 1.0).sum().backward()
    assert x.grad.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_learnable_bounds_collect_the_gradient_of_clipped_values():
    x = torch.tensor([-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0], requires_grad=True)
    w = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
    clip = Clip(-1.0, 1.0, learn_min=True, learn_max=True)
    assert isinstance(clip.clip_value_min, nn.Parameter)
    assert isinstance(clip.clip_value_max, nn.Parameter)
    assert {n for n, _ in clip.named_parameters()} == {"clip_value_min", "clip_value_max"}
    out = clip(x)
    assert out.tolist() == [-1.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.0]
    (out * w).sum().backward()
    assert float(clip.clip_value_min.grad) == 1.0 + 2.0  # from -3 and -1
    assert float(clip.clip_value_max.grad) == 6.0 + 7.0  # from 1 and 3
    assert x.grad.tolist() == [0.0, 0.0, 3.0, 4.0, 5.0, 0.0, 0.0]
    # and a step moves the bounds
    torch.optim.SGD(clip.parameters(), lr=0.01).step()
    assert float(clip.clip_value_max.detach()) == pytest.approx(1.0 - 0.13)


def test_only_one_bound_learned():
    clip = Clip(-1.0, 1.0, learn_max=True)
    assert not isinstance(clip.clip_value_min, torch.Tensor)
    assert [n for n, _ in clip.named_parameters()] == ["clip_value_max"]
    x = torch.tensor([-2.0, 0.0, 2.0, 5.0])
    clip(x).sum().backward()
    assert float(clip.clip_value_max.grad) == 2.0


def test_functional_clip_scalar_tensor_bound_gets_gradient():
    x = torch.tensor([-2.0, -0.5, 0.5, 2.0])
    lo = torch.tensor(-1.0, requires_grad=True)
    clip_function(x, lo, 1.0).sum().backward()
    assert lo.grad.shape == () and float(lo.grad) == 1.0


def test_learnable_bounds_must_be_python_scalars():
    with pytest.raises(ValueError):
        Clip(torch.tensor(-1.0), 1.0, learn_min=True)
    with pytest.raises(ValueError):
        Clip(-1.0, torch.ones(3), learn_max=True)
    Clip(torch.tensor(-1.0), 1.0)  # a fixed tensor bound is fine


def test_non_scalar_bound_requiring_grad_is_refused():
    x = _randn(2, 3)
    lo = torch.full((3,), -0.5, requires_grad=True)
    out = clip_function(x, lo, 1.0)
    with pytest.raises(ValueError):
        out.sum().backward()


# ------------------------------------------------------------------ QuantInstanceNorm
@pytest.mark.parametrize("quant_cls, float_cls, shape", [
    (QuantInstanceNorm1d, nn.InstanceNorm1d, (2, 3, 9)),
    (QuantInstanceNorm2d, nn.InstanceNorm2d, (2, 3, 5, 5)),
    (QuantInstanceNorm3d, nn.InstanceNorm3d, (2, 3, 3, 4, 4)),
])
def test_quant_instance_norm_is_instance_norm_of_the_fake_quantized_input(
        quant_cls, float_cls, shape):
    qnorm = quant_cls(3, affine=True)
    with torch.no_grad():
        qnorm.weight.copy_(torch.tensor([0.5, 1.5, -1.0]))
        qnorm.bias.copy_(torch.tensor([0.1, 0.0, -0.2]))
    qnorm.input_quantizer.amax = 1.5
    ref = float_cls(3, affine=True)
    ref.load_state_dict(qnorm.state_dict(), strict=False)
    x = _randn(*shape, scale=1.5)
    out = qnorm(x)
    assert isinstance(qnorm, float_cls)
    assert torch.equal(out, ref(fake_quant(x, 1.5)))
    assert not torch.allclose(out, ref(x), atol=1e-3)  # the quantization did something


def test_instance_norm_is_not_swapped_by_initialize():
    float_norm, float_conv = nn.InstanceNorm2d, nn.Conv2d
    assert not issubclass(float_conv, QuantInputMixin)
    try:
        quant_modules.initialize()
        assert torch.nn.InstanceNorm2d is float_norm
        assert torch.nn.Conv2d is QuantConv2d  # initialize did act
        assert type(torch.nn.InstanceNorm1d(3)) is torch.nn.InstanceNorm1d
        assert not isinstance(torch.nn.InstanceNorm3d(3), QuantInputMixin)
    finally:
        quant_modules.deinitialize()
    assert torch.nn.Conv2d is float_conv


def test_quant_instance_norm_from_float_shares_parameters():
    norm = nn.InstanceNorm2d(3, affine=True)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 0.5, 1.0]))
    twin = QuantInstanceNorm2d.from_float(norm, quant_desc_input=QuantDescriptor(amax=1.0))
    assert type(twin) is QuantInstanceNorm2d and type(norm) is nn.InstanceNorm2d
    assert twin.weight is norm.weight and twin.bias is norm.bias
    assert float(twin.input_quantizer.amax) == 1.0
    x = _randn(2, 3, 4, 4, scale=2.0)
    assert torch.equal(twin(x), norm(fake_quant(x, 1.0)))
    twin.input_quantizer.disable()
    assert torch.equal(twin(x), norm(x))
    with pytest.raises(TypeError):
        QuantInstanceNorm2d.from_float(nn.BatchNorm2d(3))


# ------------------------------------------------------------------------ short names
@pytest.mark.parametrize("short, full", [
    (qdq.nn.Conv1d, qdq.nn.QuantConv1d),
    (qdq.nn.Conv2d, qdq.nn.QuantConv2d),
    (qdq.nn.Conv3d, qdq.nn.QuantConv3d),
    (qdq.nn.ConvTranspose2d, qdq.nn.QuantConvTranspose2d),
    (qdq.nn.Linear, qdq.nn.QuantLinear),
    (qdq.nn.MaxPool2d, qdq.nn.QuantMaxPool2d),
    (qdq.nn.AvgPool1d, qdq.nn.QuantAvgPool1d),
    (qdq.nn.AdaptiveAvgPool2d, qdq.nn.QuantAdaptiveAvgPool2d),
    (qdq.nn.LSTM, qdq.nn.QuantLSTM),
    (qdq.nn.LSTMCell, qdq.nn.QuantLSTMCell),
    (qdq.nn.InstanceNorm2d, qdq.nn.QuantInstanceNorm2d),
    (qdq.nn.conv.Conv2d, qdq.nn.QuantConv2d),
    (qdq.nn.conv.ConvTranspose1d, qdq.nn.QuantConvTranspose1d),
    (qdq.nn.linear.Linear, qdq.nn.QuantLinear),
    (qdq.nn.pooling.MaxPool2d, qdq.nn.QuantMaxPool2d),
    (qdq.nn.pooling.AdaptiveAvgPool3d, qdq.nn.QuantAdaptiveAvgPool3d),
    (qdq.nn.rnn.LSTM, qdq.nn.QuantLSTM),
])
def test_short_names_are_the_quant_classes(short, full):
    assert short is full


def test_short_name_builds_a_quant_layer():
    conv = qdq.nn.Conv2d(3, 4, 3)
    assert isinstance(conv, nn.Conv2d)
    assert isinstance(conv.weight_quantizer, TensorQuantizer)
    assert conv.weight_quantizer.axis == 0


# ------------------------------------------------------------------- enable_onnx_export
def test_enable_onnx_export_sets_and_restores_the_flag():
    assert TensorQuantizer.use_fb_fake_quant is False
    with enable_onnx_export():
        assert TensorQuantizer.use_fb_fake_quant is True
    assert TensorQuantizer.use_fb_fake_quant is False
    with pytest.raises(KeyError), enable_onnx_export():
        assert TensorQuantizer.use_fb_fake_quant is True
        raise KeyError("boom")
    assert TensorQuantizer.use_fb_fake_quant is False


def test_enable_onnx_export_restores_a_previous_true():
    try:
        TensorQuantizer.use_fb_fake_quant = True
        with enable_onnx_export():
            pass
        assert TensorQuantizer.use_fb_fake_quant is True
    finally:
        TensorQuantizer.use_fb_fake_quant = False


@pytest.mark.parametrize("kwargs", [{}, {"narrow_range": True}])
def test_eager_output_is_the_same_inside_enable_onnx_export(kwargs):
    q = _calibrated(QuantDescriptor(**kwargs))
    x = _randn(20000, seed=7, scale=3.0)  # some values saturate
    outside = q(x)
    with enable_onnx_export():
        inside = q(x)
    assert torch.equal(inside, outside)
    assert not torch.equal(outside, x)


# ------------------------------------------------------------- module replacement helper
_SWAPPED = ("Conv2d", "Linear", "MaxPool2d", "LSTM", "ConvTranspose1d")


def _float_classes():
    classes = {name: getattr(torch.nn, name) for name in _SWAPPED}
    assert not any(issubclass(c, QuantInputMixin) for c in classes.values())
    return classes


def test_replacement_helper_swaps_and_restores_torch_nn():
    original = _float_classes()
    h = QuantModuleReplacementHelper()
    h.prepare_state(["Linear"], None)
    try:
        h.apply_quant_modules()
        assert torch.nn.Conv2d is qdq.nn.QuantConv2d
        assert torch.nn.MaxPool2d is qdq.nn.QuantMaxPool2d
        assert torch.nn.LSTM is qdq.nn.QuantLSTM
        assert torch.nn.Linear is original["Linear"]  # kept in float
        assert isinstance(torch.nn.Conv2d(1, 2, 3), QuantConv2d)
    finally:
        h.restore_float_modules()
    assert _float_classes() == original


def test_replacement_helper_custom_map_wins_and_reaches_other_modules():
    original = _float_classes()

    class MyQuantLinear(QuantLinear):
        pass

    scratch = types.ModuleType("scratch")
    scratch.Layer = nn.Linear
    h = QuantModuleReplacementHelper()
    h.prepare_state(["Linear"], [(torch.nn, "Linear", MyQuantLinear),
                                 (scratch, "Layer", QuantLinear)])
    try:
        h.apply_quant_modules()
        assert torch.nn.Linear is MyQuantLinear
        assert scratch.Layer is QuantLinear
        assert torch.nn.Conv2d is QuantConv2d
        assert type(torch.nn.Linear(2, 3)) is MyQuantLinear
    finally:
        h.restore_float_modules()
    assert _float_classes() == original
    assert scratch.Layer is nn.Linear


def test_replacement_helper_applied_twice_still_restores_the_originals():
    original = _float_classes()
    h = QuantModuleReplacementHelper()
    h.prepare_state()
    try:
        h.apply_quant_modules()
        h.apply_quant_modules()
        assert torch.nn.Linear is QuantLinear
    finally:
        h.restore_float_modules()
    assert _float_classes() == original


def test_replacement_helper_refuses_unknown_names():
    h = QuantModuleReplacementHelper()
    with pytest.raises(ValueError):
        h.prepare_state(["Conv9d"])
    with pytest.raises(ValueError):
        h.prepare_state(None, [(torch.nn, "NoSuchLayer", QuantLinear)])
    assert torch.nn.Conv2d is not QuantConv2d


# -------------------------------------------------------------------------- scaled_e4m3
def test_scaled_e4m3_is_fp8_fake_quant():
    x = _randn(1000, scale=3.0)
    amax = torch.tensor(2.5)
    out = scaled_e4m3(x, amax)
    assert torch.equal(out, fake_quant(x, amax, (4, 3)))
    assert torch.equal(scaled_e4m3(x, 2.5), out)
    assert float(out.abs().max()) == 2.5  # saturates at amax
    assert out.unique().numel() <= 253  # 126 magnitudes each side and zero


def test_scaled_e4m3_without_amax_rounds_onto_the_raw_grid():
    x = torch.tensor([1.8, 0.3, -17.0, 500.0, -1000.0, 0.0, 2.0**-9])
    assert scaled_e4m3(x, None).tolist() == [1.75, 0.3125, -16.0, 448.0, -448.0, 0.0, 2.0**-9]


def test_scaled_e4m3_refuses_other_formats():
    with pytest.raises(TypeError):
        scaled_e4m3(torch.ones(3), None, E=5, M=2)
    with pytest.raises(TypeError):
        scaled_e4m3(torch.ones(3), 1.0, 4, 2)


# ------------------------------------------------------------- fake_affine_tensor_quant
def test_affine_fake_quant_stays_within_half_a_step_inside_the_range():
    lo, hi = -0.3, 1.2
    step = (hi - lo) / 255
    x = torch.linspace(lo, hi, 3001)
    out = fake_affine_tensor_quant(x, torch.tensor(lo), torch.tensor(hi), 8)
    assert float((out - x).abs().max()) <= step / 2 + 1e-6
    assert out.unique().numel() <= 256
    # outside the range values saturate at the ends
    far = fake_affine_tensor_quant(torch.tensor([-5.0, 5.0]), lo, hi)
    assert far[0] == pytest.approx(lo, abs=step / 2 + 1e-6)
    assert far[1] == pytest.approx(hi, abs=step / 2 + 1e-6)


def test_affine_fake_quant_bit_width_limits_levels():
    x = torch.linspace(-1.0, 3.0, 2001)
    out = fake_affine_tensor_quant(x, torch.tensor(-1.0), torch.tensor(3.0), num_bits=4)
    assert 10 < out.unique().numel() <= 16
    assert float((out - x).abs().max()) <= 4.0 / 15 / 2 + 1e-6


def test_affine_fake_quant_gradient_is_one_exactly_inside_the_range():
    x = torch.tensor([-1.0, -0.3, -0.2, 0.0, 0.7, 1.2, 1.3], requires_grad=True)
    fake_affine_tensor_quant(x, torch.tensor(-0.3), torch.tensor(1.2)).sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("lo, hi", [(1.0, 1.0), (1.0, 0.5)])
def test_affine_fake_quant_refuses_an_empty_range(lo, hi):
    with pytest.raises(ValueError):
        fake_affine_tensor_quant(torch.ones(4), torch.tensor(lo), torch.tensor(hi))


# ---------------------------------------------------------------------- QuantDescriptor
def test_scale_amax_quantizes_like_the_scaled_amax():
    x = _randn(2000, scale=2.0)
    q = TensorQuantizer(QuantDescriptor(amax=2.0, scale_amax=0.5))
    assert torch.equal(q(x), fake_quant(x, torch.tensor(1.0)))
    assert torch.equal(q(x), TensorQuantizer(QuantDescriptor(amax=1.0))(x))
    assert not torch.equal(q(x), fake_quant(x, torch.tensor(2.0)))
    torch.testing.assert_close(q.step_size, torch.tensor(1.0 / 127))
    torch.testing.assert_close(q.scale, torch.tensor(127.0))


def test_scale_amax_per_channel_and_dynamic():
    x = _randn(3, 40, scale=2.0)
    q = TensorQuantizer(QuantDescriptor(axis=0, amax=[1.0, 2.0, 4.0], scale_amax=0.25))
    assert torch.equal(q(x), fake_quant(x, torch.tensor([[0.25], [0.5], [1.0]])))
    dyn = TensorQuantizer(QuantDescriptor(scale_amax=0.5))
    with pytest.warns(DynamicAmaxWarning):
        out = dyn(x)
    assert torch.equal(out, fake_quant(x, x.abs().max() * 0.5))


_DESCRIPTORS = [
    QuantDescriptor(),
    QuantDescriptor(num_bits=4, name="conv1.weight", axis=0),
    QuantDescriptor(axis=(0, 2), unsigned=True),
    QuantDescriptor(axis=0, amax=[0.5, 1.25, 3.1]),
    QuantDescriptor(num_bits=(4, 3), amax=6.0),
    QuantDescriptor(amax=1.7, scale_amax=0.9, narrow_range=True),
    QuantDescriptor(calib_method="histogram", num_bins=1024, skip_zeros=True, fake_quant=False),
    QuantDescriptor(learn_amax=True, amax=2.5),
]


@pytest.mark.parametrize("desc", _DESCRIPTORS, ids=range(len(_DESCRIPTORS)))
def test_descriptor_yaml_round_trip(desc):
    text = desc.to_yaml()
    assert isinstance(yaml.safe_load(text), dict)
    back = QuantDescriptor.from_yaml(text)
    assert back == desc
    assert QuantDescriptor(**desc.dict()) == desc


def test_descriptor_yaml_keeps_fp8_bits_a_pair():
    back = QuantDescriptor.from_yaml(QuantDescriptor(num_bits=(4, 3)).to_yaml())
    assert back.num_bits == (4, 3) and back.is_fp8


def test_descriptor_dict_has_only_num_bits_name_and_changed_fields():
    assert QuantDescriptor().dict() == {"num_bits": 8, "name": None}
    d = QuantDescriptor(axis=0, unsigned=True, name="x").dict()
    assert d == {"num_bits": 8, "name": "x", "axis": 0, "unsigned": True}
    d = QuantDescriptor(num_bits=4, amax=[1.0, 2.0], scale_amax=0.5).dict()
    assert d == {"num_bits": 4, "name": None, "amax": [1.0, 2.0], "scale_amax": 0.5}
    assert yaml.safe_load(QuantDescriptor().to_yaml()) == {"num_bits": 8, "name": None}


def test_descriptor_refuses_a_string_amax():
    with pytest.raises(TypeError, match="amax must be float, list or ndarray"):
        QuantDescriptor(amax="oops")


def test_descriptor_refuses_learn_amax_with_axis():
    with pytest.raises(TypeError):
        QuantDescriptor(learn_amax=True, axis=0)
    assert QuantDescriptor(learn_amax=True).learn_amax  # per tensor is fine


def test_descriptor_takes_numpy_amax_as_fp32_rounded_floats():
    arr = np.array([0.1, 0.2, 0.3])
    d = QuantDescriptor(axis=0, amax=arr)
    expected = tuple(float(v) for v in arr.astype(np.float32))
    assert d.amax == expected
    assert all(type(v) is float for v in d.amax)
    assert d.amax != tuple(arr.tolist())  # 0.1 is not an fp32 value: it was rounded
    assert torch.equal(TensorQuantizer(d).amax, torch.tensor([0.1, 0.2, 0.3]))
    scalar = QuantDescriptor(amax=np.float64(0.1))
    assert scalar.amax == float(np.float32(0.1))
    assert QuantDescriptor.from_yaml(d.to_yaml()) == d


# --------------------------------------------------------------- TensorQuantizer setters
def test_num_bits_setter_changes_quantization_and_descriptor():
    x = torch.linspace(-1.5, 1.5, 2001)
    q = TensorQuantizer(QuantDescriptor(amax=1.0))
    assert q(x).unique().numel() > 200
    q.num_bits = 4
    out = q(x)
    assert q.num_bits == 4 and q.descriptor.num_bits == 4
    assert out.unique().numel() <= 16
    assert torch.equal(out, fake_quant(x, 1.0, 4))
    torch.testing.assert_close(q.scale, torch.tensor(7.0))
    with pytest.raises(ValueError):
        q.num_bits = 40
    assert q.num_bits == 4 and q.descriptor.num_bits == 4


def test_unsigned_setter_changes_quantization_and_descriptor():
    x = torch.linspace(0.0, 1.2, 1001)
    q = TensorQuantizer(QuantDescriptor(amax=1.0))
    q.unsigned = True
    assert q.unsigned and q.descriptor.unsigned
    assert torch.equal(q(x), fake_quant(x, 1.0, 8, unsigned=True))
    assert not torch.equal(q(x), fake_quant(x, 1.0))
    torch.testing.assert_close(q.step_size, torch.tensor(1.0 / 255))
    with pytest.raises(TypeError):
        q(torch.tensor([-0.5, 0.5]))
    with pytest.raises(ValueError):
        q.narrow_range = True  # not with unsigned
    assert not q.narrow_range and not q.descriptor.narrow_range


def test_narrow_range_setter_changes_the_lowest_level():
    x = torch.tensor([-2.0, -1.0, 0.3, 2.0])
    q = TensorQuantizer(QuantDescriptor(amax=1.0))
    assert float(q(x)[0]) < -1.005  # -128 steps
    q.narrow_range = True
    out = q(x)
    assert q.narrow_range and q.descriptor.narrow_range
    assert float(out[0]) == pytest.approx(-1.0, abs=1e-6)  # -127 steps
    assert torch.equal(out, fake_quant(x, 1.0, narrow_range=True))


def test_pre_quant_scale_multiplies_the_input_before_quantization():
    x = _randn(6, 3, scale=2.0)
    q = TensorQuantizer(QuantDescriptor(amax=4.0))
    assert q.pre_quant_scale is None
    assert "_pre_quant_scale" not in q.state_dict()
    q.pre_quant_scale = 2.0
    assert torch.equal(q(x), fake_quant(x * 2.0, 4.0))
    q.pre_quant_scale = None
    assert q.pre_quant_scale is None and torch.equal(q(x), fake_quant(x, 4.0))

    scale = torch.tensor([0.5, 1.0, 3.0])
    q.pre_quant_scale = scale
    assert torch.equal(q(x), fake_quant(x * scale, 4.0))
    state = q.state_dict()
    assert torch.equal(state["_pre_quant_scale"], scale)

    fresh = TensorQuantizer()
    fresh.load_state_dict(state)
    assert torch.equal(fresh.pre_quant_scale, scale)
    assert torch.equal(fresh(x), q(x))

    with pytest.raises(RuntimeError):
        q.pre_quant_scale = torch.ones(4)
    assert torch.equal(q.pre_quant_scale, scale)
    other = TensorQuantizer(QuantDescriptor(amax=4.0))
    other.pre_quant_scale = torch.ones(5)
    with pytest.raises(RuntimeError):
        other.load_state_dict(state)


@pytest.mark.parametrize("kwargs, qmax", [({}, 127), ({"unsigned": True}, 255),
                                          ({"num_bits": 4}, 7), ({"num_bits": (4, 3)}, 448)])
def test_scale_is_qmax_over_amax_and_step_size_its_inverse(kwargs, qmax):
    q = TensorQuantizer(QuantDescriptor(amax=2.0, **kwargs))
    torch.testing.assert_close(q.scale, torch.tensor(qmax / 2.0))
    torch.testing.assert_close(q.step_size, torch.tensor(2.0 / qmax))


def test_is_dynamic_follows_amax():
    q = TensorQuantizer()
    assert q.is_dynamic and q.scale is None and q.step_size is None
    q.amax = 1.0
    assert not q.is_dynamic
    q.reset_amax()
    assert q.is_dynamic
    assert not _calibrated().is_dynamic


# ---------------------------------------------------------------------------- cuda_ext
@pytest.mark.parametrize("num_bits, unsigned", [(8, False), (4, False), (8, True)])
def test_cuda_ext_per_tensor_matches_tensor_quant(num_bits, unsigned):
    x = _randn(5, 7, scale=2.0)
    if unsigned:
        x = x.abs()
    amax = torch.tensor(1.5)
    expected = fake_tensor_quant(x, amax, num_bits, unsigned)
    assert torch.equal(cuda_ext.fake_tensor_quant(x, amax, num_bits, unsigned), expected)
    assert not torch.equal(expected, x)
    inplace = x.clone()
    assert cuda_ext.fake_tensor_quant_(inplace, amax, num_bits, unsigned) is None
    assert torch.equal(inplace, expected)


def test_cuda_ext_defaults_are_narrow_range():
    x = torch.tensor([-3.0, -1.0, 0.5, 3.0])
    amax = torch.tensor(1.0)
    out = cuda_ext.fake_tensor_quant(x, amax)
    assert torch.equal(out, fake_tensor_quant(x, amax))
    assert torch.equal(out, fake_quant(x, amax, narrow_range=True))
    assert not torch.equal(out, fake_quant(x, amax))  # full range would give -128 steps


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_cuda_ext_with_axis_matches_tensor_quant(axis):
    x = _randn(3, 4, 5, scale=2.0)
    n = x.shape[axis]
    amax = torch.linspace(0.5, 2.0, n)
    shape = [1, 1, 1]
    shape[axis] = n
    expected = fake_tensor_quant(x, amax.reshape(shape))
    assert torch.equal(cuda_ext.fake_tensor_quant_with_axis(x, amax, axis), expected)
    per_tensor = fake_tensor_quant(x, amax.max())
    assert not torch.equal(expected, per_tensor)


def test_cuda_ext_fake_e4m3fy_rounds_onto_the_unscaled_grid():
    x = _randn(500, scale=100.0)
    out = cuda_ext.fake_e4m3fy(x)
    assert torch.equal(out, scaled_e4m3(x, None))
    assert torch.equal(out, fake_tensor_quant(x, torch.tensor(448.0), (4, 3)))
    assert torch.equal(out, x.clamp(-448, 448).to(torch.float8_e4m3fn).float())
