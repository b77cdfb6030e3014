"""Quant twin of Hugging Face's ``Conv1D`` (GPT-2, GPT, DecisionTransformer, ...).

``transformers.pytorch_utils.Conv1D`` is a Linear with its weight stored transposed,
``[in_features, out_features]``, computing ``y = x @ W + b`` with ``torch.addmm``. It is no
``nn.Linear``, so a model made of it (GPT-2) had no quantizer at all. The twin keeps the
weight as it is (state_dict keys and shapes unchanged, so Hugging Face checkpoints still
load) and quantizes:

- the input per tensor;
- the weight per output channel, which is axis 1 of this layout. A weight descriptor with
  ``axis=0`` (the output axis of Linear and Conv, e.g. one descriptor passed to
  ``replace_modules`` for every layer) is read as "per output channel" and moved to axis 1.

It exports as ``DQ(W) -> Gemm`` (``transB=0``, per-channel scales on axis 1). The class is
registered by import path: qdq does not import transformers.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from qdq.descriptor import QuantDescriptor
from qdq.nn.mixin import QuantMixin, twin_shell
from qdq.nn.registry import quant_twin_of, register_quant_twin_path

__all__ = ["QuantConv1D", "CONV1D_PATH"]

CONV1D_PATH = "transformers.pytorch_utils.Conv1D"


def _per_output_channel(desc: QuantDescriptor) -> QuantDescriptor:
    if desc.axis in (0, (0,)):
        return dataclasses.replace(desc, axis=1)
    return desc


def _conv1d_class(module: nn.Module) -> type | None:
    return next((c for c in type(module).__mro__
                 if f"{c.__module__}.{c.__qualname__}" == CONV1D_PATH), None)


@register_quant_twin_path(CONV1D_PATH)
class QuantConv1D(QuantMixin, nn.Module):
    """``y = q(x) @ q(W) + b`` with ``W`` of shape ``[nx, nf]`` (in, out)."""

    default_quant_desc_weight = QuantDescriptor(num_bits=8, axis=1, calib_method="max")

    def __init__(self, nf: int, nx: int, quant_desc_input: QuantDescriptor | None = None,
                 quant_desc_weight: QuantDescriptor | None = None) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))
        nn.init.normal_(self.weight, std=0.02)
        self.init_quantizer(quant_desc_input, quant_desc_weight)

    def init_quantizer(self, quant_desc_input: QuantDescriptor | None = None,
                       quant_desc_weight: QuantDescriptor | None = None) -> None:
        desc = quant_desc_weight if quant_desc_weight is not None else \
            self.default_quant_desc_weight
        super().init_quantizer(quant_desc_input, _per_output_channel(desc))

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: QuantDescriptor | None = None,
                   quant_desc_weight: QuantDescriptor | None = None) -> QuantConv1D:
        float_cls = _conv1d_class(module)
        if float_cls is None:
            raise TypeError(f"QuantConv1D.from_float expects {CONV1D_PATH}, got "
                            f"{type(module).__name__}")
        quant_twin_of(float_cls)  # records the float class (for save and restore)
        twin = twin_shell(cls, module)
        twin.init_quantizer(quant_desc_input, quant_desc_weight)
        return twin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        # flattened first, so that the input's DequantizeLinear feeds the Gemm directly
        x = self._input_quantizer(x.view(-1, x.size(-1)))
        weight = self._weight_quantizer(self.weight)
        x = torch.mm(x, weight) if self.bias is None else torch.addmm(self.bias, x, weight)
        return x.view(size_out)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"
