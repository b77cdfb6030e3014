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
from qdq.nn.clip import Clip
from qdq.nn.conv import (
    QuantConv1d,
    QuantConv2d,
    QuantConv3d,
    QuantConvTranspose1d,
    QuantConvTranspose2d,
    QuantConvTranspose3d,
)
from qdq.nn.functional import QuantAdd, QuantConcat, QuantMatMul
from qdq.nn.hf_conv1d import QuantConv1D
from qdq.nn.instancenorm import QuantInstanceNorm1d, QuantInstanceNorm2d, QuantInstanceNorm3d
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
from qdq.nn.weight_only_embedding import WeightOnlyEmbedding  # noqa: F401 (registers it)
from qdq.quantizer import TensorQuantizer

# pytorch-quantization's short spellings (quant_nn.Conv2d is QuantConv2d, ...)
Conv1d, Conv2d, Conv3d = QuantConv1d, QuantConv2d, QuantConv3d
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = (
    QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d)
Linear = QuantLinear
MaxPool1d, MaxPool2d, MaxPool3d = QuantMaxPool1d, QuantMaxPool2d, QuantMaxPool3d
AvgPool1d, AvgPool2d, AvgPool3d = QuantAvgPool1d, QuantAvgPool2d, QuantAvgPool3d
AdaptiveAvgPool1d, AdaptiveAvgPool2d, AdaptiveAvgPool3d = (
    QuantAdaptiveAvgPool1d, QuantAdaptiveAvgPool2d, QuantAdaptiveAvgPool3d)
LSTM, LSTMCell = QuantLSTM, QuantLSTMCell
InstanceNorm1d, InstanceNorm2d, InstanceNorm3d = (
    QuantInstanceNorm1d, QuantInstanceNorm2d, QuantInstanceNorm3d)

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
    "QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d", "Clip",
    "QuantAdd", "QuantConcat", "QuantMatMul", "QuantConv1D",
    "ATTENTION_TWINS", "QuantAttentionMixin", "attention_twin_of", "register_attention",
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "Linear", "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d", "LSTM", "LSTMCell",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
]
