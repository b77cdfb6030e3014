"""What ``qdq run`` reads: data for calibration and evaluation, and the evaluation itself.

Data specs:

- ``fashion-mnist`` (or ``fashion-mnist:ROOT``): Debian's idx files; calibration batches
  from the training split, evaluation on the 10k test split.
- ``imagefolder:PATH`` (or just an existing folder): torchvision ``ImageFolder`` with the
  standard resize 256 / centre crop 224 / ImageNet normalisation (QAT trains on random
  resized crops and flips). ``PATH/train`` and ``PATH/val`` are used when present;
  otherwise one folder serves both.
- ``random:1x3x224x224``: seeded random tensors of that shape, for export-only runs (no
  evaluation, so the accuracy stages are skipped).

Evaluation: ``top1`` (top-1 accuracy in percent) or ``package.module:fn`` with
``fn(model, loader) -> float`` where higher is better.
"""

from __future__ import annotations

import importlib
import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from qdqapp.cli import CliError
from qdqapp.models import parse_shape

__all__ = ["Inputs", "load_inputs", "load_eval"]


@dataclass
class Inputs:
    calib: Iterable[torch.Tensor]
    eval_loader: Iterable | None
    example: torch.Tensor
    description: str
    train_loader: Iterable | None = None  # labelled, shuffled: for QAT


class _InputsOnly:
    """Input tensors of the first ``limit`` (x, y) batches; iterable more than once."""

    def __init__(self, loader: Iterable, limit: int) -> None:
        self.loader, self.limit = loader, limit

    def __iter__(self) -> Iterator[torch.Tensor]:
        for batch in itertools.islice(self.loader, self.limit):
            yield batch[0] if isinstance(batch, (tuple, list)) else batch

    def __len__(self) -> int:
        return self.limit


class _RandomBatches:
    def __init__(self, shape: tuple[int, ...], count: int, seed: int) -> None:
        self.shape, self.count, self.seed = shape, count, seed

    def __iter__(self) -> Iterator[torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed)
        for _ in range(self.count):
            yield torch.randn(self.shape, generator=gen)

    def __len__(self) -> int:
        return self.count


def _loader(dataset, batch_size: int, shuffle: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       generator=gen, num_workers=0)


def _image_folder(path: Path, batch_size: int, calib_batches: int, seed: int) -> Inputs:
    from torchvision import datasets, transforms

    if not path.is_dir():
        raise CliError(f"data {path}: no such folder")
    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    tf = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                             transforms.ToTensor(), normalize])
    augment = transforms.Compose([transforms.RandomResizedCrop(224),
                                  transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                  normalize])
    train_dir = path / "train" if (path / "train").is_dir() else path
    val_dir = path / "val" if (path / "val").is_dir() else path
    try:
        train, val = datasets.ImageFolder(train_dir, tf), datasets.ImageFolder(val_dir, tf)
    except (FileNotFoundError, RuntimeError) as err:
        raise CliError(f"data {path}: not an image folder ({err})") from err
    calib = _InputsOnly(_loader(train, batch_size, True, seed), calib_batches)
    example = next(iter(calib))[:1]
    return Inputs(calib, _loader(val, batch_size, False, seed), example,
                  f"ImageFolder {path} ({len(train)} calibration / {len(val)} eval images)",
                  _loader(datasets.ImageFolder(train_dir, augment), batch_size, True, seed))


def load_inputs(spec: str, batch_size: int, calib_batches: int, seed: int,
                input_shape: str | None = None) -> Inputs:
    """Resolve a data spec (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    if kind == "random":
        shape = parse_shape(arg or input_shape or "")
        batches = _RandomBatches(shape, calib_batches, seed)
        example = torch.randn(shape, generator=torch.Generator().manual_seed(seed))[:1]
        return Inputs(batches, None, example, f"random tensors of shape {list(shape)}")
    if kind == "fashion-mnist":
        from qdqapp.data import fashion_mnist

        try:
            train = fashion_mnist("train", root=arg or None)
            test = fashion_mnist("test", root=arg or None)
        except (FileNotFoundError, ValueError, OSError) as err:
            raise CliError(str(err)) from err
        calib = _InputsOnly(_loader(train, batch_size, True, seed), calib_batches)
        return Inputs(calib, _loader(test, batch_size, False, seed),
                      train[0][0].unsqueeze(0),
                      f"Fashion-MNIST ({calib_batches * batch_size} calibration images, "
                      f"{len(test)} test images)", _loader(train, batch_size, True, seed))
    if kind == "imagefolder":
        return _image_folder(Path(arg), batch_size, calib_batches, seed)
    if Path(spec).is_dir():
        return _image_folder(Path(spec), batch_size, calib_batches, seed)
    raise CliError(f"data {spec!r}: expected 'fashion-mnist', 'imagefolder:PATH', an existing "
                   "folder or 'random:SHAPE'")


def load_eval(spec: str, device: torch.device,
              max_batches: int | None) -> Callable[[nn.Module, Iterable], float]:
    """``model, loader -> metric`` for an eval spec."""
    if spec == "top1":
        from qdqapp.evaluate import top1_accuracy

        def top1(model: nn.Module, loader: Iterable) -> float:
            return top1_accuracy(model, loader, device=device, max_batches=max_batches)

        return top1
    if ":" not in spec:
        raise CliError(f"eval {spec!r}: expected 'top1' or 'package.module:function'")
    source, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(source), name)
    except (ImportError, AttributeError) as err:
        raise CliError(f"eval {spec!r}: cannot load it ({err})") from err
    if not callable(fn):
        raise CliError(f"eval {spec!r}: not callable")
    return fn
