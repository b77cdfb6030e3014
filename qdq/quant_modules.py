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
import sys
import threading
from collections.abc import Iterable, Iterator
from types import ModuleType

from torch import nn

from qdq.nn.registry import QUANT_TWIN_PATHS, QUANT_TWINS, quant_twin_of

__all__ = ["initialize", "deinitialize", "deactivate", "is_active", "enable_onnx_export",
           "QuantModuleReplacementHelper"]

_lock = threading.Lock()


class _Session:
    """What ``initialize`` returns; a context manager that deinitializes on exit."""

    def __enter__(self) -> _Session:
        return self

    def __exit__(self, *exc) -> None:
        deinitialize()


class QuantModuleReplacementHelper:
    """The patch table behind :func:`initialize` (pytorch-quantization's class of the
    same name): ``prepare_state`` decides what to swap, ``apply_quant_modules`` swaps,
    ``restore_float_modules`` puts the originals back."""

    def __init__(self) -> None:
        self.quant_map: dict[tuple[int, str], tuple[ModuleType, str, type]] = {}
        self.original: list[tuple[ModuleType, str, object]] = []

    def prepare_state(self, float_module_list: Iterable[str] | None = None,
                      custom_map: Iterable[tuple[ModuleType, str, type]] | None = None
                      ) -> None:
        """Every registered twin of a ``torch.nn`` class except those named in
        ``float_module_list``, then ``custom_map`` entries on top (they win).

        Twins registered by import path (``transformers.pytorch_utils.Conv1D``) are
        patched in every loaded module that holds the float class under its name (each
        ``modeling_*.py`` imports it by name), when its library is already imported.
        """
        keep_float = set(float_module_list or ())
        known = {cls.__name__ for cls in QUANT_TWINS}
        known |= {path.rpartition(".")[2] for path in QUANT_TWIN_PATHS}
        unknown = keep_float - known
        if unknown:
            raise ValueError(f"float_module_list names unknown layers {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        entries: dict[tuple[int, str], tuple[ModuleType, str, type]] = {}
        for float_cls, quant_cls in QUANT_TWINS.items():
            name = float_cls.__name__
            if name not in keep_float and getattr(nn, name, None) is float_cls:
                entries[(id(nn), name)] = (nn, name, quant_cls)
        for path, quant_cls in QUANT_TWIN_PATHS.items():
            name = path.rpartition(".")[2]
            if name not in keep_float:
                for module in _holders(path):
                    entries[(id(module), name)] = (module, name, quant_cls)
        for module, attr, quant_cls in custom_map or ():
            if not hasattr(module, attr):
                raise ValueError(f"custom_quant_modules: {module.__name__} has no attribute "
                                 f"{attr!r}")
            entries[(id(module), attr)] = (module, attr, quant_cls)
        self.quant_map = entries

    def apply_quant_modules(self) -> None:
        if self.original:
            self.restore_float_modules()
        for module, attr, quant_cls in self.quant_map.values():
            self.original.append((module, attr, getattr(module, attr)))
            setattr(module, attr, quant_cls)

    def restore_float_modules(self) -> None:
        while self.original:
            module, attr, original = self.original.pop()
            setattr(module, attr, original)

    @property
    def active(self) -> bool:
        return bool(self.original)


def _holders(path: str) -> list[ModuleType]:
    """Loaded modules holding the class at ``path`` under its name (read from their
    ``__dict__``, which never triggers a lazy import)."""
    module_name, _, name = path.rpartition(".")
    home = sys.modules.get(module_name)
    float_cls = vars(home).get(name) if home is not None else None
    if not isinstance(float_cls, type):
        return []
    quant_twin_of(float_cls)  # records the float class of the twin
    return [m for m in list(sys.modules.values())
            if isinstance(m, ModuleType) and vars(m).get(name) is float_cls]


_helper = QuantModuleReplacementHelper()


def initialize(float_module_list: Iterable[str] | None = None,
               custom_quant_modules: Iterable[tuple[ModuleType, str, type]] | None = None
               ) -> _Session:
    """Patch torch.nn so new layers are quant twins.

    Calling it again while active first restores torch.nn, then applies the new lists
    (a notebook cell run twice does no harm).

    Args:
        float_module_list: class names to leave in float (e.g. ``["Linear"]``).
        custom_quant_modules: extra ``(module, attribute name, quant class)`` entries,
            e.g. ``[(torch.nn, "Linear", MyQuantLinear)]``; they override the defaults.
    """
    with _lock:
        previous = dict(_helper.quant_map) if _helper.active else None
        _helper.restore_float_modules()
        try:
            _helper.prepare_state(float_module_list, custom_quant_modules)
        except ValueError:
            if previous is not None:  # a bad second call leaves the first one active
                _helper.quant_map = previous
                _helper.apply_quant_modules()
            raise
        _helper.apply_quant_modules()
    return _Session()


def deinitialize() -> None:
    """Restore every patched torch.nn attribute. Safe to call when not active."""
    with _lock:
        _helper.restore_float_modules()


#: pytorch-quantization's other name for ``deinitialize``.
deactivate = deinitialize


def is_active() -> bool:
    return _helper.active


@contextlib.contextmanager
def enable_onnx_export() -> Iterator[None]:
    """pytorch-quantization's switch around ``torch.onnx.export``.

    qdq's quantizers notice the export by themselves and emit QuantizeLinear /
    DequantizeLinear either way; inside this block they also run torch's own fake-quant
    ops in eager mode, as pytorch-quantization's did (those multiply by ``1/scale``, so an
    eager value within float rounding of a .5 step can land one step away from qdq's usual
    result; the exported graph is the same). Export still needs calibrated amax.
    """
    from qdq.quantizer import TensorQuantizer

    saved = TensorQuantizer.use_fb_fake_quant
    TensorQuantizer.use_fb_fake_quant = True
    try:
        yield
    finally:
        TensorQuantizer.use_fb_fake_quant = saved
