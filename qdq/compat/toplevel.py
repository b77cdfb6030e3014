"""What ``import pytorch_quantization`` gives under :mod:`qdq.compat`: its top-level names."""

from qdq import __version__
from qdq.quant_modules import deactivate, enable_onnx_export, initialize

__all__ = ["__version__", "initialize", "deactivate", "enable_onnx_export"]
