"""Every registered quant twin, parametrised over the registry."""

import pytest
import torch
from torch import nn

from qdq import QuantDescriptor, quantizers
from qdq import nn as quant_nn
from qdq.nn import QUANT_TWINS

# a float layer and an input for every registered twin
CASES = {
    nn.Conv1d: (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 9)),
    nn.Conv2d: (lambda: nn.Conv2d(3, 4, 3, stride=2, groups=1), (2, 3, 9, 9)),
    nn.Conv3d: (lambda: nn.Conv3d(2, 4, 3, bias=False), (1, 2, 5, 5, 5)),
    nn.ConvTranspose1d: (lambda: nn.ConvTranspose1d(3, 4, 3, stride=2), (2, 3, 6)),
    nn.ConvTranspose2d: (lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), (2, 4, 5, 5)),
    nn.ConvTranspose3d: (lambda: nn.ConvTranspose3d(2, 3, 2, stride=2), (1, 2, 3, 3, 3)),
    nn.Linear: (lambda: nn.Linear(7, 5), (3, 7)),
    nn.MaxPool1d: (lambda: nn.MaxPool1d(2), (2, 3, 8)),
    nn.MaxPool2d: (lambda: nn.MaxPool2d(3, 2, 1), (2, 3, 8, 8)),
    nn.MaxPool3d: (lambda: nn.MaxPool3d(2), (1, 2, 4, 4, 4)),
    nn.AvgPool1d: (lambda: nn.AvgPool1d(2), (2, 3, 8)),
    nn.AvgPool2d: (lambda: nn.AvgPool2d(2), (2, 3, 8, 8)),
    nn.AvgPool3d: (lambda: nn.AvgPool3d(2), (1, 2, 4, 4, 4)),
    nn.AdaptiveAvgPool1d: (lambda: nn.AdaptiveAvgPool1d(1), (2, 3, 8)),
    nn.AdaptiveAvgPool2d: (lambda: nn.AdaptiveAvgPool2d((2, 2)), (2, 3, 8, 8)),
    nn.AdaptiveAvgPool3d: (lambda: nn.AdaptiveAvgPool3d(1), (1, 2, 4, 4, 4)),
    nn.LSTM: (lambda: nn.LSTM(5, 6, num_layers=2, bidirectional=True), (4, 3, 5)),
    nn.LSTMCell: (lambda: nn.LSTMCell(5, 6), (3, 5)),
}


def test_every_twin_has_a_case():
    assert set(CASES) == set(QUANT_TWINS), "add new twins to CASES"


def _run(module, x):
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


def _calibrate(module, x):
    for _, q in quantizers(module):
        q.disable_quant()
        q.enable_calib()
    _run(module, x)
    for _, q in quantizers(module):
        q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


@pytest.mark.parametrize("float_cls", list(CASES), ids=lambda c: c.__name__)
def test_twin_from_float_keeps_weights_and_matches_when_disabled(float_cls):
    torch.manual_seed(0)
    make, shape = CASES[float_cls]
    ref = make().eval()
    x = torch.randn(shape)
    twin = QUANT_TWINS[float_cls].from_float(ref)
    assert isinstance(twin, float_cls)
    assert set(dict(ref.named_parameters())) == {
        n for n, _ in twin.named_parameters() if "quantizer" not in n}
    for name, p in ref.named_parameters():
        assert twin.get_parameter(name) is p  # shared, not copied
    for _, q in quantizers(twin):
        q.disable()
    torch.testing.assert_close(_run(twin, x), _run(ref, x), rtol=1e-5, atol=1e-6)
    # and the float module itself was not changed into a quant module
    assert not list(quantizers(ref))


@pytest.mark.filterwarnings("ignore:.*every calibration value was 0")  # zero initial h
@pytest.mark.parametrize("float_cls", list(CASES), ids=lambda c: c.__name__)
def test_twin_quantizes_after_calibration(float_cls):
    torch.manual_seed(1)
    make, shape = CASES[float_cls]
    twin = QUANT_TWINS[float_cls].from_float(make().eval())
    x = torch.randn(shape)
    _calibrate(twin, x)
    for _, q in quantizers(twin):
        assert q.amax is not None
    assert twin.input_quantizer is not None
    with torch.no_grad():
        quant = _run(twin, x)
        for _, q in quantizers(twin):
            q.disable()
        exact = _run(twin, x)
    assert quant.shape == exact.shape
    rel = (quant - exact).norm() / exact.norm()
    assert 0 < rel < 0.05


@pytest.mark.parametrize("cls, axis", [
    (quant_nn.QuantConv2d, 0), (quant_nn.QuantLinear, 0),
    (quant_nn.QuantConvTranspose2d, 1), (quant_nn.QuantConvTranspose1d, 1),
])
def test_weight_axis_defaults(cls, axis):
    assert cls.default_quant_desc_weight.axis == axis


def test_conv_transpose_weight_amax_is_per_output_channel():
    m = quant_nn.QuantConvTranspose2d(4, 6, 3)
    _calibrate(m, torch.randn(1, 4, 5, 5))
    assert m.weight_quantizer.amax.shape == (1, 6, 1, 1)
    expected = m.weight.detach().abs().amax(dim=(0, 2, 3), keepdim=True)
    assert torch.equal(m.weight_quantizer.amax, expected)


def test_constructor_kwargs_and_class_defaults():
    desc_in = QuantDescriptor(num_bits=8, calib_method="max", unsigned=True)
    m = quant_nn.QuantConv2d(3, 8, 3, quant_desc_input=desc_in)
    assert m.input_quantizer.unsigned and m.weight_quantizer.axis == 0
    old = quant_nn.QuantLinear.default_quant_desc_input
    try:
        quant_nn.QuantLinear.set_default_quant_desc_input(QuantDescriptor(num_bits=6))
        assert quant_nn.QuantLinear(2, 2).input_quantizer.num_bits == 6
        assert quant_nn.QuantConv2d(2, 2, 1).input_quantizer.num_bits == 8  # per class
    finally:
        quant_nn.QuantLinear.default_quant_desc_input = old
    with pytest.raises(TypeError, match="QuantDescriptor"):
        quant_nn.QuantLinear.set_default_quant_desc_weight({"num_bits": 8})


def test_from_float_checks_type():
    with pytest.raises(TypeError, match="Conv2d"):
        quant_nn.QuantConv2d.from_float(nn.Linear(2, 2))


def test_lstm_unbatched_batch_first_and_initial_state():
    torch.manual_seed(2)
    ref = nn.LSTM(4, 5, batch_first=True)
    twin = quant_nn.QuantLSTM.from_float(ref)
    for _, q in quantizers(twin):
        q.disable()
    x = torch.randn(2, 7, 4)
    h0 = (torch.randn(1, 2, 5), torch.randn(1, 2, 5))
    for a, b in zip(twin(x, h0)[1], ref(x, h0)[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(twin(x[0])[0], ref(x[0])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="proj_size"):
        quant_nn.QuantLSTM(4, 5, proj_size=2)


def test_functional_twins():
    torch.manual_seed(3)
    a, b = torch.randn(2, 3, 4), torch.randn(2, 4, 5)
    mm = quant_nn.QuantMatMul()
    add = quant_nn.QuantAdd()
    cat = quant_nn.QuantConcat(dim=1)
    for m in (mm, add, cat):
        for _, q in quantizers(m):
            q.disable()
    torch.testing.assert_close(mm(a, b), a @ b)
    torch.testing.assert_close(add(a, a), a + a)
    torch.testing.assert_close(cat([a, a]), torch.cat([a, a], 1))
    assert len(list(quantizers(cat))) == 1  # one quantizer for every input
    assert len(list(quantizers(mm))) == 2
