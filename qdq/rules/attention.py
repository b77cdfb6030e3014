"""``QuantMultiheadAttention``: ``nn.MultiheadAttention`` with its matmuls quantized.

``nn.MultiheadAttention`` computes its projections and both attention matmuls inside one
call, so module swapping cannot reach them and the exported graph holds float MatMuls.
This twin keeps the float module's parameters (same state_dict keys, plus quantizers)
and spells the computation out:

- the packed q/k/v projection: input through ``_input_quantizer`` (``_key_quantizer`` and
  ``_value_quantizer`` for cross-attention), weight per output row;
- ``q @ k^T`` and ``attn @ v`` through ``QuantMatMul`` (``qk``, ``av``);
- ``out_proj`` as a ``QuantLinear``.

Covered: packed projections (``kdim == vdim == embed_dim``), batch_first or not,
unbatched inputs, ``attn_mask`` (bool or float, 2-D or 3-D), ``key_padding_mask``,
``is_causal``, dropout, ``need_weights``. Not covered (left as is by the rule, with a
note): ``bias_k``/``bias_v``, ``add_zero_attn`` and separate k/v dimensions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from qdq.nn.attention import QuantAttentionMixin, attention_twin_of
from qdq.nn.functional import QuantMatMul
from qdq.nn.linear import QuantLinear
from qdq.nn.mixin import QuantMixin
from qdq.quantizer import TensorQuantizer

__all__ = ["QuantMultiheadAttention", "attention_matmuls", "swap_attention",
           "swap_attention_twins", "unsupported_reason"]


def unsupported_reason(mha: nn.MultiheadAttention) -> str | None:
    if not mha._qkv_same_embed_dim:
        return "separate key/value dimensions"
    if mha.bias_k is not None or mha.bias_v is not None:
        return "bias_k/bias_v"
    if mha.add_zero_attn:
        return "add_zero_attn"
    return None


class QuantMultiheadAttention(QuantMixin, nn.MultiheadAttention):
    _float_cls = nn.MultiheadAttention

    @classmethod
    def from_float(cls, module: nn.MultiheadAttention, quant_desc_input=None,
                   quant_desc_weight=None) -> QuantMultiheadAttention:
        why = unsupported_reason(module)
        if why is not None:
            raise ValueError(f"QuantMultiheadAttention does not support {why}")
        twin = super().from_float(module, quant_desc_input, quant_desc_weight)
        twin._key_quantizer = TensorQuantizer(twin._input_quantizer.descriptor)
        twin._value_quantizer = TensorQuantizer(twin._input_quantizer.descriptor)
        twin.qk = QuantMatMul(quant_desc_input, quant_desc_input)
        twin.av = QuantMatMul(quant_desc_input, quant_desc_input)
        twin.out_proj = QuantLinear.from_float(module.out_proj, quant_desc_input,
                                               quant_desc_weight)
        return twin

    def extra_input_sites(self, node: fx.Node):
        """Key and value read through their own quantizers when they are other tensors."""
        args = list(node.args[:3]) + [node.kwargs.get(k) for k in ("key", "value")]
        query = args[0]
        for attr, arg in (("_key_quantizer", args[1] if len(args) > 1 else None),
                          ("_value_quantizer", args[2] if len(args) > 2 else None)):
            if isinstance(arg, fx.Node) and arg is not query:
                yield attr, arg

    def _project(self, query, key, value):
        w = self._weight_quantizer(self.in_proj_weight)
        b = self.in_proj_bias
        e = self.embed_dim
        xq = self._input_quantizer(query)
        if key is query and value is query:
            return F.linear(xq, w, b).chunk(3, dim=-1)
        bq, bk, bv = (None, None, None) if b is None else b.split(e)
        xk = xq if key is query else self._key_quantizer(key)
        xv = xk if value is key else self._value_quantizer(value)
        return (F.linear(xq, w[:e], bq), F.linear(xk, w[e:2 * e], bk),
                F.linear(xv, w[2 * e:], bv))

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True,
                attn_mask=None, average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        same_k, same_v = key is query, value is key
        if unbatched:
            query = query.unsqueeze(1)
            key = query if same_k else key.unsqueeze(1)
            value = key if same_v else value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query = query.transpose(0, 1)
            key = query if same_k else key.transpose(0, 1)
            value = key if same_v else value.transpose(0, 1)
        tgt_len, bsz, embed = query.shape
        heads, head_dim = self.num_heads, self.head_dim
        q, k, v = self._project(query, key, value)
        src_len = k.shape[0]
        q = q.reshape(tgt_len, bsz * heads, head_dim).transpose(0, 1) * head_dim ** -0.5
        k = k.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        v = v.reshape(src_len, bsz * heads, head_dim).transpose(0, 1)
        scores = self.qk(q, k.transpose(1, 2))
        if attn_mask is None and is_causal:
            attn_mask = torch.ones(tgt_len, src_len, dtype=torch.bool,
                                   device=scores.device).triu(1)
        if attn_mask is not None:
            scores = _apply_mask(scores, attn_mask)
        if key_padding_mask is not None:
            scores = _apply_mask(
                scores.view(bsz, heads, tgt_len, src_len),
                key_padding_mask.view(bsz, 1, 1, src_len),
            ).view(bsz * heads, tgt_len, src_len)
        attn = F.softmax(scores, dim=-1)
        attn = F.dropout(attn, self.dropout, self.training)
        out = self.av(attn, v).transpose(0, 1).reshape(tgt_len, bsz, embed)
        out = self.out_proj(out)
        if unbatched:
            out = out.squeeze(1)
        elif self.batch_first:
            out = out.transpose(0, 1)
        weights = None
        if need_weights:
            weights = attn.view(bsz, heads, tgt_len, src_len)
            if average_attn_weights:
                weights = weights.mean(dim=1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights


def _apply_mask(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return scores.masked_fill(mask, float("-inf"))
    return scores + mask


def _self_attention_targets(gm: nn.Module) -> dict[str, bool]:
    """module target -> whether every call passes the query as key and value too."""
    graph = getattr(gm, "graph", None)
    found: dict[str, bool] = {}
    for node in graph.nodes if graph is not None else ():
        if node.op != "call_module":
            continue
        args = list(node.args[:3])
        args += [node.kwargs.get(k) for k in ("query", "key", "value")[len(args):]]
        same = len(args) == 3 and args[0] is args[1] is args[2]
        found[node.target] = found.get(node.target, True) and same
    return found


def swap_attention(gm: nn.Module) -> tuple[list[str], list[tuple[str, str]]]:
    """Swap every ``nn.MultiheadAttention`` under ``gm`` for its quant twin, in place.

    On a traced graph, a module only ever called as self-attention gets its key and value
    quantizers switched off (they would never see data, and the query quantizer already
    covers that tensor).
    """
    self_attention = _self_attention_targets(gm)
    swapped, skipped = [], []
    for name, module in list(gm.named_modules()):
        if type(module) is not nn.MultiheadAttention:
            continue
        why = unsupported_reason(module)
        if why is not None:
            skipped.append((name, why))
            continue
        twin = QuantMultiheadAttention.from_float(module)
        for q in (twin._input_quantizer, twin._weight_quantizer, twin.qk._input_quantizer,
                  twin.qk._other_quantizer, twin.av._input_quantizer,
                  twin.av._other_quantizer):
            q.placed_by = "attention"
        if self_attention.get(name, False):
            twin._key_quantizer.disable()
            twin._value_quantizer.disable()
        parent, _, attr = name.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, attr, twin)
        swapped.append(name)
    return swapped, skipped


def swap_attention_twins(model: nn.Module) -> list[str]:
    """Swap every registered attention module (:mod:`qdq.nn.attention`) under ``model``
    for its twin, in place, wherever it sits (traced or not); returns their paths.

    ``qdq.replace_modules`` already does this; models quantized with
    ``quant_modules.initialize()`` get it here.
    """
    swapped = []
    for name, module in list(model.named_modules()):
        twin_cls = attention_twin_of(type(module))
        if twin_cls is None or not name:
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr,
                twin_cls.from_float(module))
        swapped.append(name)
    return swapped


def attention_matmuls(model: nn.Module) -> list[tuple[str, QuantMatMul]]:
    """``(path, QuantMatMul)`` of every attention matmul (``q @ k^T``, ``attn @ v``) of
    attention twins and ``QuantMultiheadAttention`` under ``model``.

    Example (every Linear in INT8, attention matmuls in float)::

        for _, mm in attention_matmuls(model):
            mm._input_quantizer.disable(); mm._other_quantizer.disable()
    """
    found = []
    for name, module in model.named_modules():
        if isinstance(module, QuantAttentionMixin):
            names = module._spec.matmuls
        elif isinstance(module, QuantMultiheadAttention):
            names = ("qk", "av")
        else:
            continue
        found += [(f"{name}.{n}" if name else n, getattr(module, n)) for n in names]
    return found
