"""Fake-quant backends, chosen per call by ``TensorQuantizer.backend``.

- ``"eager"``: :func:`qdq.tensor_quant.fake_quant`, plain torch ops, any device.
- ``"fused"``: :func:`qdq.kernels.fake_quant.fused_fake_tensor_quant`, Triton kernels
  on CUDA (same numbers, one pass forward and backward); eager elsewhere.
- ``"auto"`` (default): fused for CUDA tensors, eager otherwise.

The environment variable ``QDQ_FAKE_QUANT_BACKEND`` sets the default (``eager`` turns
the kernels off everywhere). Triton is imported only when a CUDA tensor is quantized.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from qdq.tensor_quant import fake_quant

__all__ = ["FAKE_QUANT_BACKENDS", "default_backend", "resolve_backend"]


def _fused(*args, **kwargs):
    from qdq.kernels.fake_quant import fused_fake_tensor_quant

    return fused_fake_tensor_quant(*args, **kwargs)


#: backend name -> function with the signature of ``fake_quant``
FAKE_QUANT_BACKENDS: dict[str, Callable[..., torch.Tensor]] = {
    "eager": fake_quant,
    "fused": _fused,
}


def default_backend() -> str:
    name = os.environ.get("QDQ_FAKE_QUANT_BACKEND", "auto")
    if name != "auto" and name not in FAKE_QUANT_BACKENDS:
        raise ValueError(f"QDQ_FAKE_QUANT_BACKEND={name!r}: choose auto or one of "
                         f"{sorted(FAKE_QUANT_BACKENDS)}")
    return name


def resolve_backend(name: str, x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """The fake-quant function for backend ``name`` and input ``x``."""
    if name == "auto":
        name = "fused" if x.is_cuda else "eager"
    try:
        return FAKE_QUANT_BACKENDS[name]
    except KeyError:
        raise ValueError(f"fake-quant backend {name!r}: choose auto or one of "
                         f"{sorted(FAKE_QUANT_BACKENDS)}") from None
