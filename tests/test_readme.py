"""The README's code is tested: every fenced Python block runs, and every ``qdq`` line of
its shell blocks runs with small inputs (a tiny model for the torchvision ones, a small
image folder for /data/imagenet, 16-pixel random inputs, a tiny BERT folder with its
tokenizer for MiniLM and a few sentences for its text)."""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from export import tensorrt_available
from tests.qdqapp.cli import qdq

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)
#: big inputs in the README -> small ones here
SMALL = [("torchvision:resnet50", "tests.qdqapp.models:tiny_cnn"),
         ("torchvision:resnet18", "tests.qdqapp.models:tiny_cnn"),
         ("random:8x3x224x224", "random:4x3x16x16"),
         ("--qat-steps 2000", "--qat-steps 1"),
         ("hf:minilm", "hf:{tiny_bert}"),
         ("text:qdqapp/assets/text", "text:{sentences}")]


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text()) if lang == language]


def cli_lines() -> list[str]:
    """Every ``qdq ...`` command of the bash blocks, continuations joined, comments cut."""
    lines = []
    for body in blocks("bash"):
        for command in body.replace("\\\n", " ").splitlines():
            command = command.split("#")[0].strip()
            if command.startswith("qdq "):
                lines.append(" ".join(command.split()))
    return lines


def small(text: str, images: Path) -> str:
    """``images`` is the folder the small inputs were made in (``make_small_inputs``)."""
    for big, little in SMALL:
        text = text.replace(big, little)
    return (text.replace("/data/imagenet", str(images))
            .replace("{tiny_bert}", str(images.parent / "tiny_bert"))
            .replace("{sentences}", str(images.parent / "sentences")))


@pytest.fixture
def in_tmp(tmp_path):
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        yield tmp_path
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("index", range(len(blocks("python"))))
def test_python_block_runs(index, in_tmp):
    from qdq import quant_modules

    code = blocks("python")[index]
    try:
        exec(compile(code, f"README.md python block {index + 1}", "exec"), {})
    finally:
        quant_modules.deinitialize()


def test_the_readme_has_cli_lines_and_a_config():
    lines = cli_lines()
    commands = {line.split()[1] for line in lines}
    assert {"summary", "calibrate", "export", "verify", "sensitivity", "lint", "build",
            "run"} <= commands
    assert len(blocks("yaml")) == 1


@pytest.mark.slow
def test_every_cli_line_runs_with_small_inputs(in_tmp):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = in_tmp / "imagenet"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (images / split / label).mkdir(parents=True)
            for i in range(2):
                Image.fromarray((rng.random((20, 24, 3)) * 255).astype("uint8")).save(
                    images / split / label / f"{i}.png")
    from tests.qdqapp.models import save_tiny_bert, write_sentences

    save_tiny_bert(in_tmp / "tiny_bert")
    (in_tmp / "sentences").mkdir()
    write_sentences(in_tmp / "sentences" / "calib.txt", 8, seed=1)
    write_sentences(in_tmp / "sentences" / "test.txt", 6, seed=2)
    config = yaml.safe_load(small(blocks("yaml")[0], images))
    config.update(batch_size=4, calib_batches=1, image_size=16)
    (in_tmp / "run.yaml").write_text(yaml.safe_dump(config))
    for line in cli_lines():
        args = shlex.split(small(line, images))[1:]
        if args[0] == "run" and "--config" not in args:
            args += ["--batch-size", "4", "--calib-batches", "1"]
        if args[0] in ("calibrate", "sensitivity") and "imagefolder:" in " ".join(args):
            args += ["--batch-size", "4", "--calib-batches", "1"]
        if "imagefolder:" in " ".join(args):
            args += ["--image-size", "16"]
        result = qdq(*args, "--quiet") if args[0] != "--help" else qdq(*args)
        if args[0] == "build" and not tensorrt_available():
            assert result.code == 2 and "pip install tensorrt" in result.err, line
            continue
        assert result.code == 0, f"{line}\n{result.err[-2000:]}"
