"""One decision of what a layer is: subclasses that only change how a layer is built get
its twin, subclasses with their own code stay float and are named, and every float layer
comes with its reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import torchvision
from torch import nn
from torchvision.models.video.resnet import Conv3DSimple

import qdq
from qdq.layer_kinds import FloatLayersWarning, float_layers, overridden, twin_class
from qdq.nn.registry import QUANT_TWINS
from qdq.rules import apply_rules
from tests.qdq.test_restore_families import _calibrate


class ScaledLinear(nn.Linear):
    """A Linear with its own forward: a QuantLinear twin would drop the scaling."""

    def forward(self, x):
        return super().forward(x) * 2.0


class BuiltLinear(nn.Linear):
    """A Linear that only changes how it is built."""

    def __init__(self, n: int):
        super().__init__(n, n, bias=False)


class Gate(nn.Module):
    """A layer with weights and no twin."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(4, 4))

    def forward(self, x):
        return x @ self.weight


def test_subclasses_that_only_build_differently_get_the_base_twin():
    from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

    assert overridden(Conv3DSimple, nn.Conv3d) == []
    assert twin_class(Conv3DSimple, QUANT_TWINS) is qdq.nn.QuantConv3d
    assert twin_class(NonDynamicallyQuantizableLinear, QUANT_TWINS) is qdq.nn.QuantLinear
    assert twin_class(BuiltLinear(4), QUANT_TWINS) is qdq.nn.QuantLinear
    assert overridden(ScaledLinear, nn.Linear) == ["forward"]
    assert twin_class(ScaledLinear, QUANT_TWINS) is None


def test_video_resnet_convs_are_all_quantized_and_restore(tmp_path):
    """torchvision's r3d_18 builds 16 of its 20 convs as Conv3DSimple."""
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(num_classes=4).eval()
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv3d)]
    assert sum(type(m) is Conv3DSimple for m in model.modules()) == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error", FloatLayersWarning)
        qdq.replace_modules(model)
    assert all(isinstance(model.get_submodule(n), qdq.nn.QuantConv3d) for n in convs)
    assert [f for f in float_layers(model) if not f.expected] == []
    x = torch.randn(1, 3, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    _calibrate(model, lambda m: m(x))
    path = qdq.save(model, tmp_path / "r3d.pt")
    recipe = qdq.checkpoint.read(path)["recipe"]
    assert any(f and f.endswith("Conv3DSimple") for _, _, f in recipe["twins"])
    fresh = qdq.restore(torchvision.models.video.r3d_18(num_classes=4), path).eval()
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_a_subclass_with_its_own_forward_stays_float_and_is_named():
    model = nn.Sequential(nn.Linear(4, 4), ScaledLinear(4, 4), BuiltLinear(4), Gate())
    with pytest.warns(FloatLayersWarning) as caught:
        qdq.replace_modules(model)
    assert type(model[1]) is ScaledLinear
    assert isinstance(model[2], qdq.nn.QuantLinear)
    text = str(caught[0].message)
    assert text.startswith("2 layer(s) with weights stay float")
    assert "1 (ScaledLinear): a subclass of Linear with its own forward" in text
    assert "3 (Gate): no quant twin for Gate" in text
    x = torch.randn(3, 4)
    with torch.no_grad():  # the subclass still computes its own function
        assert torch.equal(model[1](x), nn.functional.linear(x, model[1].weight,
                                                             model[1].bias) * 2)


def test_every_float_layer_has_a_reason_in_the_summary():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3).eval()
    qdq.replace_modules(model, ignore=["fc"])
    found = {f.name: f for f in float_layers(model, ignore=["fc"])}
    assert found["fc"].reason == "ignored (the ignore list)"
    assert found["bn1"].reason.startswith("normalization")
    assert all(f.expected for f in found.values())
    text = qdq.summary(model)
    assert "layers with weights left float: 21" in text
    assert "fc (Linear)" in text and "layer4.1.bn2 (BatchNorm2d)" in text
    model.layer1[0].conv1._input_quantizer.disable()
    model.layer1[0].conv1._weight_quantizer.disable()
    assert float_layers(model)[1].name == "layer1.0.conv1"
    assert "switched off" in float_layers(model)[1].reason


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


def test_multihead_attention_projections_are_named_then_quantized_by_the_rules():
    torch.manual_seed(0)
    model = SelfAttention().eval()
    qdq.replace_modules(model)
    assert type(model.attn.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    found = {f.name: f for f in float_layers(model)}
    assert "MultiheadAttention" in found["attn"].reason
    assert "attn.out_proj" in found
    assert all(f.expected for f in found.values())
    model = apply_rules(model, torch.randn(1, 5, 16))
    assert float_layers(model) == []

    # nn.TransformerEncoderLayer does not trace: its attention stays float, with the reason
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False).eval()
    qdq.replace_modules(encoder)
    with pytest.warns(UserWarning, match="cannot trace"):
        encoder = apply_rules(encoder, torch.randn(1, 5, 16))
    found = {f.name: f for f in float_layers(encoder)}
    assert "where torch.fx traces" in found["layers.0.self_attn"].reason


def test_weight_only_quantizes_subclasses_and_restores(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(BuiltLinear(8), nn.ReLU(), nn.Linear(8, 3))
    replaced = qdq.weight_only(model, bits=4, progress=False)
    assert [r.name for r in replaced] == ["0", "2"]
    x = torch.randn(2, 8)
    path = qdq.save(model, tmp_path / "w4.pt")
    fresh = qdq.restore(nn.Sequential(BuiltLinear(8), nn.ReLU(), nn.Linear(8, 3)), path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_weight_only_models_name_layers_without_a_weight_only_twin():
    pytest.importorskip("transformers")
    from tests.hf_tiny import tiny_gpt2

    model = tiny_gpt2("eager")
    qdq.weight_only(model, bits=4, progress=False)
    found = {f.name: f for f in float_layers(model)}
    conv = found["transformer.h.0.attn.c_attn"]
    assert conv.reason.startswith("no weight-only twin for Conv1D") and not conv.expected
    assert found["transformer.h.0.attn"].expected  # activations stay float by design


def test_attention_with_its_own_code_is_named_float():
    """DeBERTa-v2's disentangled attention has no twin: its products are named float,
    once (the innermost attention module), with the reason."""
    transformers = pytest.importorskip("transformers")
    config = transformers.DebertaV2Config(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                          num_attention_heads=4, intermediate_size=64,
                                          max_position_embeddings=32)
    model = transformers.DebertaV2Model(config).eval()
    with pytest.warns(FloatLayersWarning, match="DisentangledSelfAttention computes q @ k"):
        qdq.replace_modules(model)
    named = [f.name for f in float_layers(model) if "q @ k^T" in f.reason]
    assert named == ["encoder.layer.0.attention.self"]
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
        intermediate_size=64))
    qdq.replace_modules(bert)
    assert not [f for f in float_layers(bert) if "q @ k^T" in f.reason]
