"""One quantized-model file through every command: calibrate -> export -> verify ->
sensitivity -> summary, for a torchvision model and for the reference model."""

from __future__ import annotations

import json

import onnx
import pytest

from qdqapp.data import DEFAULT_ROOT
from tests.qdqapp.cli import qdq

HAS_FMNIST = (DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file()

CHAINS = {
    "resnet18": ("torchvision:resnet18", "random:4x3x32x32", []),
    "reference": ("reference", "fashion-mnist" if HAS_FMNIST else "random:16x1x28x28",
                  ["--batch-size", "64", "--calib-batches", "2"]),
}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_one_file_through_every_command(tmp_path, name):
    model, data, sizes = CHAINS[name]
    cal = tmp_path / "cal"
    out = qdq("calibrate", model, "--data", data, *sizes, "--calibrator", "percentile-99.99",
              "--out", cal, "--quiet")
    assert out.code == 0, out.err
    quantized = cal / "quantized.pt"
    onnx_path = tmp_path / "model.onnx"
    out = qdq("export", model, "--checkpoint", quantized, "--out", onnx_path, "--quiet")
    assert out.code == 0, out.err
    ops = [n.op_type for n in onnx.load(str(onnx_path)).graph.node]
    assert "QuantizeLinear" in ops and "BatchNormalization" not in ops
    out = qdq("verify", model, onnx_path, "--checkpoint", quantized, "--data", data, *sizes,
              "--batch", "16", "--quiet")
    assert out.code == 0, out.out + out.err
    assert "OK: same function" in out.out
    sens = tmp_path / "sens"
    out = qdq("sensitivity", model, "--checkpoint", quantized, "--data", data, *sizes,
              "--eval-batches", "2", "--layers",
              "conv1" if name == "resnet18" else "stem.0.0,fc", "--top-k", "1",
              "--out", sens, "--quiet")
    assert out.code == 0, out.err
    report = json.loads((sens / "sensitivity.json").read_text())
    assert report["rows"] and (sens / "quantized.pt").is_file()
    out = qdq("summary", model, "--checkpoint", sens / "quantized.pt", "--json", "--quiet")
    assert out.code == 0, out.err
    rows = {r["name"]: r for r in json.loads(out.out)}
    skipped = report["rows"][0]["layer"]
    assert rows[f"{skipped}._input_quantizer"]["state"] == "off"  # kept in float
    assert all(r["amax_max"] is not None for r in rows.values() if r["state"] != "off")
    # the amax export and summary see are the calibrated ones, not recomputed
    calibrated = {q["name"]: q["amax_max"]
                  for q in json.loads((cal / "calibration.json").read_text())["quantizers"]}
    assert all(rows[n]["amax_max"] == a for n, a in calibrated.items() if a is not None)
