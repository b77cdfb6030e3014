"""The float -> quant twin registry: one table that automatic insertion, manual
replacement and the tests all read.

Example::

    @register_quant_twin(nn.Conv2d)
    class QuantConv2d(nn.Conv2d, QuantMixin): ...

    quant_twin_of(nn.Conv2d)  # -> QuantConv2d
"""

from __future__ import annotations

from torch import nn

__all__ = ["QUANT_TWINS", "register_quant_twin", "quant_twin_of"]

#: float module class -> quant module class
QUANT_TWINS: dict[type[nn.Module], type[nn.Module]] = {}


def register_quant_twin(float_cls: type[nn.Module]):
    """Class decorator: record ``quant_cls`` as the twin of ``float_cls``."""

    def deco(quant_cls: type[nn.Module]) -> type[nn.Module]:
        if float_cls in QUANT_TWINS and QUANT_TWINS[float_cls] is not quant_cls:
            raise ValueError(
                f"{float_cls.__name__} already has the quant twin "
                f"{QUANT_TWINS[float_cls].__name__}"
            )
        QUANT_TWINS[float_cls] = quant_cls
        quant_cls._float_cls = float_cls
        return quant_cls

    return deco


def quant_twin_of(float_cls: type[nn.Module]) -> type[nn.Module] | None:
    return QUANT_TWINS.get(float_cls)
