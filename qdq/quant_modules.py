"""Automatic insertion: swap ``torch.nn`` layer classes for their quant twins.

While active, ``torch.nn.Conv2d`` *is* ``QuantConv2d`` (and so on for every registered
twin), so any model built in that window is born quantized, as with
pytorch-quantization. Call ``deinitialize()`` to restore torch.nn, or use the returned
object as a context manager, which restores it even when model building raises.

Example::

    with quant_modules.initialize():
        model = torchvision.models.resnet50()
    # torch.nn is back to normal here; model holds QuantConv2d, QuantLinear, ...
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator
from types import ModuleType

from torch import nn

from qdq.nn.registry import QUANT_TWINS

__all__ = ["initialize", "deinitialize", "deactivate", "is_active", "enable_onnx_export"]

_lock = threading.Lock()
_saved: list[tuple[ModuleType, str, object]] = []


class _Session:
    """What ``initialize`` returns; a context manager that deinitializes on exit."""

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc) -> None:
        deinitialize()


def initialize(float_module_list: Iterable[str] | None = None,
               custom_quant_modules: Iterable[tuple[ModuleType, str, type]] | None = None
               ) -> _Session:
    """Patch torch.nn so new layers are quant twins.

    Args:
        float_module_list: class names to leave in float (e.g. ``["Linear"]``).
        custom_quant_modules: extra ``(module, attribute name, quant class)`` entries,
            e.g. ``[(torch.nn, "Linear", MyQuantLinear)]``; they override the defaults.
    """
    keep_float = set(float_module_list or ())
    entries: dict[tuple[int, str], tuple[ModuleType, str, type]] = {}
    known = {cls.__name__ for cls in QUANT_TWINS}
    unknown = keep_float - known
    if unknown:
        raise ValueError(f"float_module_list names unknown layers {sorted(unknown)}; "
                         f"known: {sorted(known)}")
    for float_cls, quant_cls in QUANT_TWINS.items():
        if float_cls.__name__ not in keep_float and getattr(nn, float_cls.__name__, None):
            entries[(id(nn), float_cls.__name__)] = (nn, float_cls.__name__, quant_cls)
    for module, attr, quant_cls in custom_quant_modules or ():
        if not hasattr(module, attr):
            raise ValueError(f"custom_quant_modules: {module.__name__} has no attribute {attr!r}")
        entries[(id(module), attr)] = (module, attr, quant_cls)
    with _lock:
        if _saved:
            raise RuntimeError("quant_modules.initialize() is already active; "
                               "call deinitialize() first")
        for module, attr, quant_cls in entries.values():
            _saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, quant_cls)
    return _Session()


def deinitialize() -> None:
    """Restore every patched torch.nn attribute. Safe to call when not active."""
    with _lock:
        while _saved:
            module, attr, original = _saved.pop()
            setattr(module, attr, original)


#: pytorch-quantization's other name for ``deinitialize``.
deactivate = deinitialize


def is_active() -> bool:
    return bool(_saved)


@contextlib.contextmanager
def enable_onnx_export() -> Iterator[None]:
    """pytorch-quantization's switch around ``torch.onnx.export``.

    qdq's quantizers notice the export by themselves and emit QuantizeLinear /
    DequantizeLinear either way; inside this block they also run torch's own fake-quant
    ops in eager mode, as pytorch-quantization's did. Export still needs calibrated amax.
    """
    from qdq.quantizer import TensorQuantizer

    saved = TensorQuantizer.use_fb_fake_quant
    TensorQuantizer.use_fb_fake_quant = True
    try:
        yield
    finally:
        TensorQuantizer.use_fb_fake_quant = saved
