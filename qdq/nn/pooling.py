"""Quant twins of pooling layers: the input is quantized, pooling runs as usual.

Quantizing a pooling input lets TensorRT run the pool in INT8. MaxPool commutes with
Q/DQ, so the placement rules may share this quantizer with the one after the pool.
"""

from __future__ import annotations

from torch import nn

from qdq.nn.mixin import input_quant_twin
from qdq.nn.registry import register_quant_twin

__all__ = [
    "QuantMaxPool1d", "QuantMaxPool2d", "QuantMaxPool3d",
    "QuantAvgPool1d", "QuantAvgPool2d", "QuantAvgPool3d",
    "QuantAdaptiveAvgPool1d", "QuantAdaptiveAvgPool2d", "QuantAdaptiveAvgPool3d",
]


def _pool_twin(float_cls: type[nn.Module]) -> type[nn.Module]:
    return register_quant_twin(float_cls)(input_quant_twin(float_cls, __name__))


QuantMaxPool1d = _pool_twin(nn.MaxPool1d)
QuantMaxPool2d = _pool_twin(nn.MaxPool2d)
QuantMaxPool3d = _pool_twin(nn.MaxPool3d)
QuantAvgPool1d = _pool_twin(nn.AvgPool1d)
QuantAvgPool2d = _pool_twin(nn.AvgPool2d)
QuantAvgPool3d = _pool_twin(nn.AvgPool3d)
QuantAdaptiveAvgPool1d = _pool_twin(nn.AdaptiveAvgPool1d)
QuantAdaptiveAvgPool2d = _pool_twin(nn.AdaptiveAvgPool2d)
QuantAdaptiveAvgPool3d = _pool_twin(nn.AdaptiveAvgPool3d)

# pytorch-quantization's short names
MaxPool1d, MaxPool2d, MaxPool3d = QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
AvgPool1d, AvgPool2d, AvgPool3d = QuantAvgPool1d, QuantAvgPool2d, QuantAvgPool3d
AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d = (
    QuantAdaptiveAvgPool1d, QuantAdaptiveAvgPool2d, QuantAdaptiveAvgPool3d)
