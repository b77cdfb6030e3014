"""Quant twins of InstanceNorm: the input is quantized, normalization runs as usual
(pytorch-quantization's ``QuantInstanceNorm1d/2d/3d``).

They are not registered as automatic twins: like pytorch-quantization, neither
``quant_modules.initialize()`` nor ``replace_modules`` swaps InstanceNorm unless asked
(``quant_map={nn.InstanceNorm2d: QuantInstanceNorm2d}``), since TensorRT runs
normalization layers in float.
"""

from __future__ import annotations

from torch import nn

from qdq.nn.mixin import QuantInputMixin, check_float_kwargs

__all__ = ["QuantInstanceNorm1d", "QuantInstanceNorm2d", "QuantInstanceNorm3d"]


class _QuantInstanceNorm(QuantInputMixin):
    def __init__(self, *args, quant_desc_input=None, **kwargs):
        check_float_kwargs(type(self), kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input)

    def forward(self, input):
        return super().forward(self._input_quantizer(input))


def _norm_twin(float_cls: type[nn.Module]) -> type[nn.Module]:
    name = "Quant" + float_cls.__name__
    cls = type(name, (_QuantInstanceNorm, float_cls), {"__module__": __name__,
                                                       "__qualname__": name})
    cls._float_cls = float_cls
    return cls


QuantInstanceNorm1d = _norm_twin(nn.InstanceNorm1d)
QuantInstanceNorm2d = _norm_twin(nn.InstanceNorm2d)
QuantInstanceNorm3d = _norm_twin(nn.InstanceNorm3d)
