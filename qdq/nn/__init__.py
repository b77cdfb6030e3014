"""Quant modules: ``TensorQuantizer`` and the quant twins of torch.nn layers.

Importable as ``from qdq import nn as quant_nn``, the way pytorch-quantization scripts
import ``pytorch_quantization.nn``.
"""

from qdq.nn.attention import (
    ATTENTION_TWINS,
    QuantAttentionMixin,
    attention_twin_of,
    register_attention,
)
from qdq.nn.conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from qdq.nn.functional import QuantAdd, QuantConcat, QuantMatMul
from qdq.nn.linear import QuantLinear
from qdq.nn.mixin import QuantInputMixin, QuantMixin
from qdq.nn.pooling import (
    QuantAdaptiveAvgPool1d,
    QuantAdaptiveAvgPool2d,
    QuantAdaptiveAvgPool3d,
    QuantAvgPool1d,
    QuantAvgPool2d,
    QuantAvgPool3d,
    QuantMaxPool1d,
    QuantMaxPool2d,
    QuantMaxPool3d,
)
from qdq.nn.registry import QUANT_TWINS, quant_twin_of, register_quant_twin
from qdq.nn.rnn import QuantLSTM, QuantLSTMCell
from qdq.quantizer import TensorQuantizer

# pytorch-quantization's spellings
Conv2d = QuantConv2d
Linear = QuantLinear

__all__ = [
    "TensorQuantizer", "QuantMixin", "QuantInputMixin",
    "QUANT_TWINS", "quant_twin_of", "register_quant_twin",
    "QuantConv1d", "QuantConv2d", "QuantConv3d",
    "QuantConvTranspose1d", "QuantConvTranspose2d", "QuantConvTranspose3d",
    "QuantLinear",
    "QuantMaxPool1d", "QuantMaxPool2d", "QuantMaxPool3d",
    "QuantAvgPool1d", "QuantAvgPool2d", "QuantAvgPool3d",
    "QuantAdaptiveAvgPool1d", "QuantAdaptiveAvgPool2d", "QuantAdaptiveAvgPool3d",
    "QuantLSTM", "QuantLSTMCell",
    "QuantAdd", "QuantConcat", "QuantMatMul",
    "ATTENTION_TWINS", "QuantAttentionMixin", "attention_twin_of", "register_attention",
]
