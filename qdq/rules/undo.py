"""Putting a model back exactly as it was when a rewrite fails halfway.

:func:`qdq.rules.apply_rules` changes the model it is given in place (BatchNorm folded
into weights, quant twins swapped in, quantizers tied, parts installed): an error after
the first of those would leave a model that is neither the float one nor a quantized
one. A :class:`Snapshot` taken first records what those changes touch: every module's
attributes (its children, parameters and buffers included) and the values of every
parameter and buffer. Restoring puts the same objects back with the same values, so
references the caller holds to submodules or parameters stay valid.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Snapshot"]

_CONTAINERS = ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set")


def _attributes(module: nn.Module) -> dict:
    saved = dict(module.__dict__)
    for name in _CONTAINERS:
        if name in saved:
            saved[name] = type(saved[name])(saved[name])  # the registries are edited in place
    return saved


class Snapshot:
    """Module attributes and tensor values of a model; :meth:`restore` puts them back.

    Costs one copy of the parameters and buffers, kept in CPU memory.
    """

    def __init__(self, model: nn.Module) -> None:
        self._modules = [(m, _attributes(m)) for m in model.modules()]
        seen: set[int] = set()
        self._tensors: list[tuple[torch.Tensor, torch.Tensor]] = []
        for m in model.modules():
            for t in [*m._parameters.values(), *m._buffers.values()]:
                if t is not None and id(t) not in seen:
                    seen.add(id(t))
                    self._tensors.append((t, t.detach().to("cpu", copy=True)))

    @torch.no_grad()
    def restore(self) -> None:
        for module, saved in self._modules:
            module.__dict__.clear()
            module.__dict__.update(saved)
        for tensor, value in self._tensors:
            if tensor.shape == value.shape and tensor.dtype == value.dtype:
                tensor.copy_(value)
            else:
                tensor.data = value.to(tensor.device)
