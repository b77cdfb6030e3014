"""qdq: explicit (Q/DQ) INT8 quantization of PyTorch models for TensorRT, and FP8 Q/DQ and
INT8/INT4 weight-only formats beside it (:mod:`qdq.formats`).

The pytorch-quantization workflow on torch 2.x, in pure Python::

    from qdq import nn as quant_nn, quant_modules, calib
    from qdq.tensor_quant import QuantDescriptor

A quantized model in one file: ``qdq.save(model, path)`` and
``qdq.restore(float_model, path)`` (:mod:`qdq.checkpoint`).
"""

from qdq import calib, nn, quant_modules, tensor_quant
from qdq.checkpoint import RestoreError, restore, save
from qdq.descriptor import QuantDescriptor
from qdq.formats import FORMATS, apply_format, format_of, get_format, set_format, weight_only
from qdq.layer_kinds import FloatLayer, FloatLayersWarning, float_layers
from qdq.quantizer import QuantizerError, TensorQuantizer
from qdq.replace import (
    Replacement,
    disable_quantization,
    enable_quantization,
    name_quantizers,
    quantizers,
    replace_modules,
)
from qdq.summary import summary, summary_rows

__version__ = "0.1.0"

__all__ = [
    "calib", "nn", "quant_modules", "tensor_quant",
    "QuantDescriptor", "TensorQuantizer", "QuantizerError",
    "Replacement", "replace_modules", "quantizers", "name_quantizers",
    "disable_quantization", "enable_quantization", "summary", "summary_rows",
    "FORMATS", "get_format", "set_format", "weight_only", "apply_format", "format_of",
    "save", "restore", "RestoreError",
    "float_layers", "FloatLayer", "FloatLayersWarning",
]
