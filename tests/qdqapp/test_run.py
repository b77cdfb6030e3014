"""``qdq run`` end to end, in a subprocess, as users run it."""

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

FAST = ["--batch-size", "64", "--calib-batches", "2", "--eval-batches", "3"]


def qdq(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdqapp.cli", *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "ref"
    result = qdq("run", "--out", str(out), "--calibrators", "max,percentile-99.99", *FAST)
    return out, result


def test_reference_run_writes_the_run_folder(reference_run):
    out, result = reference_run
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ["report.md", "report.html", "summary.json", "model.onnx", "skip_layers.txt",
                 "run.log", "calibrators.png", "layers.png", "sensitivity/sensitivity.png",
                 "sensitivity/rows.jsonl", "state.json", "config.json"]:
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert 0 < summary["int8_metric"] <= 100 and 0 < summary["fp32_metric"] <= 100
    assert summary["final_metric"] >= summary["fp32_metric"] - 0.3 or summary["skip_layers"]
    assert summary["stages"]["tensorrt"] in ("done", "skipped")
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    assert "FP32 metric" in result.stdout and "ONNX Runtime check" in result.stdout
    assert "<table>" in (out / "report.html").read_text()


def test_rerun_skips_finished_stages_and_resumes_a_cut_run(reference_run):
    out, _ = reference_run
    again = qdq("run", "--out", str(out), "--calibrators", "max,percentile-99.99", *FAST)
    assert again.returncode == 0, again.stderr[-3000:]
    log = again.stderr + again.stdout
    assert "calibrate (compare calibrators, keep the best): done earlier" in log
    # a run cut off after the sweep: drop the later stages from the record
    state = json.loads((out / "state.json").read_text())
    before = state["stages"]["partial"]["result"]
    for name in ["partial", "qat", "export", "lint", "onnx_check", "tensorrt"]:
        state["stages"].pop(name, None)
    (out / "state.json").write_text(json.dumps(state))
    resumed = qdq("run", "--out", str(out), "--calibrators", "max,percentile-99.99", *FAST)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stderr + resumed.stdout
    assert "per-layer sensitivity sweep: done earlier" in log
    after = json.loads((out / "state.json").read_text())["stages"]
    assert after["partial"]["result"]["skip_layers"] == before["skip_layers"]
    assert after["export"]["status"] == "done"


def test_changed_config_is_refused_without_restart(reference_run):
    out, _ = reference_run
    changed = qdq("run", "--out", str(out), "--max-drop", "5", *FAST)
    assert changed.returncode == 2
    assert "different config (changed: calibrators, max_drop)" in changed.stderr


def test_export_only_run_on_random_data(tmp_path):
    out = tmp_path / "r"
    result = qdq("run", "--model", "torchvision:resnet18", "--data", "random:2x3x32x32",
                 "--out", str(out), "--calibrator", "max", "--calib-batches", "2", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    state = json.loads((out / "state.json").read_text())["stages"]
    assert state["fp32"]["status"] == "skipped" and state["export"]["status"] == "done"
    assert state["lint"]["result"]["errors"] == 0


def test_image_folder_run(tmp_path):
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
    result = qdq("run", "--model", "torchvision:resnet18", "--data",
                 f"imagefolder:{tmp_path / 'images'}", "--out", str(out), "--calibrators",
                 "max", "--batch-size", "4", "--calib-batches", "1", "--qat-epochs", "1",
                 "--qat-steps", "1", "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    report = (out / "report.md").read_text()
    assert "(4 calibration / 4 eval images)" in report and "## QAT" in report
    qat = json.loads((out / "state.json").read_text())["stages"]["qat"]
    assert qat["status"] == "done" and qat["result"]["epochs"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert 0 <= summary["fp32_metric"] <= 100 and summary["stages"]["onnx_check"] == "done"
    graph = onnx.load(str(out / "model.onnx")).graph
    dims = [d.dim_value for d in graph.input[0].type.tensor_type.shape.dim[1:]]
    assert dims == [3, 224, 224]  # resize 256 / centre crop 224


@pytest.mark.parametrize("args, message", [
    (("--data", "nowhere"), "data 'nowhere'"),
    (("--model", "torchvision:nope", "--data", "random:1x3x8x8"), "no model 'nope'"),
    (("--config", "missing.yaml"), "no such file"),
    (("--sweep", "sideways"), "sweep: 'sideways'"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    result = qdq("run", "--out", str(tmp_path / "r"), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
