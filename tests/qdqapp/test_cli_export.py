"""qdq export / lint / verify / build, run as users run them: in a subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest

from export import tensorrt_available
from tests.export.test_lint import build

MODEL = "tests.export.tiny:small_cnn"


def qdq(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qdqapp.cli", *args], capture_output=True,
                          text=True, timeout=300)


def _one_line(err: str) -> bool:
    lines = [ln for ln in err.strip().splitlines() if "Warning" not in ln and ln.strip()
             and not ln.startswith("  ")]
    return len(lines) == 1


@pytest.mark.parametrize("command", ["export", "lint", "verify", "build"])
def test_help_has_examples(command):
    out = qdq(command, "--help")
    assert out.returncode == 0 and "examples:" in out.stdout and f"qdq {command}" in out.stdout


def test_export_lint_verify_roundtrip(tmp_path):
    onnx_path = tmp_path / "cnn.onnx"
    common = ["--calib", "random", "--shape", "2,3,16,16", "--seed", "3"]
    out = qdq("export", MODEL, *common, "--out", str(onnx_path), "--rules",
              "--int8-weights", "--fp16-out", str(tmp_path / "cnn_16.onnx"))
    assert out.returncode == 0, out.stderr
    assert "4 Q / 7 DQ" in out.stdout  # the residual input shares the conv's quantizer
    assert onnx_path.is_file() and (tmp_path / "cnn_16.onnx").is_file()
    out = qdq("lint", str(onnx_path), "--json")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == []
    out = qdq("verify", MODEL, str(onnx_path), *common, "--rules", "--batch", "8")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK: same function" in out.stdout and "forced run" in out.stdout
    # another seed builds other weights: verify must say MISMATCH (exit 1)
    out = qdq("verify", MODEL, str(onnx_path), "--calib", "random",
              "--shape", "2,3,16,16", "--seed", "4", "--batch", "4")
    assert out.returncode == 1 and "MISMATCH" in out.stdout


def test_lint_exits_1_on_errors(tmp_path):
    bad = tmp_path / "bad.onnx"
    onnx.save(build(x_zp=__import__("numpy").int8(5)), str(bad))
    out = qdq("lint", str(bad))
    assert out.returncode == 1 and "zero-point" in out.stdout and "2 error(s)" in out.stdout


@pytest.mark.parametrize("args, message", [
    (("lint", "/nonexistent/model.onnx"), "no such file"),
    (("export", MODEL, "--shape", "1,3,16,16", "--out", "{tmp}/a.onnx"),
     "pass --calib random"),
    (("export", MODEL, "--calib", "random", "--shape", "1,3,16,16",
      "--out", "{tmp}/no/such/dir/a.onnx"), "does not exist"),
    (("export", MODEL, "--checkpoint", "{tmp}/missing.pt", "--out", "{tmp}/a.onnx"),
     "no such file"),
    (("export", MODEL, "--calib", "random", "--shape", "1,5,16,16", "--out", "{tmp}/a.onnx"),
     "does not run on inputs of shape [1, 5, 16, 16]"),
    (("verify", MODEL, "{tmp}/none.onnx", "--calib", "random", "--shape", "1,3,16,16"),
     "no such file"),
])
def test_bad_input_one_line_exit_2_no_output(tmp_path, args, message):
    out = qdq(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert out.returncode == 2, out.stdout + out.stderr
    assert message in out.stderr and _one_line(out.stderr), out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(tensorrt_available(), reason="TensorRT is installed here")
def test_build_without_tensorrt(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(build(), str(model))
    out = qdq("build", str(model), "--engine", str(tmp_path / "m.engine"))
    assert out.returncode == 2 and "pip install tensorrt polygraphy" in out.stderr
    assert _one_line(out.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
