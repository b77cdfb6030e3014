"""Weight-only ``nn.Embedding``: the table held as int8 or int4 codes with fp32 scales.

An embedding table ``[num_embeddings, embedding_dim]`` is quantized like any other
weight-only weight (:mod:`qdq.blockwise`), reading a row as an output channel:

* ``block_size=None``: one scale per row (per token), scale shape ``[num_embeddings]``;
* ``block_size=B``: one scale per run of ``B`` values of a row (blocks along the embedding
  dimension, which ``B`` must divide), scale shape ``[num_embeddings, embedding_dim / B]``.

``forward`` is ``F.embedding`` on the dequantized table (``codes * scale``), with the
float layer's ``padding_idx``; ``sparse`` and ``scale_grad_by_freq`` only concern
gradients of the table, which has none here. ``max_norm`` is refused: it rewrites the
looked-up rows of the table in place at every call, which integer codes cannot follow;
keep such a layer float (``weight_only(..., ignore=[name])``).

ONNX. The layer traces to the usual ``WeightDQ`` placeholder feeding ``Gather``;
:func:`export.formats.lower_weight_dq` then writes, where the opset allows it,

* opset >= 21 (W4, and W8 with blocks): ``Gather`` of the integer table and ``Gather`` of
  the scales (kept ``[num_embeddings, 1]`` per row, so the gathered scales have the rank
  of the gathered rows) followed by one block-wise ``DequantizeLinear`` on the last axis
  (block ``embedding_dim`` per row, or ``B``): only the looked-up rows are dequantized,
  never the whole table. ``Gather`` takes no INT4 input at any opset, so an INT4 table is
  first ``Cast`` to int8 (a constant the runtime folds once into an int8 table, still 4x
  smaller than fp32; the file keeps it packed two per byte);
* opset 13 (W8 per row, the opset TensorRT's INT8 path uses): ``DequantizeLinear`` of the
  whole table (``axis=0``) then ``Gather``. Before opset 21 DequantizeLinear has only
  per-tensor and 1-D per-axis scales, and gathered per-row scales are neither, so
  dequantizing after the Gather cannot be written with standard ops there. The file
  stores int8 all the same.

Why Gather first where it can be written: the runtime then touches only the rows a batch
looks up (ONNX Runtime does not constant-fold DequantizeLinear, so a whole-table DQ would
dequantize all ``num_embeddings`` rows on every run). The price: the gathered scales are
computed tensors, and TensorRT documents DequantizeLinear scales as build-time constants.
For TensorRT, export with ``to_onnx(..., gather_first=False)``, which writes the whole-table
form (constant integer table, constant scales, then Gather) at any opset.

Both graphs compute ``codes * scale`` in fp32 for each element looked up, which is what
PyTorch computes, so ONNX Runtime equals PyTorch bit for bit.

Example::

    emb = WeightOnlyEmbedding.from_float(nn.Embedding(1000, 256, padding_idx=0),
                                         bits=4, block_size=128)
    vectors = emb(torch.tensor([[5, 0, 17]]))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qdq.blockwise import MSE_CLIP_RATIOS
from qdq.nn.weight_only import QuantizedWeight, WeightOnlyLayer, register_weight_only

__all__ = ["WeightOnlyEmbedding"]


@register_weight_only(nn.Embedding)
class WeightOnlyEmbedding(WeightOnlyLayer):
    """``nn.Embedding`` whose table is a :class:`QuantizedWeight` (``weight_q``)."""

    _CONFIG = ("num_embeddings", "embedding_dim", "padding_idx", "max_norm", "norm_type",
               "scale_grad_by_freq", "sparse")

    def __init__(self, weight_q: QuantizedWeight, bias: None = None,
                 float_layer: nn.Embedding | None = None) -> None:
        super().__init__(weight_q, None, float_layer)
        self.num_embeddings, self.embedding_dim = weight_q.shape
        self.padding_idx = None if float_layer is None else float_layer.padding_idx
        self.max_norm = None
        self.norm_type = 2.0 if float_layer is None else float_layer.norm_type
        self.scale_grad_by_freq = (False if float_layer is None
                                   else float_layer.scale_grad_by_freq)
        self.sparse = False if float_layer is None else float_layer.sparse

    @classmethod
    def from_float(cls, module: nn.Module, bits: int = 8, block_size: int | None = None,
                   amax_method: str = "max",
                   clip_ratios: tuple[float, ...] = MSE_CLIP_RATIOS) -> WeightOnlyEmbedding:
        if getattr(module, "max_norm", None) is not None:
            raise ValueError("weight-only Embedding does not support max_norm (it renormalizes "
                             "the table's rows in place at every lookup); keep this layer "
                             "float with ignore=[its name]")
        weight_q = QuantizedWeight.from_weight(module.weight, bits, block_size, amax_method,
                                               clip_ratios)
        layer = cls(weight_q, None, module)
        layer.method = amax_method  # how the codes were chosen: max or mse (a record)
        return layer

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.weight_q(), self.padding_idx)

    def extra_repr(self) -> str:
        text = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            text += f", padding_idx={self.padding_idx}"
        return text
