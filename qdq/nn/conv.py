"""Quant twins of Conv1d/2d/3d and ConvTranspose1d/2d/3d.

Inputs per tensor, weights per output channel: axis 0 for Conv (weight is
``[out, in/groups, *k]``) and axis 1 for ConvTranspose (weight is ``[in, out/groups, *k]``).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from qdq.descriptor import QuantDescriptor
from qdq.nn.mixin import QuantMixin, check_float_kwargs
from qdq.nn.registry import register_quant_twin

__all__ = [
    "QuantConv1d", "QuantConv2d", "QuantConv3d",
    "QuantConvTranspose1d", "QuantConvTranspose2d", "QuantConvTranspose3d",
]


class _QuantConvNd(QuantMixin):
    def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
        check_float_kwargs(type(self), kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def forward(self, input):
        return self._conv_forward(
            self._input_quantizer(input), self._weight_quantizer(self.weight), self.bias
        )


@register_quant_twin(nn.Conv1d)
class QuantConv1d(_QuantConvNd, nn.Conv1d):
    pass


@register_quant_twin(nn.Conv2d)
class QuantConv2d(_QuantConvNd, nn.Conv2d):
    pass


@register_quant_twin(nn.Conv3d)
class QuantConv3d(_QuantConvNd, nn.Conv3d):
    pass


_CONV_TRANSPOSE_FN = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class _QuantConvTransposeNd(QuantMixin):
    default_quant_desc_weight = QuantDescriptor(num_bits=8, axis=1)
    _num_spatial: int

    def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
        check_float_kwargs(type(self), kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def forward(self, input, output_size=None):
        if self.padding_mode != "zeros":
            raise ValueError(f"{type(self).__name__} supports padding_mode='zeros' only")
        output_padding = self._output_padding(
            input, output_size, self.stride, self.padding, self.kernel_size,
            self._num_spatial, self.dilation,
        )
        return _CONV_TRANSPOSE_FN[self._num_spatial](
            self._input_quantizer(input), self._weight_quantizer(self.weight), self.bias,
            self.stride, self.padding, output_padding, self.groups, self.dilation,
        )


@register_quant_twin(nn.ConvTranspose1d)
class QuantConvTranspose1d(_QuantConvTransposeNd, nn.ConvTranspose1d):
    _num_spatial = 1


@register_quant_twin(nn.ConvTranspose2d)
class QuantConvTranspose2d(_QuantConvTransposeNd, nn.ConvTranspose2d):
    _num_spatial = 2


@register_quant_twin(nn.ConvTranspose3d)
class QuantConvTranspose3d(_QuantConvTransposeNd, nn.ConvTranspose3d):
    _num_spatial = 3


# pytorch-quantization's short names
Conv1d, Conv2d, Conv3d = QuantConv1d, QuantConv2d, QuantConv3d
ConvTranspose1d, ConvTranspose2d, ConvTranspose3d = (
    QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d)
