"""The documented way to put quantizers inside a user module."""

import torch
import torch.nn.functional as F
from torch import nn

import qdq
from qdq import nn as quant_nn
from qdq.nn import QuantMixin


class ScaledLinear(nn.Linear):
    """A user layer with its own forward."""

    def forward(self, x):
        return 2.0 * super().forward(x)


class QuantScaledLinear(ScaledLinear, QuantMixin):
    def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def forward(self, x):
        return 2.0 * F.linear(self._input_quantizer(x), self._weight_quantizer(self.weight),
                              self.bias)


class GatedBlock(nn.Module):
    """A block that quantizes a functional op with a bare TensorQuantizer."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.gate_quantizer = quant_nn.TensorQuantizer()

    def forward(self, x):
        return self.proj(x) * torch.sigmoid(self.gate_quantizer(x))


def test_custom_layer_through_quant_map_and_initialize():
    model = nn.Sequential(ScaledLinear(4, 4), GatedBlock())
    done = qdq.replace_modules(model, quant_map={ScaledLinear: QuantScaledLinear})
    assert [r.quant_type for r in done] == ["QuantScaledLinear", "QuantLinear"]
    assert isinstance(model[0], QuantScaledLinear)
    names = [n for n, _ in qdq.quantizers(model)]
    assert "1.gate_quantizer" in names and "0._weight_quantizer" in names
    for _, q in qdq.quantizers(model):
        q.disable_quant()
        q.enable_calib()
    x = torch.randn(8, 4)
    model(x)
    for _, q in qdq.quantizers(model):
        q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()
    with qdq.disable_quantization(model):
        ref = model(x)
    out = model(x)
    assert 0 < (out - ref).norm() / ref.norm() < 0.05

    with qdq.quant_modules.initialize(
            custom_quant_modules=[(nn, "Linear", quant_nn.QuantLinear)]):
        built = nn.Linear(2, 2)
    assert isinstance(built, quant_nn.QuantLinear)
