"""Quant twins of functional ops, as modules so graphs can hold them.

``torch.add``/``+``, ``torch.cat`` and ``torch.matmul``/``bmm``/``@`` have no module
to swap, so the placement rules rewrite traced graphs to call these instead (and users
may call them directly in custom layers).

- ``QuantAdd``: ``_input_quantizer`` on ``input`` and ``_other_quantizer`` on ``other``.
  For a residual add TensorRT fuses into the conv, the rules switch off the quantizer on
  the conv branch and keep the one on the identity branch.
- ``QuantConcat``: one quantizer for every input (TensorRT gives a concat's inputs and
  output one tensor, hence one scale).
- ``QuantMatMul``: both operands quantized (attention ``q @ k^T`` and ``attn @ v``).

``clip`` (pytorch-quantization's ``nn.functional.clip``) clamps to bounds that broadcast
and may be learned; :class:`qdq.nn.clip.Clip` is its module.
"""

from __future__ import annotations

import torch
from torch import nn

from qdq.clipping import ClipFunction, clip
from qdq.descriptor import QuantDescriptor
from qdq.nn.mixin import QuantInputMixin
from qdq.quantizer import TensorQuantizer

__all__ = ["QuantAdd", "QuantConcat", "QuantMatMul", "ClipFunction", "clip"]


class _QuantBinary(QuantInputMixin, nn.Module):
    def __init__(self, quant_desc_input: QuantDescriptor | None = None,
                 quant_desc_other: QuantDescriptor | None = None) -> None:
        super().__init__()
        self.init_quantizer(quant_desc_input)
        self._other_quantizer = TensorQuantizer(
            quant_desc_other if quant_desc_other is not None else self.default_quant_desc_input
        )

    @property
    def other_quantizer(self) -> TensorQuantizer:
        return self._other_quantizer


class QuantAdd(_QuantBinary):
    """``input + other`` with each operand quantized (either may be disabled)."""

    def forward(self, input, other):
        return torch.add(self._input_quantizer(input), self._other_quantizer(other))


class QuantMatMul(_QuantBinary):
    """``input @ other`` with both operands quantized; batched inputs work (bmm)."""

    def forward(self, input, other):
        return torch.matmul(self._input_quantizer(input), self._other_quantizer(other))


class QuantConcat(QuantInputMixin, nn.Module):
    """``torch.cat(tensors, dim)`` with every input through one shared quantizer."""

    def __init__(self, dim: int = 0, quant_desc_input: QuantDescriptor | None = None) -> None:
        super().__init__()
        self.dim = dim
        self.init_quantizer(quant_desc_input)

    def forward(self, tensors, dim: int | None = None):
        return torch.cat([self._input_quantizer(t) for t in tensors],
                         self.dim if dim is None else dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"
