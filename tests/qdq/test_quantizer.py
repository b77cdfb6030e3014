"""TensorQuantizer: states, calibration, amax storage, errors, export path."""

import warnings

import pytest
import torch
from torch import nn

from qdq import QuantDescriptor, TensorQuantizer
from qdq.calib import CalibrationError, MaxCalibrator
from qdq.quantizer import DynamicAmaxWarning, QuantizerError
from qdq.tensor_quant import fake_quant
from tests.conftest import needs_cuda


def calibrated(desc=None, data=None):
    q = TensorQuantizer(desc or QuantDescriptor())
    q.disable_quant()
    q.enable_calib()
    q(data if data is not None else torch.linspace(-2, 3, 101))
    q.load_calib_amax()
    q.enable_quant()
    q.disable_calib()
    return q


def test_state_machine_combinations():
    q = TensorQuantizer()
    assert q.state() == "quant"
    q.enable_calib()
    assert q.state() == "calib+quant" and q.is_calib_enabled and q.is_quant_enabled
    q.disable_quant()
    assert q.state() == "calib"
    q.disable()
    assert q.state() == "off" and not q.is_enabled
    x = torch.randn(5)
    assert q(x) is x  # off: identity, no calibration
    assert q.calibrator.compute_amax() is None
    q.enable()
    q.disable_calib()
    assert q.state() == "idle"


def test_calibrate_then_quantize():
    q = calibrated()
    assert float(q.amax) == 3.0
    out = q(torch.tensor([3.0, 10.0, -10.0, 0.01]))
    assert out.tolist()[:3] == pytest.approx([3.0, 3.0, -3.0 * 128 / 127])
    assert float(q.step_size) == pytest.approx(3 / 127)


def test_calibrating_while_quantizing_feeds_calibrator():
    q = calibrated()
    q.enable_calib()
    q(torch.tensor([7.0]))
    q.load_calib_amax()
    assert float(q.amax) == 7.0


def test_per_channel_weight_amax_shape():
    q = calibrated(QuantDescriptor(axis=0), torch.randn(6, 3, 2, 2))
    assert q.amax.shape == (6, 1, 1, 1)


def test_quantizing_without_amax_is_dynamic_and_warns_once_by_name():
    q = TensorQuantizer()
    q.name = "layer1.conv._input_quantizer"
    x = torch.randn(3)
    with pytest.warns(DynamicAmaxWarning, match="layer1.conv._input_quantizer"):
        out = q(x)
    assert torch.equal(out, fake_quant(x, x.abs().max()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        q(torch.randn(3))  # once per quantizer
    assert q.amax is None and q.is_dynamic


def test_load_calib_amax_without_data_is_clear():
    q = TensorQuantizer()
    q.name = "head._input_quantizer"
    with pytest.raises(QuantizerError, match="head._input_quantizer.*no data"):
        q.load_calib_amax()
    q.load_calib_amax(strict=False)  # keeps amax None, no error
    assert q.amax is None


def test_all_zero_data_warns_and_keeps_a_usable_amax():
    q = TensorQuantizer()
    q.name = "dead._input_quantizer"
    q.disable_quant()
    q.enable_calib()
    q(torch.zeros(4))
    with pytest.warns(UserWarning, match="dead._input_quantizer: every calibration value was 0"):
        q.load_calib_amax()
    assert float(q.amax) == 0.0
    q.enable_quant()
    assert torch.equal(q(torch.zeros(3)), torch.zeros(3))
    assert float(q.step_size) > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_calibration_data_names_quantizer_and_value(bad):
    q = TensorQuantizer()
    q.name = "stem._input_quantizer"
    q.disable_quant()
    q.enable_calib()
    with pytest.raises(CalibrationError, match=r"stem\._input_quantizer.*(nan|inf)"):
        q(torch.tensor([1.0, bad]))


@pytest.mark.parametrize("value", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_amax_is_refused(value):
    q = TensorQuantizer()
    q.name = "fc._weight_quantizer"
    with pytest.raises(QuantizerError, match="fc._weight_quantizer"):
        q.amax = value


def test_axis_outside_tensor_is_named():
    q = TensorQuantizer(QuantDescriptor(axis=4))
    q.name = "conv._weight_quantizer"
    q.disable_quant()
    q.enable_calib()
    with pytest.raises(CalibrationError, match="conv._weight_quantizer.*axis 4"):
        q(torch.randn(2, 3))


def test_max_method_only_for_max_calibrator():
    q = TensorQuantizer()
    q.disable_quant()
    q.enable_calib()
    q(torch.randn(10))
    with pytest.raises(QuantizerError, match="entropy"):
        q.load_calib_amax("entropy")
    assert isinstance(q._calibrator, MaxCalibrator)


def test_state_dict_round_trip_into_uncalibrated_quantizer():
    src = calibrated(QuantDescriptor(axis=0), torch.randn(4, 3))
    dst = TensorQuantizer(QuantDescriptor(axis=0))
    assert dst.amax is None
    dst.load_state_dict(src.state_dict())
    assert torch.equal(dst.amax, src.amax)
    x = torch.randn(4, 3)
    assert torch.equal(dst(x), src(x))


def test_state_dict_loads_on_the_quantizer_device():
    src = calibrated()
    sd = {k: v.to("meta") for k, v in src.state_dict().items()}
    dst = TensorQuantizer()  # lives on CPU: a meta/cuda checkpoint lands on CPU
    dst.load_state_dict({k: torch.ones_like(v, device="cpu") for k, v in sd.items()})
    assert dst.amax.device.type == "cpu"


def test_model_with_quantizers_survives_torch_save(tmp_path):
    m = nn.Sequential(nn.Linear(3, 3))
    m.q = calibrated()
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    fresh = nn.Sequential(nn.Linear(3, 3))
    fresh.q = TensorQuantizer()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert float(fresh.q.amax) == 3.0


def test_learn_amax_makes_a_parameter_that_trains():
    q = calibrated()
    q.init_learn_amax()
    assert q.learn_amax and isinstance(q._amax, nn.Parameter)
    assert [n for n, _ in q.named_parameters()] == ["_amax"]
    x = torch.randn(64) * 5
    loss = (q(x) - x).pow(2).mean()
    loss.backward()
    assert q._amax.grad is not None and float(q._amax.grad) != 0.0
    sd = q.state_dict()
    fresh = TensorQuantizer()
    fresh.load_state_dict(sd)
    assert float(fresh.amax) == float(q.amax.detach())


def test_learn_amax_from_descriptor_without_amax_learns_after_calibration():
    q = TensorQuantizer(QuantDescriptor(learn_amax=True))
    assert not q.learn_amax and q.amax is None          # dynamic until calibrated
    with pytest.raises(QuantizerError, match="calibrate first"):
        q.init_learn_amax()
    q.enable_calib()
    q(torch.tensor([0.5, -1.5]))
    q.load_calib_amax()
    q.init_learn_amax()
    assert q.learn_amax and isinstance(q._amax, nn.Parameter) and float(q.amax) == 1.5
    assert float(q.clip.clip_value_min) == -1.5 and float(q.clip.clip_value_max) == 1.5
    q = TensorQuantizer(QuantDescriptor(learn_amax=True, amax=2.0))
    assert q.learn_amax and float(q.amax) == 2.0


def test_fixed_amax_from_descriptor_and_integer_mode():
    q = TensorQuantizer(QuantDescriptor(amax=1.0, fake_quant=False))
    assert q(torch.tensor([0.5, 2.0])).tolist() == [64.0, 127.0]


def test_repr_is_one_line_with_the_essentials():
    q = calibrated(QuantDescriptor(axis=0), torch.randn(5, 2))
    text = repr(q)
    assert "\n" not in text
    for word in ("8bit", "axis=0", "amax=[", "MaxCalibrator", "state=quant"):
        assert word in text
    assert "amax=dynamic" in repr(TensorQuantizer())


@pytest.mark.parametrize("axis", [None, 0])
@pytest.mark.parametrize("narrow", [False, True])
def test_export_path_equals_eager_path(axis, narrow):
    """What ONNX export traces (torch's fake-quant ops) computes what eager mode does."""
    data = torch.randn(8, 16) * 3
    q = calibrated(QuantDescriptor(axis=axis, narrow_range=narrow), data)
    x = torch.randn(8, 16) * 2
    eager = q(x)
    exported = q._torch_fake_quant(x, q.amax)
    # torch's op multiplies by 1/scale; on ordinary data that equals dividing
    assert (eager != exported).float().mean() < 1e-3
    if narrow:
        assert exported.min() >= -q.amax.max() - 1e-6


def test_use_fb_fake_quant_compat_flag():
    q = calibrated()
    TensorQuantizer.use_fb_fake_quant = True
    try:
        out = q(torch.tensor([1.0, -5.0]))
    finally:
        TensorQuantizer.use_fb_fake_quant = False
    assert out.tolist() == pytest.approx([round(127 / 3) * 3 / 127, -3.0 * 128 / 127])


@needs_cuda
def test_quantizer_on_cuda_loads_cpu_state():
    src = calibrated()
    dst = TensorQuantizer().cuda()
    dst.load_state_dict(src.state_dict())
    assert dst.amax.device.type == "cuda"
    assert torch.equal(dst(torch.ones(3, device="cuda")).cpu(), src(torch.ones(3)))
