"""Data by name, for the command line and scripts.

=========================  ===========================================================
spec                       batches
=========================  ===========================================================
``fashion-mnist``          the real Fashion-MNIST split via ``qdqapp.data``
``random:8x3x32x32``       seeded random tensors of that batch shape (no labels)
a folder path              ``torchvision.datasets.ImageFolder`` (labels = subfolders)
=========================  ===========================================================
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch

from sensitivity.errors import SensitivityError

__all__ = ["load_data", "check_spec", "parse_batch_shape", "has_labels"]

_SEEDS = {"calib": 0, "train": 0, "test": 1, "eval": 1}


def parse_batch_shape(text: str) -> tuple[int, ...]:
    """``"8x3x32x32"`` or ``"8,3,32,32"`` -> ``(8, 3, 32, 32)``."""
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(",") if p)
    except ValueError as err:
        raise SensitivityError(f"batch shape {text!r}: expected integers like 8x3x32x32") \
            from err
    if len(shape) < 2 or any(d <= 0 for d in shape):
        raise SensitivityError(f"batch shape {text!r}: needs a batch dimension and positive "
                               "sizes, like 8x3x32x32")
    return shape


def has_labels(spec: str) -> bool:
    return not spec.startswith("random:")


def check_spec(spec: str) -> None:
    """Raise for a data spec that cannot work, before anything expensive runs."""
    if spec == "fashion-mnist":
        return
    if spec.startswith("random:"):
        parse_batch_shape(spec.split(":", 1)[1])
        return
    if not Path(spec).is_dir():
        raise _bad_spec(spec)


def _bad_spec(spec: str) -> SensitivityError:
    return SensitivityError(f"data {spec!r}: expected 'fashion-mnist', 'random:NxCxHxW' or "
                            "an existing image folder")


def load_data(spec: str, split: str = "test", batch_size: int = 64,
              num_batches: int | None = None, image_size: int = 224) -> Iterable:
    """Batches for ``spec`` (see the module table). ``split`` is ``calib`` or ``test``.

    Fashion-MNIST calibrates on its train split and evaluates on its test split.
    """
    if spec == "fashion-mnist":
        try:
            from qdqapp.data import fashion_mnist_loader
        except ImportError as err:
            raise SensitivityError("--data fashion-mnist needs qdqapp.data, which this "
                                   f"installation lacks ({err})") from err
        fm_split = "train" if split in ("calib", "train") else "test"
        return fashion_mnist_loader(fm_split, batch_size=batch_size, shuffle=False)
    if spec.startswith("random:"):
        shape = parse_batch_shape(spec.split(":", 1)[1])
        gen = torch.Generator().manual_seed(_SEEDS.get(split, 2))
        return [torch.randn(shape, generator=gen) for _ in range(num_batches or 4)]
    path = Path(spec)
    if path.is_dir():
        from torchvision import datasets, transforms

        tf = transforms.Compose([
            transforms.Resize(image_size), transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ])
        try:
            dataset = datasets.ImageFolder(str(path), transform=tf)
        except (FileNotFoundError, RuntimeError) as err:
            raise SensitivityError(f"image folder {path}: {err}") from err
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    raise _bad_spec(spec)
