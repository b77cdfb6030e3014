"""Automatic (quant_modules) and manual (replace_modules) insertion on torchvision models."""

import re

import pytest
import torch
import torchvision
from torch import nn

import qdq
from qdq import disable_quantization, enable_quantization, quant_modules, quantizers
from qdq import nn as quant_nn

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(weights=None),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(weights=None),
}


def _counts(model):
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    return convs, linears


def _calibrate(model, x):
    for _, q in quantizers(model):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(x)
    for _, q in quantizers(model):
        q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()


@pytest.mark.parametrize("name", list(MODELS))
def test_initialize_builds_quant_models_and_restores_torch_nn(name):
    original = nn.Conv2d
    with quant_modules.initialize():
        assert nn.Conv2d is quant_nn.QuantConv2d and quant_modules.is_active()
        model = MODELS[name]().eval()
    assert nn.Conv2d is original and not quant_modules.is_active()
    convs, linears = _counts(model)
    assert convs > 10 and linears == 1
    assert all(isinstance(m, quant_nn.QuantConv2d) for m in model.modules()
               if isinstance(m, nn.Conv2d))
    assert all(isinstance(m, quant_nn.QuantLinear) for m in model.modules()
               if isinstance(m, nn.Linear))
    x = torch.randn(2, 3, 64, 64)
    # BatchNorm statistics from data, so activations keep their scale through the net
    # (random weights with unit statistics shrink them to ~1e-8 in mobilenet_v2)
    with torch.no_grad(), disable_quantization(model):
        model.train()(torch.randn(8, 3, 64, 64))
    model.eval()
    _calibrate(model, x)
    float_model = MODELS[name]().eval()
    float_model.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        quant_out = model(x)
        ref = float_model(x)
    rel = (quant_out - ref).norm() / ref.norm()
    assert 0 < rel < 0.2


def test_initialize_restores_after_an_exception():
    original = nn.Linear
    with pytest.raises(RuntimeError, match="boom"), quant_modules.initialize():
        assert nn.Linear is quant_nn.QuantLinear
        raise RuntimeError("boom")
    assert nn.Linear is original


def test_plain_call_then_deinitialize_and_aliases():
    original = nn.Linear
    quant_modules.initialize()
    try:
        assert isinstance(nn.Linear(2, 2), quant_nn.QuantLinear)
        # a notebook cell run twice: the second call re-applies, the originals stay known
        quant_modules.initialize(float_module_list=["Linear"])
        assert nn.Linear is original and nn.Conv2d is quant_nn.QuantConv2d
        quant_modules.initialize()
        assert nn.Linear is quant_nn.QuantLinear
    finally:
        quant_modules.deactivate()
    assert nn.Linear is original and nn.Conv2d is not quant_nn.QuantConv2d
    quant_modules.deinitialize()  # harmless when inactive


def test_float_module_list_and_custom_modules():
    class MyQuantLinear(quant_nn.QuantLinear):
        pass

    with quant_modules.initialize(float_module_list=["Conv2d"],
                                  custom_quant_modules=[(nn, "Linear", MyQuantLinear)]):
        conv, lin = nn.Conv2d(1, 1, 1), nn.Linear(1, 1)
    assert type(conv) is nn.Conv2d and type(lin) is MyQuantLinear
    with pytest.raises(ValueError, match="Conv9d"):
        quant_modules.initialize(float_module_list=["Conv9d"])
    assert not quant_modules.is_active()


@pytest.mark.parametrize("name", list(MODELS))
def test_replace_modules_keeps_weights_and_output(name):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
    done = qdq.replace_modules(model)
    convs, linears = _counts(model)
    assert sum(r.quant_type == "QuantConv2d" for r in done) == convs
    assert sum(r.quant_type == "QuantLinear" for r in done) == linears
    with disable_quantization(model), torch.no_grad():
        torch.testing.assert_close(model(x), ref)
    _calibrate(model, x)
    names = [n for n, _ in quantizers(model)]
    assert all(q.name == n for n, q in quantizers(model))
    assert len(names) == len(set(names))


def test_ignore_rules_are_exact():
    model = torchvision.models.resnet18(weights=None)
    # "layer1.0.conv1" must not also ignore "layer1.0.conv10"-like or "layer1.0.conv1x"
    model.layer1[0].add_module("conv1x", nn.Conv2d(1, 1, 1))
    done = {r.name for r in qdq.replace_modules(model, ignore="layer1.0.conv1")}
    assert "layer1.0.conv1" not in done and "layer1.0.conv1x" in done
    assert type(model.layer1[0].conv1) is nn.Conv2d


def test_ignore_list_regex_and_callable():
    model = torchvision.models.resnet18(weights=None)
    rules = ["fc", re.compile(r"layer4\..*"),
             lambda name, module: isinstance(module, nn.MaxPool2d)]
    done = {r.name for r in qdq.replace_modules(model, ignore=rules)}
    assert "fc" not in done and "maxpool" not in done
    assert not any(n.startswith("layer4.") for n in done)
    assert "layer3.0.conv1" in done
    # an ignored module keeps its children in float
    assert all(not isinstance(m, quant_nn.QuantConv2d) for m in model.layer4.modules())
    with pytest.raises(TypeError, match="ignore rule"):
        qdq.replace_modules(model, ignore=[3])


def test_replace_is_idempotent():
    model = torchvision.models.resnet18(weights=None)
    first = qdq.replace_modules(model)
    assert first and qdq.replace_modules(model) == []


def test_disable_and_enable_quantization_contexts_restore_state():
    model = nn.Sequential(quant_nn.QuantLinear(4, 4), quant_nn.QuantLinear(4, 2))
    _calibrate(model, torch.randn(8, 4))
    model[1].input_quantizer.disable()
    before = [q.get_state() for _, q in quantizers(model)]
    with pytest.raises(ValueError), disable_quantization(model):
        assert all(not q.is_enabled for _, q in quantizers(model))
        raise ValueError
    assert [q.get_state() for _, q in quantizers(model)] == before
    with enable_quantization(model[1]):
        assert model[1].input_quantizer.is_enabled
    assert not model[1].input_quantizer.is_enabled
    disable_quantization(model[0]).apply()
    assert not model[0].input_quantizer.is_enabled
    enable_quantization(model).apply()
    assert all(q.is_enabled for _, q in quantizers(model))


def test_summary_text_and_rows():
    model = torchvision.models.resnet18(weights=None).eval()
    qdq.replace_modules(model)
    _calibrate(model, torch.randn(1, 3, 32, 32))
    model.layer1[0].conv1.input_quantizer.disable()
    rows = qdq.summary_rows(model)
    assert len(rows) == len(list(quantizers(model)))
    first = rows[0]
    assert (first.module, first.role, first.bits, first.axis) == ("conv1", "input", 8, "tensor")
    weight = next(r for r in rows if r.module == "conv1" and r.role == "weight")
    assert weight.axis == "0" and weight.amax_min <= weight.amax_max
    off = next(r for r in rows if r.module == "layer1.0.conv1" and r.role == "input")
    assert off.state == "off"
    text = qdq.summary(model)
    assert text.splitlines()[0].split()[:4] == ["module", "role", "bits", "axis"]
    assert "layer4.1.conv2" in text and f"{len(rows)} quantizers" in text


def test_summary_shows_shared_quantizers():
    model = nn.Sequential(quant_nn.QuantConv2d(3, 3, 1), quant_nn.QuantConv2d(3, 3, 1))
    model[1]._input_quantizer = model[0]._input_quantizer
    rows = qdq.summary_rows(model)
    shared = [r for r in rows if r.shared_with]
    assert len(shared) == 1 and shared[0].shared_with == ["1._input_quantizer"]
    assert "1 shared" in qdq.summary(model)
