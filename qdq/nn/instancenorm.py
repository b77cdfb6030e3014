"""Quant twins of InstanceNorm: the input is quantized, normalization runs as usual
(pytorch-quantization's ``QuantInstanceNorm1d/2d/3d``).

They are not registered as automatic twins: like pytorch-quantization, neither
``quant_modules.initialize()`` nor ``replace_modules`` swaps InstanceNorm unless asked
(``quant_map={nn.InstanceNorm2d: QuantInstanceNorm2d}``), since TensorRT runs
normalization layers in float.
"""

from __future__ import annotations

from torch import nn

from qdq.nn.mixin import input_quant_twin

__all__ = ["QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d"]


QuantInstanceNorm1d = input_quant_twin(nn.InstanceNorm1d, __name__)
QuantInstanceNorm2d = input_quant_twin(nn.InstanceNorm2d, __name__)
QuantInstanceNorm3d = input_quant_twin(nn.InstanceNorm3d, __name__)
