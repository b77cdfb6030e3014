"""Causal LMs behind ``hf:DIR``: loaded as causal LMs (no pad token needed), scored by
next-token agreement with FP32, exported without the KV cache and run in ONNX Runtime;
``qdq run`` end to end on a tiny Llama folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

import qdq
import sensitivity
from export import to_onnx
from export.verify import ort_session
from qdqapp.hf import (
    TextAgreement,
    has_classification_head,
    is_causal_lm,
    load_text_model,
    onnx_sentence_outputs,
    read_sentences,
    sentence_outputs,
    text_batches,
)
from tests.hf_tiny import tiny_llama
from tests.qdqapp.cli import qdq as qdq_cli
from tests.qdqapp.models import SPECIAL, WORDS, write_sentences

transformers = pytest.importorskip("transformers", reason="transformers not installed "
                                   "(pip install 'qdq[hf]')")
pytestmark = pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")


def save_tiny_llama(folder):
    """A random Llama folder with a word-level tokenizer that has no pad token (as
    decoders ship theirs)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate([*SPECIAL, *WORDS])}
    model = tiny_llama("eager")
    model.resize_token_embeddings(len(vocab))
    model.config.architectures = ["LlamaForCausalLM"]
    model.save_pretrained(folder)
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]",
                                         eos_token="[SEP]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    save_tiny_llama(root / "llama")
    (root / "text").mkdir()
    write_sentences(root / "text" / "calib.txt", 16, seed=1)
    write_sentences(root / "text" / "test.txt", 12, seed=2)
    return root


def test_next_token_agreement_and_onnx_runtime(llama, tmp_path):
    folder = llama / "llama"
    assert is_causal_lm(folder) and has_classification_head(folder)
    text = load_text_model(folder)
    assert type(text.model).__name__ == "LlamaForCausalLM"
    assert text.tokenizer.pad_token == "[SEP]"  # the eos token pads
    batches = text_batches(text.tokenizer, read_sentences(llama / "text" / "test.txt"), 8)
    real_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    metric = TextAgreement(text.model, batches)
    assert metric.classifier and metric.metric == "top1" and metric.sentences == real_tokens
    assert metric.score(text.model).top1 == 1.0

    qdq.replace_modules(text.model)
    sensitivity.calibrate(text.model, text_batches(
        text.tokenizer, read_sentences(llama / "text" / "calib.txt"), 8), progress=False)
    score = metric.score(text.model)
    assert 0.5 < score.top1 <= 1.0 and 0.9 < score.min_cosine < 1.0

    path = tmp_path / "llama.onnx"
    result = to_onnx(text.model, batches[0], path)
    assert result.output_names == ["logits"] and result.opset == 13
    ort_rows = onnx_sentence_outputs(ort_session(path), batches)
    torch_rows = sentence_outputs(text.model, batches)
    assert ort_rows.shape == torch_rows.shape == (real_tokens, len(text.tokenizer))
    torch.testing.assert_close(ort_rows, torch_rows, rtol=1e-4, atol=1e-4)
    assert metric.score_rows(ort_rows).top1 == pytest.approx(score.top1, abs=0.02)


def test_run_end_to_end_on_a_tiny_llama(llama, tmp_path):
    out = tmp_path / "run"
    result = qdq_cli("run", "--model", f"hf:{llama / 'llama'}", "--data",
                     f"text:{llama / 'text'}", "--calibrator", "max", "--sweep", "none",
                     "--out", out, "--batch-size", "8", "--calib-batches", "2")
    assert result.code == 0, result.err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["metric"].startswith("top-1 agreement")
    assert summary["fp32_metric"] == pytest.approx(100.0)
    assert 50.0 < summary["int8_metric"] <= 100.0
    check = json.loads((out / "onnx_check.json").read_text())
    assert check["ok"], check


def test_perplexity_ratio_matches_the_models_own_loss(llama):
    """The ratio is exp(NLL_quantized - NLL_fp32) over every next token, as transformers'
    own shifted loss computes it (one batch, so its mean is over the same tokens)."""
    text = load_text_model(llama / "llama")
    sentences = read_sentences(llama / "text" / "test.txt")
    (batch,) = text_batches(text.tokenizer, sentences, len(sentences))
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    metric = TextAgreement(text.model, [batch])
    assert metric.score(text.model).perplexity_ratio == pytest.approx(1.0, abs=1e-12)
    with torch.no_grad():
        fp32_loss = float(text.model(**batch, labels=labels).loss)
    qdq.replace_modules(text.model)
    sensitivity.calibrate(text.model, [batch], progress=False)
    score = metric.score(text.model)
    with torch.no_grad():
        int8_loss = float(text.model(**batch, labels=labels).loss)
    assert score.perplexity_ratio == pytest.approx(math.exp(int8_loss - fp32_loss), rel=1e-4)
    assert score.perplexity_ratio != 1.0
    assert "perplexity" in str(score) and "perplexity_ratio" in score.as_dict()
