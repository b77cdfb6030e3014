"""``qdq verify`` and ``qdq run``'s ONNX Runtime check: one function, one verdict.

A tiny random BERT (tests.qdqapp.models) in FP8 with SmoothQuant goes through ``qdq run``;
``qdq verify`` on the run's own files must print the very text the run wrote to
``onnx_check.txt`` (same batch, same function), and keep its verdict on other batches and
batch sizes. Text encoders are scored by the cosine of mean-pooled embeddings (checked
against qdqapp.hf's pooling on both runtimes' outputs), not by top-1 of ``pooler_output``.
NaN weights in a quantized-model file are one error line naming the weight.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.qdqapp.cli import qdq
from tests.qdqapp.models import save_tiny_bert, write_sentences

pytest.importorskip("transformers", reason="transformers not installed (pip install 'qdq[hf]')")

FAST = ["--batch-size", "8", "--calib-batches", "2"]


@pytest.fixture(scope="module")
def fp8_run(tmp_path_factory):
    """A finished ``qdq run`` of the tiny BERT in FP8 with SmoothQuant (no sweep)."""
    root = tmp_path_factory.mktemp("verify_cli")
    save_tiny_bert(root / "bert")
    (root / "text").mkdir()
    write_sentences(root / "text" / "calib.txt", 16, seed=1)
    write_sentences(root / "text" / "test.txt", 8, seed=2)
    write_sentences(root / "other.txt", 24, seed=7)
    out = root / "run"
    result = qdq("run", "--model", f"hf:{root / 'bert'}", "--data", f"text:{root / 'text'}",
                 "--format", "fp8", "--smoothquant", "--calibrator", "max", "--sweep", "none",
                 "--out", out, "--quiet", *FAST)
    assert result.code == 0, result.err[-3000:]
    return root, out


def _verify(root, out, data, *extra):
    return qdq("verify", f"hf:{root / 'bert'}", out / "model.onnx", "--checkpoint",
               out / "quantized.pt", "--data", data, "--quiet", *extra)


def test_verify_prints_what_the_run_checked(fp8_run):
    root, out = fp8_run
    result = _verify(root, out, f"text:{root / 'text'}", *FAST)
    assert result.code == 0, result.out + result.err[-3000:]
    check = json.loads((out / "onnx_check.json").read_text())
    written = (out / "onnx_check.txt").read_text()
    assert check["ok"] and result.out == written  # the same batch through the same function
    assert check["verdict"] == written.rstrip().splitlines()[-1]
    assert check["verdict"].startswith("OK: same function")
    # a text encoder: embedding cosine, no top-1 of pooler_output
    assert check["top1_agreement"] is None
    assert 0.99 < check["embedding_cosine"]["min"] <= check["embedding_cosine"]["mean"] <= 1
    assert "cosine of mean-pooled embeddings min" in result.out
    assert "top-1" not in result.out


@pytest.mark.parametrize("data, rows", [("other", "3"), ("other", "24"), ("text", "5")])
def test_the_verdict_holds_on_other_batches(fp8_run, data, rows):
    root, out = fp8_run
    spec = f"text:{root / 'other.txt'}" if data == "other" else f"text:{root / 'text'}"
    result = _verify(root, out, spec, "--batch-size", "24", "--batch", rows)
    assert result.code == 0, result.out + result.err[-3000:]
    assert result.out.rstrip().endswith("OK: same function up to rounding-boundary flips "
                                        "(float noise)")
    assert f"inputs [[{rows}, " in result.out


def test_embedding_cosine_is_the_pooled_sentence_cosine(fp8_run):
    """The report's cosine against qdqapp.hf's own pooling of both runtimes' outputs."""
    import qdq as qdq_lib
    from export import verify
    from export.verify import ort_session
    from qdqapp.hf import (
        load_model,
        load_tokenizer,
        onnx_sentence_outputs,
        read_sentences,
        sentence_outputs,
        text_batches,
    )

    root, out = fp8_run
    model = qdq_lib.restore(load_model(root / "bert"), out / "quantized.pt").eval()
    batch = text_batches(load_tokenizer(root / "bert"), read_sentences(root / "other.txt"),
                         24)[0]
    report = verify(model, out / "model.onnx", batch)
    ort_rows = onnx_sentence_outputs(ort_session(out / "model.onnx"), [batch])
    torch_rows = sentence_outputs(model, [batch])
    cos = torch.nn.functional.cosine_similarity(ort_rows.double(), torch_rows.double(), dim=1)
    assert report.cosine == pytest.approx(float(cos.min()), abs=1e-6)
    assert report.cosine_mean == pytest.approx(float(cos.mean()), abs=1e-6)
    assert report.top1 is None
    assert report.ok()


def test_nan_weights_in_the_file_are_one_error(fp8_run, tmp_path):
    root, out = fp8_run
    blob = torch.load(out / "quantized.pt", weights_only=True)
    key = next(k for k in blob["state_dict"] if k.endswith("intermediate.dense.weight"))
    blob["state_dict"][key][0, 0] = float("nan")
    torch.save(blob, tmp_path / "nan.pt")
    result = qdq("verify", f"hf:{root / 'bert'}", out / "model.onnx", "--checkpoint",
                 tmp_path / "nan.pt", "--data", f"text:{root / 'text'}", "--quiet", *FAST)
    assert result.code == 2, result.out + result.err
    assert len(result.error_lines) == 1, result.err
    line = result.error_lines[0]
    assert line.startswith("qdq: error: ") and "NaN/Inf" in line, line
    assert "intermediate.dense.weight" in line, line
    assert "cannot convert" not in result.err
