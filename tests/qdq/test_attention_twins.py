"""Attention twins: matmuls and functional linears quantized, float function unchanged.

Parametrised over the registered attention classes that import here (Hugging Face
BERT-family with tiny random configs, torchvision Swin V1/V2 and MaxViT modules).
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from torch import nn

import qdq
import sensitivity
from qdq.nn import ATTENTION_TWINS, QuantAttentionMixin, QuantMatMul, attention_twin_of
from qdq.nn.attention import einsum_as_matmul
from qdq.rules import apply_rules, attention_matmuls


def _hf_case(path: str):
    """A tiny model containing the HF attention class at ``path``, and its inputs."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                       "(pip install 'qdq[hf]')")
    module_name, cls_name = path.rsplit(".", 1)
    family = module_name.split(".")[2]
    config_cls = {"bert": "BertConfig", "roberta": "RobertaConfig",
                  "xlm_roberta": "XLMRobertaConfig", "camembert": "CamembertConfig",
                  "electra": "ElectraConfig", "ernie": "ErnieConfig",
                  "distilbert": "DistilBertConfig", "albert": "AlbertConfig"}[family]
    kwargs = dict(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                  intermediate_size=32, max_position_embeddings=32)
    if family == "distilbert":
        kwargs = dict(vocab_size=50, dim=16, n_layers=1, n_heads=2, hidden_dim=32,
                      max_position_embeddings=32)
    if family == "albert":
        kwargs["embedding_size"] = 8
    if "Cross" in cls_name:
        kwargs.update(is_decoder=True, add_cross_attention=True)
    config = getattr(transformers, config_cls)(**kwargs)
    auto = getattr(transformers, config_cls.replace("Config", "Model"))
    torch.manual_seed(0)
    model = auto._from_config(config, attn_implementation="eager").eval()
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if "Cross" in cls_name:
        inputs["encoder_hidden_states"] = torch.randn(2, 5, 16)
    return model, inputs


def _torchvision_case(path: str):
    from torchvision.models import maxvit, swin_transformer

    torch.manual_seed(0)
    name = path.rsplit(".", 1)[1]
    if name == "RelativePositionalMultiHeadAttention":
        module = maxvit.RelativePositionalMultiHeadAttention(16, 8, 16)
        x = torch.randn(2, 3, 16, 16)
    else:
        cls = getattr(swin_transformer, name)
        module = cls(16, [4, 4], [2, 2], num_heads=2)
        x = torch.randn(2, 8, 8, 16)
    return nn.Sequential(module).eval(), (x,)


def _case(path: str):
    if path.startswith("transformers."):
        return _hf_case(path)
    return _torchvision_case(path)


def _run(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else (
        out.last_hidden_state if hasattr(out, "last_hidden_state") else out)


@pytest.mark.parametrize("path", sorted(ATTENTION_TWINS))
def test_twin_is_float_exact_and_every_quantizer_sees_data(path):
    model, inputs = _case(path)
    if not any(isinstance(m, _load(path)) for m in model.modules()):
        pytest.skip(f"{path} is not used by this tiny configuration")
    reference = _run(model, inputs)
    quantized = copy.deepcopy(model)
    qdq.replace_modules(quantized)
    twins = [m for m in quantized.modules() if isinstance(m, QuantAttentionMixin)]
    assert twins and all(isinstance(getattr(t, n), QuantMatMul)
                         for t in twins for n in t._spec.matmuls)
    with qdq.disable_quantization(quantized):
        torch.testing.assert_close(_run(quantized, inputs), reference, rtol=1e-5, atol=1e-6)
    summary = sensitivity.calibrate(quantized, [inputs], progress=False)
    assert summary.uncalibrated == []  # every quantizer, matmul and linear, saw data
    assert len(attention_matmuls(quantized)) == 2 * len(twins)
    quantized_out = _run(quantized, inputs)
    assert not torch.equal(quantized_out, reference)  # the quantizers act
    assert (quantized_out - reference).abs().max() < 0.5 * reference.abs().max()


def _load(path: str) -> type:
    module_name, cls_name = path.rsplit(".", 1)
    return getattr(importlib.import_module(module_name), cls_name)


def test_sdpa_attention_is_spelled_out_with_quantized_matmuls():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    torch.manual_seed(0)
    model = transformers.BertModel._from_config(config, attn_implementation="sdpa").eval()
    ids = torch.randint(3, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, 3:] = 0
    reference = _run(model, {"input_ids": ids, "attention_mask": mask})
    qdq.replace_modules(model)
    calls = []
    for _, mm in attention_matmuls(model):
        mm.register_forward_hook(lambda *a: calls.append(1))
    with qdq.disable_quantization(model):
        out = _run(model, {"input_ids": ids, "attention_mask": mask})
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)
    assert len(calls) == 2  # q @ k^T and attn @ v went through the quant matmuls


def test_twin_registry_by_path_and_errors():
    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

        def forward(self, x):
            a = torch.matmul(x, x.transpose(-1, -2))
            return self.proj(a @ x) + x.bmm(x.transpose(-1, -2)) @ x

    assert attention_twin_of(Toy) is None
    qdq.nn.register_attention(Toy, matmuls=("qk", "av"))
    try:
        twin_cls = attention_twin_of(Toy)
        assert twin_cls is attention_twin_of(Toy) and attention_twin_of(twin_cls) is None
        model = nn.Sequential(Toy())
        qdq.replace_modules(model)
        with pytest.raises(RuntimeError, match="matrix product number 3"), \
                qdq.disable_quantization(model):
            model(torch.randn(2, 3, 4))
    finally:
        del ATTENTION_TWINS[f"{Toy.__module__}.{Toy.__qualname__}"]


@pytest.mark.parametrize("equation,plan", [
    ("bhid,bhjd->bhij", (False, True)),
    ("bhij,bhjd->bhid", (False, False)),
    ("B G H I D, B G H J D -> B G H I J", (False, True)),
    ("bki,bkj->bij", (True, False)),
    ("ij,jk->ik", (False, False)),
    ("bhid,bhjd->bhji", None),      # output transposed
    ("bhid,hjd->bhij", None),       # broadcasting over a missing batch letter
    ("...id,...jd->...ij", None),   # ellipsis
    ("bid,bid->bi", None),          # not a matrix product
])
def test_einsum_as_matmul(equation, plan):
    assert einsum_as_matmul(equation) == plan
    if plan is not None:
        letters = {c for c in equation if c.isalpha()}
        sizes = {c: 2 + i for i, c in enumerate(sorted(letters))}
        a_spec, b_spec = equation.replace(" ", "").split("->")[0].split(",")
        a = torch.randn([sizes[c] for c in a_spec])
        b = torch.randn([sizes[c] for c in b_spec])
        got = torch.matmul(a.transpose(-1, -2) if plan[0] else a,
                           b.transpose(-1, -2) if plan[1] else b)
        torch.testing.assert_close(got, torch.einsum(equation, a, b))


def test_rules_on_a_model_built_with_initialize_swap_attention():
    from torchvision.models import swin_transformer

    with qdq.quant_modules.initialize():
        model = nn.Sequential(swin_transformer.ShiftedWindowAttention(16, [4, 4], [2, 2], 2))
    model.eval()
    x = torch.randn(1, 8, 8, 16)
    ruled = apply_rules(model, x)
    assert ruled.qdq_rules_report.changes["attention"] == 1
    assert len(attention_matmuls(ruled)) == 2
    summary = sensitivity.calibrate(ruled, [x], progress=False)
    assert summary.uncalibrated == []
    rows = {(r.module, r.role): r for r in qdq.summary_rows(ruled)}
    assert rows[("0.qkv", "input")].state == "quant"  # F.linear on qkv.weight is quantized
    assert rows[("0.qk", "other")].placed_by == "attention"
    assert "attention matmuls (q @ k^T, attn @ v): 2, 4 of 4 operands quantized" in \
        qdq.summary(ruled)
