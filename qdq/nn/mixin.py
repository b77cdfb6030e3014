"""``QuantMixin``: the one mechanism every quant layer uses to own its quantizers.

A quant layer subclasses its float layer and this mixin, calls ``init_quantizer`` in
``__init__`` and runs its inputs and weight through ``_input_quantizer`` and
``_weight_quantizer`` in ``forward``. Defaults are per class and can be changed with
``set_default_quant_desc_input/weight`` (pytorch-quantization's API).

Example (a custom layer)::

    class QuantScaledLinear(nn.Linear, QuantMixin):
        def __init__(self, *args, quant_desc_input=None, quant_desc_weight=None, **kw):
            super().__init__(*args, **kw)
            self.init_quantizer(quant_desc_input, quant_desc_weight)

        def forward(self, x):
            return 2.0 * F.linear(self._input_quantizer(x),
                                  self._weight_quantizer(self.weight), self.bias)
"""

from __future__ import annotations

import functools
import inspect

from torch import nn

from qdq.descriptor import QuantDescriptor
from qdq.quantizer import TensorQuantizer

__all__ = ["QuantMixin", "QuantInputMixin", "DEFAULT_INPUT_DESC", "DEFAULT_WEIGHT_DESC",
           "check_float_kwargs", "input_quant_twin"]

DEFAULT_INPUT_DESC = QuantDescriptor(num_bits=8, calib_method="max")
DEFAULT_WEIGHT_DESC = QuantDescriptor(num_bits=8, axis=0, calib_method="max")


def _check_desc(value, what: str, owner: type) -> QuantDescriptor:
    if not isinstance(value, QuantDescriptor):
        raise TypeError(
            f"{owner.__name__}: {what} must be a QuantDescriptor, got {type(value).__name__}"
        )
    if not value.fake_quant:
        # integer outputs would feed the float op as if they were activations
        raise ValueError(f"{owner.__name__}: {what} has fake_quant=False. Only fake "
                         "quantization is supported in quant layers")
    return value


@functools.cache
def _init_parameters(cls: type) -> frozenset[str] | None:
    """Keyword names ``cls.__init__`` takes; None when it takes any (``**kwargs``)."""
    params = inspect.signature(cls.__init__).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not p.VAR_POSITIONAL)


def check_float_kwargs(quant_cls: type, kwargs: dict) -> None:
    """Refuse keyword arguments neither the float layer nor the quant twin takes, with
    the names (pytorch-quantization's "Unused keys"), before the float layer is built."""
    float_cls = getattr(quant_cls, "_float_cls", None)
    known = _init_parameters(float_cls) if float_cls is not None else None
    if known is None:
        return
    unused = sorted(set(kwargs) - known)
    if unused:
        raise TypeError(f"{quant_cls.__name__}: Unused keys: {unused} (not arguments of "
                        f"{float_cls.__name__} nor quant_desc_input/quant_desc_weight)")


class QuantInputMixin:
    """Owns ``_input_quantizer`` (layers with no weight, e.g. pooling)."""

    default_quant_desc_input: QuantDescriptor = DEFAULT_INPUT_DESC
    _float_cls: type[nn.Module]

    @classmethod
    def set_default_quant_desc_input(cls, value: QuantDescriptor) -> None:
        cls.default_quant_desc_input = _check_desc(value, "quant_desc_input", cls)

    def init_quantizer(self, quant_desc_input: QuantDescriptor | None = None) -> None:
        desc = quant_desc_input if quant_desc_input is not None else self.default_quant_desc_input
        self._input_quantizer = TensorQuantizer(_check_desc(desc, "quant_desc_input", type(self)))

    @property
    def input_quantizer(self) -> TensorQuantizer:
        return self._input_quantizer

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: QuantDescriptor | None = None,
                   **descs) -> nn.Module:
        """The quant twin of ``module``, sharing its parameters, buffers and hooks."""
        twin = twin_shell(cls, module)
        twin.init_quantizer(quant_desc_input, **descs)
        return twin


class QuantMixin(QuantInputMixin):
    """Owns ``_input_quantizer`` and ``_weight_quantizer`` (Conv, Linear, ...)."""

    default_quant_desc_weight: QuantDescriptor = DEFAULT_WEIGHT_DESC

    @classmethod
    def set_default_quant_desc_weight(cls, value: QuantDescriptor) -> None:
        cls.default_quant_desc_weight = _check_desc(value, "quant_desc_weight", cls)

    def init_quantizer(self, quant_desc_input: QuantDescriptor | None = None,
                       quant_desc_weight: QuantDescriptor | None = None) -> None:
        super().init_quantizer(quant_desc_input)
        desc = (quant_desc_weight if quant_desc_weight is not None
                else self.default_quant_desc_weight)
        self._weight_quantizer = TensorQuantizer(
            _check_desc(desc, "quant_desc_weight", type(self))
        )

    @property
    def weight_quantizer(self) -> TensorQuantizer:
        return self._weight_quantizer

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: QuantDescriptor | None = None,
                   quant_desc_weight: QuantDescriptor | None = None) -> nn.Module:
        twin = twin_shell(cls, module)
        twin.init_quantizer(quant_desc_input, quant_desc_weight)
        return twin


def twin_shell(cls: type, module: nn.Module) -> nn.Module:
    """A ``cls`` instance holding ``module``'s state without running ``__init__``.

    Parameters and buffers are shared, not copied, so the twin keeps the weights, their
    device and dtype, and any extra attributes the float module carried.
    """
    float_cls = getattr(cls, "_float_cls", None)
    if float_cls is not None and not isinstance(module, float_cls):
        raise TypeError(f"{cls.__name__}.from_float expects {float_cls.__name__}, "
                        f"got {type(module).__name__}")
    twin = cls.__new__(cls)
    twin.__dict__.update(module.__dict__)
    for key in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        if key in module.__dict__:
            twin.__dict__[key] = type(module.__dict__[key])(module.__dict__[key])
    if float_cls is not None and type(module) is not float_cls:
        twin._from_cls = type(module)  # a subclass: qdq.save records what to rebuild from
    return twin


class _QuantInputOnly(QuantInputMixin):
    """A float layer whose input is quantized and whose computation is unchanged."""

    def __init__(self, *args, quant_desc_input=None, **kwargs):
        check_float_kwargs(type(self), kwargs)
        super().__init__(*args, **kwargs)
        self.init_quantizer(quant_desc_input)

    def forward(self, input):
        return super().forward(self._input_quantizer(input))


def input_quant_twin(float_cls: type[nn.Module], module: str) -> type[nn.Module]:
    """``Quant<float_cls>``: ``float_cls`` with its input quantized (pooling, norms), a
    class of module ``module``. Registering it as the automatic twin is the caller's
    choice (:func:`qdq.nn.registry.register_quant_twin`)."""
    name = "Quant" + float_cls.__name__
    cls = type(name, (_QuantInputOnly, float_cls), {"__module__": module, "__qualname__": name})
    cls._float_cls = float_cls
    return cls
