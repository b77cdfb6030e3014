"""qdq calibrate / qdq sensitivity end to end, in a subprocess, on a tiny trained CNN."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.sensitivity.models import WEIGHTS_ENV, save_weights

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tests.sensitivity.models:build"


_ENV: dict[str, str] = {}


@pytest.fixture(scope="module", autouse=True)
def weights(tmp_path_factory):
    """Train the tiny model once; every subprocess loads its weights from a file."""
    _ENV[WEIGHTS_ENV] = save_weights(tmp_path_factory.mktemp("tinynet") / "tinynet.pt")


def qdq(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **_ENV}
    return subprocess.run([sys.executable, "-m", "qdqapp.cli", *args], capture_output=True,
                          text=True, timeout=300, cwd=ROOT, env=env)


def test_help_has_examples():
    for command in ("calibrate", "sensitivity"):
        out = qdq(command, "--help")
        assert out.returncode == 0 and "examples:" in out.stdout and "--data" in out.stdout


def test_calibrate_writes_amax_and_a_loadable_state(tmp_path):
    out = qdq("calibrate", MODEL, "--data", "random:16x1x12x12", "--calib-batches", "2",
              "--out", str(tmp_path), "--quiet", "--device", "cpu")
    assert out.returncode == 0, out.stderr
    summary = json.loads((tmp_path / "calibration.json").read_text())
    assert summary["num_batches"] == 2 and summary["num_samples"] == 32
    assert all(q["amax_max"] > 0 for q in summary["quantizers"])
    state = torch.load(tmp_path / "calibrated.pt", weights_only=True)
    amax = state["conv1._input_quantizer._amax"]
    first = next(q for q in summary["quantizers"] if q["name"] == "conv1._input_quantizer")
    assert float(amax) == pytest.approx(first["amax_max"])
    assert "conv1._input_quantizer" in out.stdout


@pytest.mark.slow
def test_sensitivity_writes_the_report_folder_and_resumes(tmp_path):
    args = ("sensitivity", MODEL, "--data", "random:32x1x12x12", "--calib-batches", "2",
            "--eval-batches", "2", "--proxy", "--top-k", "1", "--out", str(tmp_path),
            "--quiet", "--device", "cpu")
    out = qdq(*args)
    assert out.returncode == 0, out.stderr
    names = {p.name for p in tmp_path.iterdir()}
    assert {"report.md", "rows.jsonl", "sensitivity.csv", "sensitivity.json",
            "sensitivity.png", "skip_layers.txt", "calibration.json", "proxy.md",
            "proxy.json"} <= names
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert report["fp32"] == 100.0  # agreement of FP32 with itself
    assert report["metric_name"].startswith("top-1 agreement")
    assert {r["layer"] for r in report["rows"]} == {"conv1", "conv2", "pool", "fc1", "fc2"}
    skip = [s for s in (tmp_path / "skip_layers.txt").read_text().splitlines()
            if not s.startswith("#")]
    assert skip == [report["rows"][0]["layer"]]
    assert "Spearman" in out.stdout
    # run again: everything is read back from rows.jsonl, the same report comes out
    again = qdq(*args)
    assert again.returncode == 0, again.stderr
    assert json.loads((tmp_path / "sensitivity.json").read_text())["rows"] == report["rows"]


@pytest.mark.parametrize("args, message", [
    (("--data", "nowhere/at/all"), "data 'nowhere/at/all': expected"),
    (("--data", "random:16x1x12x12", "--layers", "conv9"), "layer 'conv9' does not exist"),
    (("--data", "random:axb"), "batch shape 'axb'"),
])
def test_bad_input_is_one_line(tmp_path, args, message):
    out = qdq("sensitivity", MODEL, "--out", str(tmp_path), "--calib-batches", "1",
              "--quiet", *args)
    assert out.returncode == 2
    assert len(out.stderr.strip().splitlines()) == 1 and message in out.stderr
