"""``qdq run`` end to end: the run folder, resuming, failed checks, logs, restarts."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from qdqapp.data import DEFAULT_ROOT
from tests.qdqapp.cli import listing, qdq, qdq_process

FAST = ["--batch-size", "64", "--calib-batches", "2", "--eval-batches", "3"]
TINY = ["--model", "tests.qdqapp.models:tiny_cnn", "--data", "random:2x3x16x16",
        "--calibrator", "max"]
needs_data = pytest.mark.skipif(not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason="dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    if not (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("dataset-fashion-mnist is not installed")
    out = tmp_path_factory.mktemp("runs") / "ref"
    result = qdq_process("run", "--out", out, "--calibrators", "max,percentile-99.99", *FAST)
    return out, result


def test_reference_run_writes_the_run_folder(reference_run):
    out, result = reference_run
    assert result.code == 0, result.err[-3000:]
    for name in ["report.md", "report.html", "summary.json", "model.onnx", "skip_layers.txt",
                 "run.log", "calibrators.png", "layers.png", "sensitivity/sensitivity.png",
                 "sensitivity/rows.jsonl", "state.json", "config.json", "quantized.pt"]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["failed_checks"] == []
    assert summary["metric"] == "top-1 accuracy (%)"
    assert 0 < summary["int8_metric"] <= 100 and 0 < summary["fp32_metric"] <= 100
    assert summary["final_metric"] >= summary["fp32_metric"] - 0.3 or summary["skip_layers"]
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "FP32 metric" in result.out and "ONNX Runtime check" in result.out
    assert "<table>" in (out / "report.html").read_text()
    files = json.loads((out / "state.json").read_text())["files"]
    assert "model.onnx" in files and "sensitivity/rows.jsonl" in files


def test_rerun_skips_finished_stages_and_resumes_a_cut_run(reference_run):
    out, _ = reference_run
    again = qdq("run", "--out", out, "--calibrators", "max,percentile-99.99", *FAST)
    assert again.code == 0, again.err[-3000:]
    assert "calibrate (compare calibrators, keep the best): done earlier" in again.err
    # a run cut off after the sweep: drop the later stages from the record
    state = json.loads((out / "state.json").read_text())
    before = json.loads(json.dumps(state["stages"]))
    check_before = (out / "onnx_check.json").read_text()
    for name in ["partial", "qat", "export", "lint", "onnx_check", "tensorrt"]:
        state["stages"].pop(name, None)
    (out / "state.json").write_text(json.dumps(state))
    resumed = qdq("run", "--out", out, "--calibrators", "max,percentile-99.99", *FAST)
    assert resumed.code == 0, resumed.err[-3000:]
    assert "per-layer sensitivity sweep: done earlier" in resumed.err
    assert f"resumed: restored {out / 'quantized.pt'}" in resumed.err
    after = json.loads((out / "state.json").read_text())["stages"]
    assert after["partial"]["result"]["skip_layers"] == before["partial"]["result"][
        "skip_layers"]
    # the same model and the same fixed batch: the same ONNX Runtime check, to the digit
    assert (out / "onnx_check.json").read_text() == check_before


def test_export_only_run_on_random_data_says_there_are_no_labels(tmp_path):
    out = tmp_path / "r"
    result = qdq("run", *TINY, "--out", out, "--quiet")
    assert result.code == 0, result.err[-3000:]
    state = json.loads((out / "state.json").read_text())["stages"]
    assert state["fp32"]["status"] == "skipped" and state["export"]["status"] == "done"
    assert state["lint"]["result"]["errors"] == 0
    assert "FP32 metric               skipped: no labelled data (random inputs)" in result.out
    report = (out / "report.md").read_text()
    assert "Evaluation: none, the data has no labels" in report and "top1" not in report
    assert json.loads((out / "summary.json").read_text())["metric"] is None


def test_a_failed_onnx_check_reads_failed_everywhere_and_exits_1(tmp_path):
    out = tmp_path / "r"
    result = qdq("run", "--model", "tests.qdqapp.models:exports_something_else", "--data",
                 "random:2x3x16x16", "--calibrator", "max", "--no-rules", "--out", out)
    assert result.code == 1, result.err[-3000:]
    assert result.error_lines[-1].startswith("qdq: error: FAILED: ONNX Runtime disagrees")
    assert "result                    FAILED: ONNX Runtime disagrees" in result.out
    assert "ONNX Runtime check        FAILED: rel L2" in result.out
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "FAILED" and summary["onnx_check"].startswith("FAILED")
    assert summary["failed_checks"][0].startswith("ONNX Runtime disagrees")
    assert "**FAILED**: ONNX Runtime disagrees" in (out / "report.md").read_text()
    assert "<strong>FAILED</strong>" in (out / "report.html").read_text()


def test_quiet_still_writes_the_full_log_and_restart_deletes_only_its_files(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = qdq("run", *TINY, "--out", out, "--quiet")
    assert result.code == 0, result.err[-3000:]
    assert "[1/11]" not in result.err  # quiet console
    log = (out / "run.log").read_text()
    assert "[1/11] FP32 baseline" in log and "[11/11]" in log and "ONNX Runtime check" in log
    (out / "extra").mkdir()
    (out / "extra" / "keep.txt").write_text("mine too")
    again = qdq("run", *TINY, "--out", out, "--restart", "--quiet")
    assert again.code == 0, again.err[-3000:]
    assert (out / "notes.txt").read_text() == "mine"
    assert (out / "extra" / "keep.txt").read_text() == "mine too"
    assert "[1/11] FP32 baseline" in (out / "run.log").read_text()
    assert "earlier" not in (out / "run.log").read_text()  # started over


@pytest.mark.slow
def test_image_folder_run_with_qat(tmp_path):
    """An ImageFolder of real PNG files with train/ and val/, as users keep their data,
    QAT included (one step on its training split)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = tmp_path / "images" / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                pixels = (rng.random((40, 48, 3)) * 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "r"
    result = qdq("run", "--model", "tests.qdqapp.models:tiny_cnn", "--data",
                 f"imagefolder:{tmp_path / 'images'}", "--out", out, "--calibrators",
                 "max", "--batch-size", "4", "--calib-batches", "1", "--image-size", "32",
                 "--qat-epochs", "1", "--qat-steps", "1", "--quiet")
    assert result.code == 0, result.err[-3000:]
    report = (out / "report.md").read_text()
    assert "(4 calibration / 4 eval images)" in report and "## QAT" in report
    qat = json.loads((out / "state.json").read_text())["stages"]["qat"]
    assert qat["status"] == "done" and qat["result"]["epochs"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["fp32_metric"] <= 100 and summary["stages"]["onnx_check"] == "done"
    graph = onnx.load(str(out / "model.onnx")).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 32, 32]  # resize 37 / centre crop 32


def test_changed_config_is_refused_without_restart(tmp_path):
    out = tmp_path / "r"
    assert qdq("run", *TINY, "--out", out, "--quiet").code == 0
    files = listing(out)
    changed = qdq("run", *TINY, "--out", out, "--max-drop", "5")
    assert changed.code == 2 and "different config (changed: max_drop)" in changed.err
    assert listing(out) == files


def test_run_takes_a_quantized_model_file_as_checkpoint(tmp_path):
    cal = qdq("calibrate", "tests.qdqapp.models:tiny_cnn", "--data", "random:2x3x16x16",
              "--ignore", "fc", "--out", tmp_path / "cal", "--quiet")
    assert cal.code == 0, cal.err
    result = qdq("run", *TINY, "--checkpoint", tmp_path / "cal" / "quantized.pt", "--out",
                 tmp_path / "r", "--quiet")
    assert result.code == 0, result.err[-3000:]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "r" / "model.onnx")).graph.node]
    assert ops[-1] == "Gemm" and ops.count("QuantizeLinear") == 5  # fc stayed float


def _image_folder(root, per_class: int = 3) -> str:
    """train/ and val/ of random PNG images in two classes; the spec of the folder."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(
                    folder / f"{i}.png")
    return f"imagefolder:{root}"


def test_a_blind_sweep_reads_warning_and_every_report_says_where_it_came_from(tmp_path):
    """A model that puts every image in one class: the sweep cannot rank its layers, and
    the printed table, report.md/html and summary.json say so; they also carry the date,
    qdq version, command line and machine."""
    import qdq as qdq_package

    out = tmp_path / "r"
    args = ["run", "--model", "tests.qdqapp.models:one_class_cnn", "--data",
            _image_folder(tmp_path / "images"), "--calibrators", "max", "--batch-size", "4",
            "--calib-batches", "1", "--image-size", "16", "--out", out, "--quiet"]
    result = qdq(*args)
    assert result.code == 0, result.err[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    warnings = summary["sweep_warnings"]
    assert warnings[0].startswith("the metric cannot tell the layers apart: all 4 layers "
                                  "measure top-1 accuracy (%) 50.0000")
    assert warnings[1].startswith("the FP32 model predicts class 0 for every one of the 6 "
                                  "evaluation inputs")
    assert "sensitivity sweep         WARNING: the metric cannot tell" in result.out
    report = (out / "report.md").read_text()
    assert "> **Warning:** the FP32 model predicts class 0" in report
    assert "> **What to do:** use trained weights" in (out / "sensitivity" /
                                                        "report.md").read_text()
    made = summary["provenance"]
    assert made["qdq"] == qdq_package.__version__ and made["device"] == "cpu"
    assert made["command"] == "qdq " + " ".join(str(a) for a in args)
    assert made["date"].endswith("Z") and made["host"] and made["torch"]
    line = report.splitlines()[2]
    assert line.startswith(f"Made {made['date']} by `qdq run --model ") and \
        f"with qdq {made['qdq']}" in line
    assert f"Made {made['date']}" in (out / "report.html").read_text()
