"""Run pytorch-quantization scripts unchanged: its module paths, answered by qdq.

``install()`` makes ``import pytorch_quantization...`` (and every ``from ... import``
its scripts use) resolve to qdq's modules, so a script written for pytorch-quantization
runs without editing its imports::

    import qdq.compat
    qdq.compat.install()
    from pytorch_quantization import quant_modules      # qdq.quant_modules

or, for a whole script: ``python -m qdq.compat train.py --its --own --flags``.

It is opt-in and never shadows a real pytorch-quantization: when one is importable (or
already imported), ``install()`` refuses with :class:`CompatError` and changes nothing.

Leaf modules are qdq's own module objects (``pytorch_quantization.tensor_quant is
qdq.tensor_quant``), so patching a function there patches qdq. Packages
(``pytorch_quantization``, ``.nn``, ``.nn.modules``, ``.calib``, ``.utils``, ``.optim``)
are thin views that add pytorch-quantization's submodule names and read everything else
from the qdq package they stand for. The compiled ``cuda_ext`` is answered by
:mod:`qdq.compat.cuda_ext`, the same functions in plain torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
from types import ModuleType

__all__ = ["install", "uninstall", "is_installed", "MODULE_MAP", "CompatError"]

PACKAGE = "pytorch_quantization"

#: pytorch-quantization module path -> the qdq module that answers it. ``None`` marks a
#: package view (its submodules below it in this table).
MODULE_MAP: dict[str, str | None] = {
    PACKAGE: "qdq.compat.toplevel",
    f"{PACKAGE}.version": "qdq.compat.toplevel",
    f"{PACKAGE}.tensor_quant": "qdq.tensor_quant",
    f"{PACKAGE}.cuda_ext": "qdq.compat.cuda_ext",
    f"{PACKAGE}.quant_modules": "qdq.quant_modules",
    f"{PACKAGE}.calib": "qdq.calib",
    f"{PACKAGE}.calib.calibrator": "qdq.calib.base",
    f"{PACKAGE}.calib.max": "qdq.calib.max",
    f"{PACKAGE}.calib.histogram": "qdq.calib.histogram",
    f"{PACKAGE}.nn": "qdq.nn",
    f"{PACKAGE}.nn.functional": "qdq.nn.functional",
    f"{PACKAGE}.nn.modules": "qdq.nn",
    f"{PACKAGE}.nn.modules.tensor_quantizer": "qdq.quantizer",
    f"{PACKAGE}.nn.modules.quant_conv": "qdq.nn.conv",
    f"{PACKAGE}.nn.modules.quant_linear": "qdq.nn.linear",
    f"{PACKAGE}.nn.modules.quant_pooling": "qdq.nn.pooling",
    f"{PACKAGE}.nn.modules.quant_rnn": "qdq.nn.rnn",
    f"{PACKAGE}.nn.modules.quant_instancenorm": "qdq.nn.instancenorm",
    f"{PACKAGE}.nn.modules.clip": "qdq.nn.clip",
    f"{PACKAGE}.nn.modules._utils": "qdq.nn.mixin",
    f"{PACKAGE}.nn._functions": "qdq.nn",
    f"{PACKAGE}.nn._functions.quant_rnn": "qdq.compat.rnn_functions",
    f"{PACKAGE}.utils": "qdq.utils",
    f"{PACKAGE}.utils.reduce_amax": "qdq.utils",
    f"{PACKAGE}.utils.quant_logging": "qdq.utils",
    f"{PACKAGE}.optim": "qdq.optim",
    f"{PACKAGE}.optim.helper": "qdq.optim.helper",
}

# pytorch-quantization's packages: a view per package, leaves are the qdq modules
_PACKAGES = {name for name in MODULE_MAP
             if any(other.startswith(name + ".") for other in MODULE_MAP)}

_lock = threading.Lock()
_installed: dict[str, ModuleType] = {}


class CompatError(RuntimeError):
    """The alias cannot be installed (a real pytorch-quantization is present)."""


class _PackageView(ModuleType):
    """A pytorch-quantization package: its submodules by name, the rest read from the
    qdq package it stands for."""

    def __init__(self, name: str, target: ModuleType) -> None:
        super().__init__(name, target.__doc__)
        self.__path__ = []  # a package: submodule imports are looked up in sys.modules
        self.__package__ = name
        self._qdq_target = target

    def __getattr__(self, attr: str):
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return getattr(self._qdq_target, attr)

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(dir(self._qdq_target)))

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} (qdq view of {self._qdq_target.__name__!r})>"


def _real_package_present() -> bool:
    current = sys.modules.get(PACKAGE)
    if current is not None:
        return not isinstance(current, _PackageView)
    return importlib.util.find_spec(PACKAGE) is not None


def install() -> None:
    """Answer ``pytorch_quantization`` imports with qdq's modules (idempotent).

    Raises :class:`CompatError`, changing nothing, where a real pytorch-quantization is
    installed or imported: qdq never shadows it.
    """
    with _lock:
        if _installed:
            return
        if _real_package_present():
            raise CompatError(
                "a real pytorch_quantization is installed; qdq.compat will not shadow it. "
                "Uninstall it (pip uninstall pytorch-quantization) or import qdq directly")
        modules: dict[str, ModuleType] = {}
        for name in sorted(MODULE_MAP, key=lambda n: n.count(".")):
            target = importlib.import_module(MODULE_MAP[name])
            modules[name] = _PackageView(name, target) if name in _PACKAGES else target
        for name, module in modules.items():
            parent, _, child = name.rpartition(".")
            view = modules.get(parent)
            # a package attribute of the same name wins, as in pytorch-quantization
            # (``utils.reduce_amax`` is the function, not its submodule)
            if isinstance(view, _PackageView) and not hasattr(view._qdq_target, child):
                setattr(view, child, module)
        sys.modules.update(modules)
        _installed.update(modules)


def uninstall() -> None:
    """Remove the ``pytorch_quantization`` names that :func:`install` added."""
    with _lock:
        for name, module in _installed.items():
            if sys.modules.get(name) is module:
                del sys.modules[name]
        _installed.clear()


def is_installed() -> bool:
    return bool(_installed)
