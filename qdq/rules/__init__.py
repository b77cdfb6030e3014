"""TensorRT-aware Q/DQ placement on torch.fx graphs.

- :func:`fold_batchnorm`: fold eval-mode BatchNorm into the Conv/ConvTranspose/Linear
  before it, before weights are quantized.
"""

from qdq.rules.fold import fold_batchnorm

__all__ = ["fold_batchnorm"]
