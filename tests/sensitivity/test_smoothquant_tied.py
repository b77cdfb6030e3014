"""SmoothQuant on a language model whose LM head shares the token embedding's weight: the
head is skipped with the reason (scaling it would change the embedding), the other layers
are smoothed, and a model where nothing can be smoothed gets every reason in one error."""

from __future__ import annotations

import pytest
import torch

import qdq
import sensitivity

pytest.importorskip("transformers")


IDS = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


def test_a_tied_lm_head_is_skipped_with_the_reason():
    import transformers

    from tests.hf_tiny import tiny_llama

    model = tiny_llama("eager")
    config = model.config
    config.tie_word_embeddings = True
    model = transformers.LlamaForCausalLM(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    qdq.replace_modules(model)
    with torch.no_grad(), qdq.disable_quantization(model):
        before = model(input_ids=IDS).logits
    report = sensitivity.smoothquant(model, [{"input_ids": IDS}], progress=False)
    assert any(s.startswith("lm_head (its weight is tied") for s in report.skipped), report
    assert report.smoothed  # the decoder layers' projections
    with torch.no_grad(), qdq.disable_quantization(model):
        assert torch.allclose(model(input_ids=IDS).logits, before, atol=1e-4)


def test_nothing_to_smooth_names_every_reason():
    from tests.hf_tiny import tiny_gpt2

    model = tiny_gpt2("eager")
    qdq.replace_modules(model)
    with pytest.raises(sensitivity.SensitivityError,
                       match=r"no quantized Linear can be smoothed: .*Conv1D.*lm_head \(its "
                             r"weight is tied"):
        sensitivity.smoothquant(model, [{"input_ids": IDS}], progress=False)
