"""The float -> quant twin registry: one table that automatic insertion, manual
replacement and the tests all read.

Example::

    @register_quant_twin(nn.Conv2d)
    class QuantConv2d(nn.Conv2d, QuantMixin): ...

    quant_twin_of(nn.Conv2d)  # -> QuantConv2d

Layers of other libraries are registered by their import path
(:func:`register_quant_twin_path`, table :data:`QUANT_TWIN_PATHS`), so qdq never imports
those libraries; :func:`quant_twin_of` finds them by the float class's path.
"""

from __future__ import annotations

from torch import nn

__all__ = ["QUANT_TWINS", "QUANT_TWIN_PATHS", "register_quant_twin",
           "register_quant_twin_path", "quant_twin_of"]

#: float module class -> quant module class
QUANT_TWINS: dict[type[nn.Module], type[nn.Module]] = {}
#: "module.ClassName" of a float class qdq does not import -> its quant class
QUANT_TWIN_PATHS: dict[str, type[nn.Module]] = {}


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


def register_quant_twin_path(path: str):
    """Class decorator: record ``quant_cls`` as the twin of the class at ``path``
    (``"transformers.pytorch_utils.Conv1D"``) without importing it. The quant class's
    ``from_float`` must accept that class; its ``_float_cls`` is set once it is met."""

    def deco(quant_cls: type[nn.Module]) -> type[nn.Module]:
        QUANT_TWIN_PATHS[path] = quant_cls
        return quant_cls

    return deco


def quant_twin_of(float_cls: type[nn.Module]) -> type[nn.Module] | None:
    """The twin of exactly ``float_cls`` (registered by class or by import path)."""
    quant_cls = QUANT_TWINS.get(float_cls)
    if quant_cls is None and QUANT_TWIN_PATHS:
        quant_cls = QUANT_TWIN_PATHS.get(f"{float_cls.__module__}.{float_cls.__qualname__}")
        if quant_cls is not None:
            quant_cls._float_cls = float_cls
    return quant_cls
