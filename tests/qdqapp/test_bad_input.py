"""Every bad input gets one line naming what is at fault, exit status 2 (with --debug too,
which adds the traceback), before any work, and leaves nothing behind."""

from __future__ import annotations

import pytest
import torch
import torchvision

from tests.qdqapp.cli import fill_in, listing, qdq

R18 = "torchvision:resnet18"
SMALL = "random:2x3x32x32"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Inputs the cases point at: a quantized-model file, float weights of another model,
    a calibrated state_dict (the old format), garbage, an unlabelled image folder."""
    from PIL import Image

    root = tmp_path_factory.mktemp("inputs")
    result = qdq("calibrate", R18, "--data", SMALL, "--calib-batches", "1", "--out",
                 root / "cal", "--quiet")
    assert result.code == 0, result.err
    torch.save(torchvision.models.resnet34().state_dict(), root / "r34.pt")
    torch.save({"conv1._input_quantizer._amax": torch.ones(()),
                **torchvision.models.resnet18().state_dict()}, root / "amax_state.pt")
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    (root / "a_file").write_text("x")
    flat = root / "flat"
    flat.mkdir()
    Image.new("RGB", (8, 8)).save(flat / "0.png")
    (root / "fm").mkdir()
    return root


CASES = [
    # --ignore names that do not exist, close matches suggested
    (("calibrate", R18, "--data", SMALL, "--ignore", "no.such.layer", "--out", "{tmp}/o"),
     "--ignore 'no.such.layer': the model has no module of that name"),
    (("calibrate", R18, "--data", SMALL, "--ignore", "layer1.0.conv", "--out", "{tmp}/o"),
     "did you mean layer1.0.conv2, layer1.0.conv1"),
    (("run", "--model", R18, "--data", SMALL, "--ignore", "fc1", "--out", "{tmp}/r"),
     "--ignore 'fc1'"),
    (("export", R18, "--data", SMALL, "--ignore", "conv", "--out", "{tmp}/a.onnx"),
     "--ignore 'conv'"),
    (("summary", R18, "--ignore", "fc.weight"), "--ignore 'fc.weight'"),
    (("calibrate", R18, "--data", SMALL, "--checkpoint", "{in}/cal/quantized.pt", "--ignore",
      "fc", "--out", "{tmp}/o"), "is a quantized-model file, whose layers are already chosen"),
    # data that does not fit the model, or does not exist
    (("run", "--model", R18, "--data", "random:8x3", "--out", "{tmp}/r"),
     "does not run on inputs of shape [1, 3] from --data random:8x3"),
    (("export", R18, "--data", "random:1x5x16x16", "--out", "{tmp}/a.onnx"),
     "does not run on inputs of shape [1, 5, 16, 16]"),
    (("calibrate", R18, "--data", "imagefolder:{tmp}/missing", "--out", "{tmp}/o"),
     "data 'imagefolder:{tmp}/missing': no such folder"),
    (("calibrate", R18, "--data", "imagefolder:{in}/flat", "--out", "{tmp}/o"),
     "not an image folder with one subfolder per class"),
    (("sensitivity", R18, "--data", "nowhere/at/all", "--out", "{tmp}/o"),
     "data 'nowhere/at/all': expected 'random:NxCxHxW', 'fashion-mnist[:ROOT]'"),
    (("calibrate", R18, "--data", "random:axb", "--out", "{tmp}/o"),
     "random batch shape 'axb': expected integers"),
    (("calibrate", R18, "--data", "fashion-mnist:{tmp}/none", "--out", "{tmp}/o"),
     "no such folder"),
    (("calibrate", R18, "--data", "fashion-mnist:{in}/fm", "--out", "{tmp}/o"),
     "Fashion-MNIST not found"),
    # models
    (("summary", "torchvision:resnet81"), "torchvision has no model 'resnet81'; did you mean "
     "resnet18"),
    (("summary", "resnet18"), "model 'resnet18': expected 'reference', 'torchvision:NAME'"),
    (("summary", "no_such_pkg.mod:fn"), "cannot import 'no_such_pkg.mod'"),
    # checkpoints
    (("summary", R18, "--checkpoint", "{in}/garbage.pt"),
     "garbage.pt: cannot be read (not a file torch.save wrote)"),
    (("summary", R18, "--checkpoint", "{tmp}/missing.pt"), "missing.pt: no such file"),
    (("summary", R18, "--checkpoint", "{in}/r34.pt"),
     "r34.pt does not fit torchvision:resnet18: "),
    (("summary", R18, "--checkpoint", "{in}/amax_state.pt"),
     "use the quantized-model file qdq calibrate writes"),
    (("export", "torchvision:resnet34", "--checkpoint", "{in}/cal/quantized.pt", "--out",
      "{tmp}/a.onnx"), "quantized.pt does not fit the model: "),
    # outputs: checked before anything is built
    (("export", R18, "--data", SMALL, "--out", "{tmp}"), "is a folder; give a file path"),
    (("export", R18, "--data", SMALL, "--out", "{tmp}/no/such/dir/a.onnx"),
     "folder {tmp}/no/such/dir does not exist"),
    (("export", R18, "--data", SMALL, "--out", "{in}/a_file/a.onnx"), "is not a folder"),
    (("calibrate", R18, "--data", SMALL, "--out", "{in}/a_file"), "is a file, not a folder"),
    (("export", R18, "--out", "{tmp}/a.onnx"), "the model has no amax yet: pass --checkpoint"),
    # --layers, calibrators, configs
    (("sensitivity", R18, "--data", SMALL, "--layers", "conv9", "--out", "{tmp}/o"),
     "--layers: layer 'conv9' does not exist"),
    (("calibrate", R18, "--data", SMALL, "--calibrator", "kl", "--out", "{tmp}/o"),
     "calibration method 'kl' is unknown"),
    (("run", "--out", "{tmp}/r", "--config", "{tmp}/missing.yaml"), "no such file"),
    (("run", "--out", "{tmp}/r", "--sweep", "sideways"), "--sweep 'sideways': choose one of"),
    (("run", "--out", "{tmp}/r", "--eval", "nope"), "--eval 'nope': expected auto, top1"),
    (("calibrate", R18, "--data", SMALL, "--calibrators", "max", "--out", "{tmp}/o"),
     "--calibrators: the list is for --compare"),
    (("calibrate", R18, "--data", SMALL, "--compare", "--calibrators", ",", "--out",
      "{tmp}/o"), "--calibrators: the list of calibrators is empty"),
    # numbers out of range: refused before anything is built (they used to fail after
    # calibration and the sweep, or at the QAT stage, leaving files)
    (("sensitivity", R18, "--data", SMALL, "--top-k", "-1", "--out", "{tmp}/o"),
     "--top-k: expected a positive integer, got -1"),
    (("sensitivity", R18, "--data", SMALL, "--max-drop", "-1", "--out", "{tmp}/o"),
     "--max-drop: expected a non-negative number, got -1.0"),
    (("sensitivity", R18, "--data", SMALL, "--target", "nan", "--out", "{tmp}/o"),
     "--target: expected a finite number, got nan"),
    (("sensitivity", R18, "--data", SMALL, "--eval-batches", "0", "--out", "{tmp}/o"),
     "--eval-batches: expected a positive integer, got 0"),
    (("run", "--model", R18, "--data", SMALL, "--qat-lr", "-1", "--out", "{tmp}/r"),
     "--qat-lr: expected a positive number, got -1.0"),
    (("run", "--model", R18, "--data", SMALL, "--qat-epochs", "-1", "--out", "{tmp}/r"),
     "--qat-epochs: expected a non-negative integer, got -1"),
    (("run", "--model", R18, "--data", SMALL, "--qat-steps", "0", "--out", "{tmp}/r"),
     "--qat-steps: expected a positive integer, got 0"),
    (("run", "--model", R18, "--data", SMALL, "--max-drop", "-0.1", "--out", "{tmp}/r"),
     "--max-drop: expected a non-negative number, got -0.1"),
    (("calibrate", R18, "--data", SMALL, "--batch-size", "0", "--out", "{tmp}/o"),
     "--batch-size: expected a positive integer, got 0"),
    (("calibrate", R18, "--data", SMALL, "--calib-batches", "-3", "--out", "{tmp}/o"),
     "--calib-batches: expected a positive integer, got -3"),
    (("calibrate", R18, "--data", SMALL, "--image-size", "0", "--out", "{tmp}/o"),
     "--image-size: expected a positive integer, got 0"),
    (("summary", R18, "--seed", "-1"), "--seed: expected a non-negative integer, got -1"),
    (("export", R18, "--data", SMALL, "--opset", "99", "--out", "{tmp}/a.onnx"),
     "--opset 99: Q/DQ export needs 13 or newer, and the installed onnx knows opsets up to"),
    (("verify", R18, "{in}/cal/quantized.pt", "--checkpoint", "{in}/cal/quantized.pt",
      "--rel-l2", "-1"), "--rel-l2: expected a positive number, got -1.0"),
    (("build", "{in}/cal/quantized.pt", "--workspace-gb", "0"),
     "--workspace-gb: expected a positive number, got 0.0"),
    (("verify", R18, "{tmp}/none.onnx", "--data", SMALL), "no such file"),
    (("lint", "{tmp}/model.onnx"), "no such file"),
    # formats: an unknown one, options that belong to another, calibrators that do not suit
    (("export", R18, "--data", SMALL, "--format", "int3", "--out", "{tmp}/a.onnx"),
     "--format 'int3': unknown format; choose one of int8, fp8, w8, w4"),
    (("run", "--out", "{tmp}/r", "--format", "int3"), "--format 'int3': unknown format"),
    (("summary", R18, "--format", "int8", "--block-size", "32"),
     "--block-size applies to the weight-only formats (--format w8 or w4), not to int8"),
    (("calibrate", R18, "--data", SMALL, "--format", "w4", "--weight-method", "entropy",
      "--out", "{tmp}/o"), "--weight-method 'entropy': choose one of max, mse"),
    (("export", R18, "--format", "w4", "--weight-method", "gptq", "--out", "{tmp}/a.onnx"),
     "--weight-method gptq needs --data: it quantizes the weights from the calibration "
     "batches"),
    (("calibrate", R18, "--data", SMALL, "--format", "int8", "--weight-method", "awq",
      "--out", "{tmp}/o"), "--weight-method applies to the weight-only formats"),
    (("run", "--model", R18, "--data", SMALL, "--format", "fp8", "--calibrator", "entropy",
      "--out", "{tmp}/r"), "calibrator entropy: FP8 E4M3 calibrates with max, mse or "
     "percentile-P"),
    (("calibrate", R18, "--data", SMALL, "--format", "fp8", "--calibrator", "entropy",
      "--out", "{tmp}/o"), "--calibrator entropy: FP8 E4M3 calibrates with max, mse"),
    (("calibrate", R18, "--data", SMALL, "--format", "fp8", "--compare", "--calibrators",
      "max,entropy", "--out", "{tmp}/o"), "--calibrators entropy: FP8 E4M3"),
    (("calibrate", R18, "--data", SMALL, "--format", "w8", "--compare", "--out", "{tmp}/o"),
     "--compare: w8 is weight-only, nothing is calibrated"),
    (("run", "--model", R18, "--data", SMALL, "--format", "w4", "--calibrator", "max",
      "--out", "{tmp}/r"), "calibrator max: w4 is weight-only, nothing is calibrated"),
    (("run", "--model", R18, "--data", SMALL, "--format", "w4", "--block-size", "128",
      "--out", "{tmp}/r"), "--block-size 128 does not divide the input dimension of "
     "conv1.weight (3), layer1.0.conv1.weight (64)"),
    (("export", R18, "--format", "w4", "--block-size", "128", "--out", "{tmp}/a.onnx"),
     "keep those 7 layers in float (--ignore conv1 --ignore layer1.0.conv1"),
    (("summary", R18, "--format", "w4", "--block-size", "128", "--ignore", "conv1"),
     "or choose another block size (--block-size 64 divides every layer)"),
    (("export", R18, "--data", SMALL, "--format", "fp8", "--opset", "17", "--out",
      "{tmp}/a.onnx"), "--opset 17: FP8 E4M3 Q/DQ needs opset 19 or newer"),
    (("export", R18, "--checkpoint", "{in}/cal/quantized.pt", "--format", "w4", "--out",
      "{tmp}/a.onnx"), "--format w4: {in}/cal/quantized.pt holds a model in format int8"),
    (("summary", R18, "--checkpoint", "{in}/cal/quantized.pt", "--block-size", "8"),
     "--block-size applies to the weight-only formats"),
    (("sensitivity", R18, "--data", SMALL, "--format", "w8", "--out", "{tmp}/o"),
     "weight-only layers have none"),
    (("summary", R18, "--format", "w4", "--calibrate"),
     "--calibrate: w4 is weight-only, nothing is calibrated"),
    (("run", "--model", R18, "--data", SMALL, "--format", "w8", "--qat-epochs", "1",
      "--out", "{tmp}/r"), "--qat-epochs: QAT trains fake-quantized float weights"),
    (("export", R18, "--data", SMALL, "--format", "w8", "--smoothquant", "--out",
      "{tmp}/a.onnx"), "--smoothquant: --format w8 quantizes weights only"),
]
if not torch.cuda.is_available():
    CASES.append((("summary", R18, "--device", "cuda"), "--device cuda: no CUDA device here"))
# build reads the graph before TensorRT is loaded (test_cli covers TensorRT missing)
CASES.append((("build", "{in}/cal/quantized.pt"), "quantized.pt: not a readable ONNX model"))


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
@pytest.mark.parametrize("args, message", CASES, ids=[f"{c[0][0]}-{i}" for i, c in
                                                      enumerate(CASES)])
def test_bad_input(tmp_path, files, args, message, debug):
    before = listing(files)
    places = {"{tmp}": str(tmp_path), "{in}": str(files)}

    def expand(text: str) -> str:
        return fill_in(text, places)

    result = qdq(*[expand(a) for a in args], *(["--debug"] if debug else []))
    assert result.code == 2, result.err
    assert expand(message) in result.err, result.err
    last = result.error_lines[-1]
    assert last.startswith("qdq: error: ") and expand(message) in last
    if debug:
        assert "Traceback" in result.err
    else:
        assert len(result.error_lines) == 1, result.err
    assert listing(tmp_path) == [] and listing(files) == before  # nothing left behind


def test_a_run_that_fails_before_any_stage_finishes_leaves_nothing(tmp_path):
    out = tmp_path / "deep" / "run"
    result = qdq("run", "--model", R18, "--data", SMALL, "--eval", "tests.qdqapp.models:x",
                 "--out", out)
    assert result.code == 2 and "eval 'tests.qdqapp.models:x': cannot load it" in result.err
    # labelled data whose evaluation breaks in the first stage: the folder goes again
    result = qdq("run", "--out", out, "--eval", "tests.qdqapp.models:broken_eval",
                 "--batch-size", "16", "--calib-batches", "1", "--eval-batches", "1")
    if "Fashion-MNIST not found" in result.err:
        pytest.skip("dataset-fashion-mnist is not installed")
    assert result.code == 2 and "this evaluation always fails" in result.err
    assert listing(tmp_path) == []


def test_a_changed_config_touches_nothing(tmp_path):
    out = tmp_path / "r"
    first = qdq("run", "--model", "tests.qdqapp.models:tiny_cnn", "--data",
                "random:2x3x16x16", "--calibrator", "max", "--out", out, "--quiet")
    assert first.code == 0, first.err
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    changed = qdq("run", "--model", "tests.qdqapp.models:tiny_cnn", "--data",
                  "random:2x3x16x16", "--calibrator", "mse", "--out", out)
    assert changed.code == 2 and "different config (changed: calibrator)" in changed.err
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
