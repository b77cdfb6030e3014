"""Hugging Face attention that dispatches through transformers' attention functions gets a
twin with no registration (Llama with GQA, GPT-2, ViT, CLIP, Whisper, T5; eager and SDPA),
and GPT-2's ``Conv1D`` a quant twin: every product quantized, the float function kept."""

from __future__ import annotations

import copy
import types

import pytest
import torch
from torch import nn

import qdq
from qdq import quant_modules
from qdq.descriptor import QuantDescriptor
from qdq.nn import QuantAttentionMixin, QuantConv1D, QuantLinear, attention_twin_of
from qdq.rules import attention_matmuls
from tests.hf_tiny import tiny_gpt2, tiny_llama

transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                   "(pip install 'qdq[hf]')")


def padded(rng, n: int = 3, length: int = 7) -> dict[str, torch.Tensor]:
    """Left padding, right padding and a row padded throughout."""
    ids = torch.randint(0, 100, (n, length), generator=rng)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[1, -2:] = 0
    mask[-1] = 0
    return {"input_ids": ids, "attention_mask": mask}


def product_calls(model: nn.Module, inputs: dict) -> dict[str, int]:
    """How often each attention QuantMatMul ran on one forward pass."""
    calls = {name: 0 for name, _ in attention_matmuls(model)}
    hooks = [mm.register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
             for name, mm in attention_matmuls(model)]
    try:
        with torch.no_grad(), qdq.disable_quantization(model):
            model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return calls


def assert_float_kept(model: nn.Module, reference: nn.Module, inputs: dict) -> None:
    with torch.no_grad(), qdq.disable_quantization(model):
        got = model(**inputs)
        want = reference(**inputs)
    key = "logits" if "logits" in want else "last_hidden_state"
    assert not torch.isnan(got[key]).any()
    torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_llama_every_linear_and_both_matmuls_quantized(impl, rng):
    model = tiny_llama(impl)
    reference = copy.deepcopy(model)
    qdq.replace_modules(model)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(model.get_submodule(n), QuantLinear) for n in linears)
    attention = [m for m in model.modules() if isinstance(m, QuantAttentionMixin)]
    assert len(attention) == 2 and all(m.config._attn_implementation == impl for m in attention)
    names = [name for name, _ in attention_matmuls(model)]
    assert names == [f"model.layers.{i}.self_attn.{mm}" for i in (0, 1) for mm in ("qk", "av")]
    # masked rows (a sequence padded throughout included) give the float model's values;
    # without a mask SDPA runs is_causal=True; GQA repeats 2 key/value heads for 4 queries
    for inputs in (padded(rng), {"input_ids": padded(rng)["input_ids"]}):
        assert_float_kept(model, reference, inputs)
        assert set(product_calls(model, inputs).values()) == {1}


def test_products_outside_the_attention_function_stay_float(rng):
    """Only the attention function's two products are routed: a position-bias matmul in
    the same forward stays float and is no third product."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    class BiasedAttention(nn.Module):
        def __init__(self, impl: str):
            super().__init__()
            self.config = types.SimpleNamespace(_attn_implementation=impl)
            self.qkv = nn.Linear(8, 24)
            self.pos = nn.Parameter(torch.randn(5, 4))
            self.is_causal = False

        def forward(self, x):
            q, k, v = self.qkv(x).view(x.shape[0], 5, 3, 2, 4).permute(2, 0, 3, 1, 4)
            bias = torch.matmul(self.pos, self.pos.t())  # outside the attention function
            attend = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                           sdpa_attention_forward)
            out, _ = attend(self, q, k, v, bias, scaling=0.5)
            return out.reshape(x.shape[0], 5, 8)

    model = nn.Sequential(BiasedAttention("sdpa")).eval()
    reference = copy.deepcopy(model)
    qdq.replace_modules(model)
    assert isinstance(model[0], QuantAttentionMixin)
    x = torch.randn(2, 5, 8, generator=rng)
    with torch.no_grad(), qdq.disable_quantization(model):
        torch.testing.assert_close(model(x), reference(x), rtol=1e-5, atol=1e-6)
    calls = {"qk": 0, "av": 0}
    for name in calls:
        getattr(model[0], name).register_forward_hook(
            lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
    with torch.no_grad(), qdq.disable_quantization(model):
        model(x)
    assert calls == {"qk": 1, "av": 1}

    fused = nn.Sequential(BiasedAttention("flash_attention_2"))
    with pytest.raises(ValueError, match="flash_attention_2.*'sdpa' or 'eager'"):
        qdq.replace_modules(fused)


def _vit():
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                    intermediate_size=32, image_size=8, patch_size=4)
    return transformers.ViTModel(config), {"pixel_values": torch.randn(2, 3, 8, 8)}


def _clip():
    config = transformers.CLIPTextConfig(hidden_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, intermediate_size=32,
                                         vocab_size=50, max_position_embeddings=16)
    ids = torch.randint(0, 50, (2, 6))
    return transformers.CLIPTextModel(config), {"input_ids": ids,
                                                "attention_mask": torch.ones_like(ids)}


def _whisper():
    config = transformers.WhisperConfig(
        d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=4,
        max_source_positions=4, max_target_positions=8, vocab_size=50, use_cache=False,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    return transformers.WhisperModel(config), {
        "input_features": torch.randn(2, 4, 8), "decoder_input_ids": torch.randint(0, 50, (2, 3))}


def _t5():
    config = transformers.T5Config(d_model=16, d_kv=4, num_heads=2, num_layers=1, d_ff=32,
                                   vocab_size=50, use_cache=False)
    return transformers.T5Model(config), {"input_ids": torch.randint(0, 50, (2, 5)),
                                          "decoder_input_ids": torch.randint(0, 50, (2, 3))}


def _decoder(name: str):
    def make():
        config = getattr(transformers, f"{name}Config")(
            hidden_size=16, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=32, vocab_size=50, use_cache=False)
        ids = torch.randint(0, 50, (2, 6))
        mask = torch.ones_like(ids)
        mask[0, :2] = 0
        return getattr(transformers, f"{name}Model")(config), {"input_ids": ids,
                                                              "attention_mask": mask}
    return make


FAMILIES = {"vit": _vit, "clip": _clip, "whisper": _whisper, "t5": _t5,
            "mistral": _decoder("Mistral"), "qwen2": _decoder("Qwen2")}


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("make", FAMILIES.values(), ids=FAMILIES.keys())
def test_other_families_get_twins_without_registration(make, impl):
    torch.manual_seed(0)
    model, inputs = make()
    model.config._attn_implementation = impl
    model.eval()
    if make is _t5:
        import inspect

        from transformers.models.t5 import modeling_t5
        if "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(modeling_t5):
            pytest.skip("this transformers' T5 has its own attention code, not transformers' "
                        "attention functions (they came to T5 in a later 5.x release)")
    reference = copy.deepcopy(model)
    qdq.replace_modules(model)
    twins = [m for m in model.modules() if isinstance(m, QuantAttentionMixin)]
    assert twins
    assert_float_kept(model, reference, inputs)
    calls = product_calls(model, inputs)
    assert len(calls) == 2 * len(twins) and set(calls.values()) == {1}


def test_attention_with_its_own_code_stays_float():
    """DeBERTa-v2's disentangled attention calls no attention function: no twin."""
    from transformers.models.deberta_v2 import modeling_deberta_v2

    assert attention_twin_of(modeling_deberta_v2.DisentangledSelfAttention) is None
    assert attention_twin_of(transformers.models.llama.modeling_llama.LlamaDecoderLayer) is None


@pytest.mark.parametrize("reorder", [False, True])
def test_gpt2_conv1d_and_attention(reorder, rng):
    """Conv1D: weight per output channel (axis 1 of its [in, out] weight), even from a
    descriptor that says axis 0; the upcast attention path (baddbmm) is routed too."""
    model = tiny_gpt2("eager", reorder_and_upcast_attn=reorder)
    reference = copy.deepcopy(model)
    qdq.replace_modules(model, quant_desc_weight=QuantDescriptor(num_bits=8, axis=0))
    conv1d = [m for m in model.modules() if isinstance(m, QuantConv1D)]
    assert len(conv1d) == 8 and all(m._weight_quantizer.axis in (1, (1,)) for m in conv1d)
    assert {n for n, _ in model.named_parameters()} == {n for n, _ in
                                                         reference.named_parameters()}
    inputs = padded(rng)
    assert_float_kept(model, reference, inputs)
    assert set(product_calls(model, inputs).values()) == {1}
    for _, q in qdq.quantizers(model):
        q.disable_quant()
        q.enable_calib()
    with torch.no_grad():
        model(**inputs)
    for _, q in qdq.quantizers(model):
        q.load_calib_amax()
        q.enable_quant()
        q.disable_calib()
    layer = model.transformer.h[0].attn.c_attn
    assert layer._weight_quantizer.amax.shape == (1, 96)
    torch.testing.assert_close(layer._weight_quantizer.amax.flatten(),
                               layer.weight.detach().abs().amax(0))


def test_quant_modules_builds_quant_conv1d():
    with quant_modules.initialize():
        model = tiny_gpt2()
    assert sum(isinstance(m, QuantConv1D) for m in model.modules()) == 8
    assert not any(isinstance(m, QuantConv1D) for m in tiny_gpt2().modules())
    with quant_modules.initialize(float_module_list=["Conv1D"]):
        model = tiny_gpt2()
    assert not any(isinstance(m, QuantConv1D) for m in model.modules())
