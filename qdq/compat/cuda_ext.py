"""``pytorch_quantization.cuda_ext`` under :mod:`qdq.compat`: the compiled extension's
functions, as plain torch on any device.

pytorch-quantization built these in C++/CUDA; qdq needs no extension, so its scripts that
call them directly get the same functions written over :mod:`qdq.tensor_quant` (same
defaults: narrow range, amax a constant). The arithmetic is qdq's (ONNX's), see
:mod:`qdq.tensor_quant`.
"""

from __future__ import annotations

import torch

from qdq.tensor_quant import fake_quant

__all__ = ["fake_tensor_quant", "fake_tensor_quant_", "fake_tensor_quant_with_axis",
           "fake_e4m3fy"]


def fake_tensor_quant(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int = 8,
                      unsigned: bool = False, narrow_range: bool = True) -> torch.Tensor:
    """Fake-quantize with one amax for the whole tensor."""
    return fake_quant(inputs, amax.detach().reshape(()), num_bits, unsigned, narrow_range)


def fake_tensor_quant_(inputs: torch.Tensor, amax: torch.Tensor, num_bits: int = 8,
                       unsigned: bool = False, narrow_range: bool = True) -> None:
    """:func:`fake_tensor_quant` written back into ``inputs``."""
    with torch.no_grad():
        inputs.copy_(fake_tensor_quant(inputs, amax, num_bits, unsigned, narrow_range))


def fake_tensor_quant_with_axis(inputs: torch.Tensor, amax: torch.Tensor, axis: int,
                                num_bits: int = 8, unsigned: bool = False,
                                narrow_range: bool = True) -> torch.Tensor:
    """Fake-quantize with one amax per index along ``axis`` (amax holds one value each)."""
    shape = [1] * inputs.dim()
    shape[axis % inputs.dim()] = -1
    return fake_quant(inputs, amax.detach().reshape(shape), num_bits, unsigned, narrow_range)


def fake_e4m3fy(inputs: torch.Tensor) -> torch.Tensor:
    """Round onto the FP8 E4M3 grid without scaling (saturating at +-448)."""
    return fake_quant(inputs, torch.tensor(448.0, device=inputs.device), (4, 3))
