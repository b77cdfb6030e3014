"""One data grammar and one model grammar: registries of kinds, the same batches on every
pass, one image preprocessing, seeds that make random weights and data repeat."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qdqapp import models, sources
from qdqapp.errors import CliError
from qdqapp.sources import DataKind, DataOptions, open_data, parse_data_spec
from tests.qdqapp.cli import qdq

TINY = "tests.qdqapp.models:tiny_cnn"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An ImageFolder with train/ and val/ splits of two classes, as users keep data."""
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("cat", "dog"):
            folder = root / split / label
            folder.mkdir(parents=True)
            for i in range(3):
                pixels = (rng.random((30 + i, 40, 3)) * 255).astype("uint8")
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_specs_resolve_through_the_registries(images):
    assert parse_data_spec("random:2x3x8x8")[0].name == "random"
    assert parse_data_spec(f"imagefolder:{images}")[0].name == "imagefolder"
    assert parse_data_spec(str(images))[0].name == "imagefolder"  # a bare folder
    assert parse_data_spec("fashion-mnist")[0].name == "fashion-mnist"
    with pytest.raises(CliError, match="expected 'random:NxCxHxW', 'fashion-mnist"):
        parse_data_spec("mnist")
    assert models.parse_model_spec("reference")[0].name == "reference"
    assert models.parse_model_spec("torchvision:resnet18")[0].name == "torchvision"
    assert models.parse_model_spec(TINY)[0].name == "python"


def test_image_folder_splits_and_classes(images):
    source = open_data(f"imagefolder:{images}", DataOptions(batch_size=4, image_size=32))
    assert source.calib_set.classes == ["cat", "dog"]  # not "train" and "val"
    assert source.calib_set.root.endswith("train") and source.eval_set.root.endswith("val")
    x, y = next(iter(source.eval()))
    assert x.shape == (4, 3, 32, 32) and y.tolist() == [0, 0, 0, 1]
    assert source.example().shape == (1, 3, 32, 32)


@pytest.mark.parametrize("spec", ["random:3x3x8x8", "imagefolder"])
def test_every_pass_and_every_process_sees_the_same_batches(images, spec):
    spec = f"imagefolder:{images}" if spec == "imagefolder" else spec
    opts = DataOptions(batch_size=2, calib_batches=2, image_size=16, seed=5)
    a, b = open_data(spec, opts), open_data(spec, opts)
    first = [x.clone() for x in a.calib()]
    assert len(first) == 2
    assert all(torch.equal(x, y) for x, y in zip(first, a.calib(), strict=True))
    assert all(torch.equal(x, y) for x, y in zip(first, b.calib(), strict=True))
    assert torch.equal(a.check_batch(), first[0]) and torch.equal(b.check_batch(), first[0])
    other = open_data(spec, DataOptions(batch_size=2, calib_batches=2, image_size=16, seed=6))
    assert not all(torch.equal(x, y) for x, y in zip(first, other.calib(), strict=True))


def test_calibrate_and_sensitivity_read_an_image_folder_alike(images, tmp_path):
    """The same data gives the same amax in both commands (it used to differ: another
    resize, and train/ and val/ read as two classes)."""
    common = ["--data", f"imagefolder:{images}", "--batch-size", "3", "--calib-batches", "2",
              "--image-size", "24", "--quiet"]
    cal = qdq("calibrate", TINY, *common, "--out", tmp_path / "cal")
    assert cal.code == 0, cal.err
    sens = qdq("sensitivity", TINY, *common, "--eval-batches", "1", "--layers", "fc",
               "--out", tmp_path / "sens")
    assert sens.code == 0, sens.err
    amax = [{q["name"]: q["amax_max"] for q in
             json.loads((tmp_path / d / "calibration.json").read_text())["quantizers"]}
            for d in ("cal", "sens")]
    assert amax[0] == amax[1] and len(amax[0]) > 3
    report = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    assert report["metric_name"] == "top-1 accuracy (%)"  # labels from the class folders


def test_seed_makes_random_weights_repeat(tmp_path):
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        out = qdq("calibrate", "torchvision:resnet18", "--data", "random:1x3x16x16",
                  "--calib-batches", "1", "--seed", seed, "--out", tmp_path / name, "--quiet")
        assert out.code == 0, out.err
    states = [torch.load(tmp_path / n / "quantized.pt", weights_only=True)["state_dict"]
              for n in "abc"]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not torch.equal(states[0]["conv1.weight"], states[2]["conv1.weight"])
    before = torch.random.get_rng_state()
    models.build_model("torchvision:resnet18", seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)  # the process RNG is untouched


def test_a_new_data_kind_is_one_registry_entry(tmp_path):
    """What a later ``text:FILE`` kind needs: one entry, then every command reads it."""

    class Ones(sources.DataSource):
        labelled = False

        def calib(self):
            return [torch.ones(2, 3, 8, 8)] * self.opts.calib_batches

    kind = DataKind("ones", "ones:", lambda arg: None,
                    lambda spec, arg, opts: Ones(spec, opts, "all ones"))
    sources.register_data_kind(kind)
    try:
        out = qdq("calibrate", TINY, "--data", "ones:", "--calib-batches", "1", "--out",
                  tmp_path, "--quiet")
        assert out.code == 0, out.err
        record = json.loads((tmp_path / "calibration.json").read_text())
        assert record["data"] == "ones:"
        assert record["quantizers"][0]["amax_max"] == pytest.approx(1.0)
    finally:
        del sources.DATA_KINDS["ones"]


def test_random_data_is_scored_by_agreement_with_fp32(tmp_path):
    out = qdq("sensitivity", TINY, "--data", "random:4x3x8x8", "--eval-batches", "2",
              "--out", tmp_path, "--quiet")
    assert out.code == 0, out.err
    report = json.loads((tmp_path / "sensitivity.json").read_text())
    assert report["metric_name"] == "top-1 agreement with FP32 (%)" and report["fp32"] == 100.0
    # run again: the rows are read back from rows.jsonl (same seed, same model)
    again = qdq("sensitivity", TINY, "--data", "random:4x3x8x8", "--eval-batches", "2",
                "--out", tmp_path, "--quiet")
    assert again.code == 0
    assert json.loads((tmp_path / "sensitivity.json").read_text())["rows"] == report["rows"]
    # other weights must not be mixed into those rows
    other = qdq("sensitivity", TINY, "--data", "random:4x3x8x8", "--eval-batches", "2",
                "--seed", "1", "--out", tmp_path)
    assert other.code == 2 and "holds measurements of another model or data (changed: seed)" \
        in other.err


def test_a_new_model_kind_is_one_registry_entry():
    """What a later ``hf:DIR`` kind needs: one entry, then every command builds it."""
    from tests.qdqapp.models import TinyCNN

    kind = models.ModelKind("tiny", "tiny", lambda arg: TinyCNN(), lambda arg: None,
                            lambda arg: (1, 3, 8, 8))
    models.register_model_kind(kind)
    try:
        with pytest.raises(ValueError, match="already registered"):
            models.register_model_kind(kind)
        out = qdq("summary", "tiny", "--json", "--quiet")
        assert out.code == 0, out.err
        assert {r["module"] for r in json.loads(out.out)} >= {"conv1", "conv2", "fc"}
    finally:
        del models.MODEL_KINDS["tiny"]
