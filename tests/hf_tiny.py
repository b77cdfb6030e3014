"""Tiny random Hugging Face decoders (nothing is downloaded), shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


def tiny_llama(impl: str = "sdpa") -> nn.Module:
    """Llama with grouped-query attention: 4 query heads, 2 key/value heads."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=64,
                                      vocab_size=100, attn_implementation=impl)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_gpt2(impl: str = "sdpa", **extra) -> nn.Module:
    """GPT-2: Conv1D layers, the LM head tied to the token embedding."""
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=100,
                                     bos_token_id=0, eos_token_id=0, attn_implementation=impl,
                                     **extra)
    return transformers.GPT2LMHeadModel(config).eval()
