"""Quant twin of Linear: input per tensor, weight per output row (axis 0).

A Linear may carry a per-input-channel ``input_scale`` (SmoothQuant's ``1/s``, set by
:meth:`QuantLinear.set_input_scale`): the input is multiplied by it before the input
quantizer, and the weight was multiplied by ``s`` when it was set, so the float function
is unchanged. It exports as a ``Mul`` before ``QuantizeLinear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdq.nn.mixin import QuantMixin, check_float_kwargs
from qdq.nn.registry import register_quant_twin

__all__ = ["QuantLinear"]


@register_quant_twin(nn.Linear)
class QuantLinear(QuantMixin, nn.Linear):
    def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kwargs):
        check_float_kwargs(type(self), kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def quantize_input(self, input: torch.Tensor) -> torch.Tensor:
        """The input as the matmul sees it: times ``input_scale`` (if any), quantized."""
        scale = self._buffers.get("input_scale")
        if scale is not None:
            input = input * scale.to(input.dtype)
        return self._input_quantizer(input)

    def forward(self, input):
        return F.linear(
            self.quantize_input(input), self._weight_quantizer(self.weight), self.bias
        )

    def set_input_scale(self, scale: torch.Tensor | None) -> None:
        """Store the per-input-channel activation multiplier (None removes it); read it
        with ``getattr(layer, "input_scale", None)``.

        Only the buffer changes: the caller rescales the weight (``W * (1/scale)`` along
        the input axis) so that the float function stays the same.
        """
        if scale is None:
            self._buffers.pop("input_scale", None)
            return
        scale = torch.as_tensor(scale, dtype=torch.float32).detach()
        if scale.shape != (self.in_features,):
            raise ValueError(f"input_scale must have shape ({self.in_features},), got "
                             f"{tuple(scale.shape)}")
        self.register_buffer("input_scale", scale.to(self.weight.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):
        key = prefix + "input_scale"
        if key in state_dict and "input_scale" not in self._buffers:
            self.register_buffer("input_scale", torch.ones(self.in_features,
                                                           device=self.weight.device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)


Linear = QuantLinear  # pytorch-quantization's short name
