"""Quant twin of Linear: input per tensor, weight per output row (axis 0)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from qdq.nn.mixin import QuantMixin
from qdq.nn.registry import register_quant_twin

__all__ = ["QuantLinear"]


@register_quant_twin(nn.Linear)
class QuantLinear(QuantMixin, nn.Linear):
    def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def forward(self, input):
        return F.linear(
            self._input_quantizer(input), self._weight_quantizer(self.weight), self.bias
        )
