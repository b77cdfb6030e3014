"""Quant twins of attention modules whose matmuls are plain function calls.

Many attention modules compute ``q @ k^T`` and ``attn @ v`` with ``torch.matmul``,
``Tensor.matmul``, ``bmm``/``baddbmm``, ``torch.einsum`` or
``F.scaled_dot_product_attention`` inside their ``forward`` (Hugging Face eager and SDPA
attention, torchvision Swin and MaxViT), and some project with ``F.linear`` on their own
Linear's weight (Swin's ``qkv``). Swapping modules never reaches those calls. A twin
keeps the float module's code and runs its ``forward`` under a
:class:`torch.overrides.TorchFunctionMode` that sends:

- the k-th matrix product to the k-th :class:`~qdq.nn.QuantMatMul` child (``qk``, ``av``):
  both operands quantized. ``einsum`` equations that are batched matrix products run as
  ``matmul`` (what TensorRT runs in INT8), and ``scaled_dot_product_attention`` runs as
  ``qk`` -> scale, mask -> softmax -> ``av`` (a row the mask hides throughout gives
  zeros, as torch's SDPA does, not NaN);
- ``F.linear(x, child.weight, b)`` through that child's quantizers, when the class
  declares ``linear_weights`` (the child Linear itself is never called).

With every quantizer disabled a twin computes what the float module computes, up to float
rounding (the explicit softmax path and matmul for einsum).

Classes are registered by their import path, so registering Hugging Face classes needs no
import of ``transformers``. Register more with :func:`register_attention`::

    register_attention("mypkg.layers.MyAttention", matmuls=("qk", "av"))

Hugging Face attention that dispatches through transformers' attention functions (its
``forward`` looks up ``ALL_ATTENTION_FUNCTIONS``: Llama, Mistral, Qwen, GPT-2, ViT, CLIP,
Whisper, T5 ... in transformers 5) needs no registration: such a class gets a twin whose
router only takes the products made inside the attention function (``eager_attention_forward``,
``sdpa_attention_forward``, any ``*attention_forward``, and GPT-2's upcast path), so other
matrix products of the forward (rotary tables, position biases) stay float. Only the
``eager`` and ``sdpa`` implementations are quantized; fused kernels (flash, flex) are
refused by name. Attention with its own code and no attention function (DeBERTa-v2's
disentangled attention) stays float.
"""

from __future__ import annotations

import fnmatch
import functools
import inspect
import math
import sys
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from qdq.descriptor import QuantDescriptor
from qdq.nn.functional import QuantMatMul
from qdq.nn.linear import QuantLinear
from qdq.nn.mixin import twin_shell

__all__ = ["AttentionSpec", "ATTENTION_TWINS", "HF_SPEC", "QuantAttentionMixin",
           "register_attention", "attention_spec_of", "attention_twin_of", "class_path",
           "dispatches_hf_attention", "sdpa_math"]


@dataclass(frozen=True)
class AttentionSpec:
    """How a module's functional calls are quantized.

    ``matmuls``: names of the QuantMatMul children, one per matrix product, in call order.
    ``linear_weights``: route ``F.linear`` calls on a child Linear's weight through that
    child's quantizers (for modules that never call their Linear children).
    ``scope``: function names (shell patterns) the products must be made in to be routed;
    empty: every product of the forward.
    """

    matmuls: tuple[str, ...] = ("qk", "av")
    linear_weights: bool = False
    scope: tuple[str, ...] = ()


#: where Hugging Face attention makes its two products: the attention functions of
#: ``ALL_ATTENTION_FUNCTIONS`` and the models' ``eager_attention_forward``, and GPT-2's
#: ``reorder_and_upcast_attn`` method
HF_SCOPE = ("*attention_forward", "_upcast_and_reordered_attn")
HF_SPEC = AttentionSpec(("qk", "av"), scope=HF_SCOPE)
#: the ``config._attn_implementation`` values whose products a twin can reach
HF_IMPLEMENTATIONS = (None, "eager", "sdpa")


#: "module.ClassName" of a float attention class -> how to quantize it
ATTENTION_TWINS: dict[str, AttentionSpec] = {}
_TWIN_CLASSES: dict[type, type] = {}


def class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_attention(target: type | str, matmuls: tuple[str, ...] = ("qk", "av"),
                       linear_weights: bool = False, scope: tuple[str, ...] = ()) -> None:
    """Quantize the attention class ``target`` (a class or its ``module.ClassName``);
    ``scope``: see :class:`AttentionSpec`."""
    key = target if isinstance(target, str) else class_path(target)
    if not matmuls:
        raise ValueError(f"{key}: an attention twin needs at least one matmul name")
    ATTENTION_TWINS[key] = AttentionSpec(tuple(matmuls), linear_weights, tuple(scope))


@functools.cache
def dispatches_hf_attention(cls: type) -> bool:
    """Whether ``cls.forward`` picks its attention function from transformers'
    ``ALL_ATTENTION_FUNCTIONS`` (read from the compiled code: no transformers import)."""
    forward = getattr(cls, "forward", None)
    if forward is None or cls.__module__.startswith("torch."):
        return False
    code = getattr(inspect.unwrap(forward), "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in (*code.co_names,
                                                              *code.co_freevars)


def attention_spec_of(cls: type) -> AttentionSpec | None:
    """How ``cls`` is quantized: its registration, or :data:`HF_SPEC` for Hugging Face
    attention that dispatches through the attention functions; None otherwise."""
    spec = ATTENTION_TWINS.get(class_path(cls))
    if spec is None and dispatches_hf_attention(cls):
        spec = HF_SPEC
    return spec


def attention_twin_of(cls: type) -> type | None:
    """The quant twin class of the attention class ``cls``, or None if it has none."""
    if issubclass(cls, QuantAttentionMixin):
        return None
    spec = attention_spec_of(cls)
    if spec is None:
        return None
    twin = _TWIN_CLASSES.get(cls)
    if twin is None:
        name = "Quant" + cls.__name__
        twin = type(name, (QuantAttentionMixin, cls), {"_spec": spec, "_float_cls": cls,
                                                         "__qualname__": name})
        _TWIN_CLASSES[cls] = twin
    return twin


class QuantAttentionMixin:
    """Runs the float class's ``forward`` with its matmuls (and linears) quantized."""

    _spec: AttentionSpec
    _float_cls: type
    default_quant_desc_input = QuantDescriptor(num_bits=8, calib_method="max")

    @classmethod
    def from_float(cls, module: nn.Module, quant_desc_input: QuantDescriptor | None = None,
                   **_weight_desc) -> nn.Module:
        """The twin of ``module``, sharing its parameters; adds one QuantMatMul per matmul."""
        if cls._spec.scope:
            impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
            if impl not in HF_IMPLEMENTATIONS:
                raise ValueError(
                    f"{type(module).__name__} runs attn_implementation={impl!r}, a fused "
                    "kernel whose matrix products cannot be quantized; load the model with "
                    "attn_implementation='sdpa' or 'eager'")
        twin = twin_shell(cls, module)
        for name in cls._spec.matmuls:
            if hasattr(module, name):
                raise ValueError(f"{type(module).__name__} already has an attribute {name!r}; "
                                 "register it with other matmul names")
            mm = QuantMatMul(quant_desc_input, quant_desc_input)
            mm._input_quantizer.placed_by = mm._other_quantizer.placed_by = "attention"
            twin.add_module(name, mm)
        return twin

    def forward(self, *args, **kwargs):
        with _CallRouter(self):
            return super().forward(*args, **kwargs)


# ------------------------------------------------------------------------ the router
_MATMULS = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__,
                      torch.bmm, torch.Tensor.bmm})
_BADDBMM = frozenset({torch.baddbmm, torch.Tensor.baddbmm})
_PRODUCTS = _MATMULS | _BADDBMM | {torch.einsum, F.scaled_dot_product_attention}
_FORWARD_CODE = QuantAttentionMixin.forward.__code__
_active = threading.local()  # the routers running in this thread, innermost last


@functools.cache
def _matches(name: str, scope: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in scope)


class _CallRouter(TorchFunctionMode):
    """Sends the owner's matrix products (and linears on its weights) to quant modules.

    Only the innermost router acts: a twin nested in another twin routes its own calls.
    """

    def __init__(self, owner: QuantAttentionMixin) -> None:
        super().__init__()
        self.owner = owner
        self.count = 0
        self.scope = owner._spec.scope
        self.linears = {}
        if owner._spec.linear_weights:
            self.linears = {id(child.weight): child for child in owner.children()
                            if isinstance(child, QuantLinear)}

    def __enter__(self):
        stack = getattr(_active, "stack", None)
        if stack is None:
            stack = _active.stack = []
        stack.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _active.stack.pop()
        return super().__exit__(*exc)

    def _in_scope(self) -> bool:
        """Whether the current call is made inside a scope function of the owner's forward
        (the frames between here and the owner's ``forward``)."""
        if not self.scope:
            return True
        frame = sys._getframe(2)
        while frame is not None and frame.f_code is not _FORWARD_CODE:
            if _matches(frame.f_code.co_name, self.scope):
                return True
            frame = frame.f_back
        return False

    def _next(self) -> QuantMatMul:
        names = self.owner._spec.matmuls
        if self.count >= len(names):
            raise RuntimeError(f"{type(self.owner).__name__}: matrix product number "
                               f"{self.count + 1}, but only {len(names)} are registered "
                               f"({', '.join(names)}); register the class with more names")
        self.count += 1
        return getattr(self.owner, names[self.count - 1])

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _PRODUCTS and (_active.stack[-1] is not self or not self._in_scope()):
            return func(*args, **kwargs)
        if func in _MATMULS and not kwargs and len(args) == 2:
            return self._next()(*args)
        if func in _BADDBMM:
            return self._baddbmm(*args, **kwargs)
        if func is torch.einsum:
            return self._einsum(args, kwargs)
        if func is F.scaled_dot_product_attention:
            return self._sdpa(*args, **kwargs)
        if func is F.linear and self.linears:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            child = self.linears.get(id(weight))
            if child is not None:
                x = args[0] if args else kwargs["input"]
                bias = args[2] if len(args) > 2 else kwargs.get("bias")
                return F.linear(child.quantize_input(x), child._weight_quantizer(weight), bias)
        return func(*args, **kwargs)

    def _baddbmm(self, input, batch1, batch2, *, beta=1, alpha=1):
        """``beta * input + alpha * (batch1 @ batch2)``, the product quantized (GPT-2's
        upcast attention: ``beta=0`` ignores ``input``, as torch does)."""
        out = self._next()(batch1, batch2)
        out = out if alpha == 1 else out * alpha
        return out if beta == 0 else out + (input if beta == 1 else input * beta)

    def _einsum(self, args, kwargs):
        equation, *operands = args
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = list(operands[0])
        plan = einsum_as_matmul(equation) if len(operands) == 2 and not kwargs else None
        if plan is None:
            return torch.einsum(*args, **kwargs)
        a, b = operands
        ta, tb = plan
        return self._next()(a.transpose(-1, -2) if ta else a, b.transpose(-1, -2) if tb else b)

    def _sdpa(self, *args, **kwargs):
        return sdpa_math(*args, **kwargs, qk=lambda a, b: self._next()(a, b),
                         av=lambda a, b: self._next()(a, b))


def sdpa_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False, *, qk=torch.matmul, av=torch.matmul) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` spelled out: ``qk`` -> scale, mask -> softmax ->
    ``av`` (the two products are the twins' QuantMatMul children, or ``torch.matmul``).
    A row the mask hides throughout gives zeros, as torch's SDPA does, not NaN."""
    if enable_gqa and key.size(-3) != query.size(-3):
        repeat = query.size(-3) // key.size(-3)
        key = key.repeat_interleave(repeat, -3)
        value = value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.size(-1)) if scale is None else scale
    scores = qk(query, key.transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(query.size(-2), key.size(-2), dtype=torch.bool,
                          device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = (scores.masked_fill(~attn_mask, float("-inf"))
                  if attn_mask.dtype == torch.bool else scores + attn_mask)
    attn = torch.softmax(scores, dim=-1)
    if attn_mask is not None:
        masked = scores.amax(dim=-1, keepdim=True) == float("-inf")
        attn = torch.where(masked, torch.zeros_like(attn), attn)
    if dropout_p > 0:
        attn = F.dropout(attn, dropout_p, training=True)
    return av(attn, value)


def einsum_as_matmul(equation: str) -> tuple[bool, bool] | None:
    """``(transpose a, transpose b)`` when ``equation`` is a batched matrix product.

    ``"bhid,bhjd->bhij"`` (q @ k^T) gives ``(False, True)``; ``"bhij,bhjd->bhid"``
    (attn @ v) gives ``(False, False)``. Anything else (broadcasting, ellipses, sums over
    batch letters, reordered batch letters) gives None.
    """
    eq = equation.replace(" ", "")
    if "->" not in eq or "." in eq:
        return None
    inputs, out = eq.split("->")
    parts = inputs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if min(len(a), len(b), len(out)) < 2 or not (len(a) == len(b) == len(out)):
        return None
    batch = out[:-2]
    if a[:-2] != batch or b[:-2] != batch or len(set(a)) != len(a) or len(set(b)) != len(b):
        return None
    i, j = out[-2], out[-1]
    shared = set(a[-2:]) & set(b[-2:])
    if len(shared) != 1:
        return None
    k = shared.pop()
    if set(a[-2:]) != {i, k} or set(b[-2:]) != {k, j} or k in out:
        return None
    return a[-2:] == k + i, b[-2:] == j + k


# --------------------------------------------------------------------- registrations
_HF_SELF_ATTENTION = {
    "bert": ("BertSelfAttention", "BertCrossAttention"),
    "roberta": ("RobertaSelfAttention", "RobertaCrossAttention"),
    "xlm_roberta": ("XLMRobertaSelfAttention", "XLMRobertaCrossAttention"),
    "camembert": ("CamembertSelfAttention", "CamembertCrossAttention"),
    "electra": ("ElectraSelfAttention", "ElectraCrossAttention"),
    "ernie": ("ErnieSelfAttention", "ErnieCrossAttention"),
    "distilbert": ("DistilBertSelfAttention",),
    "albert": ("AlbertAttention",),
}
for _model, _classes in _HF_SELF_ATTENTION.items():
    for _cls in _classes:
        register_attention(f"transformers.models.{_model}.modeling_{_model}.{_cls}")

_TV = "torchvision.models"
register_attention(f"{_TV}.swin_transformer.ShiftedWindowAttention", linear_weights=True)
register_attention(f"{_TV}.swin_transformer.ShiftedWindowAttentionV2", linear_weights=True)
register_attention(f"{_TV}.maxvit.RelativePositionalMultiHeadAttention")
