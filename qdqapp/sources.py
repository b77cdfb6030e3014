"""Data specs: one grammar, one loader and one preprocessing for every command.

=============================  =====================================================
spec                           data
=============================  =====================================================
``fashion-mnist[:ROOT]``       Debian's Fashion-MNIST idx files: calibration from the
                               train split, evaluation on the 10k test split
``imagefolder:DIR`` or ``DIR``  torchvision ``ImageFolder`` (labels = subfolders);
                               ``DIR/train`` and ``DIR/val`` when present, else one
                               folder serves both; resize 8/7, centre crop
                               ``--image-size`` (256/224), ImageNet normalisation
``random:NxCxHxW``             seeded random batches of that shape (no labels:
                               metrics become top-1 agreement with FP32)
``text:FILE`` or ``text:DIR``   sentences, one per line, tokenised with the model's
                               tokenizer into padded ``{input_ids, attention_mask}``
                               batches of ``--batch-size`` sentences (a text model,
                               ``hf:DIR``, only); ``DIR/calib.txt`` (or ``train.txt``)
                               and ``DIR/test.txt`` (or ``val.txt``) when given a
                               folder, else one file serves both
=============================  =====================================================

A spec is ``KIND[:ARG]``; each kind is one :func:`register_data_kind` entry, so a new
source is one more entry. Every source gives the same views: ``calib()`` (input
batches, the very same ones on every pass, so a resumed run or a second pass sees what
the first saw), ``eval()`` (labelled batches or None), ``eval_inputs()`` (inputs for
agreement with FP32), ``train()`` (shuffled, augmented, for QAT, or None) and
``example()`` (one input, batch 1). A batch is a tensor, or for text a dict of tensors.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from qdqapp.errors import CliError, first_line
from qdqapp.models import parse_shape
from qdqapp.registry import Registry

__all__ = ["DataOptions", "DataSource", "DataKind", "DATA_KINDS", "register_data_kind",
           "parse_data_spec", "open_data", "image_transform", "rows_of", "TextSource",
           "TEXT_SPLITS"]


@dataclass(frozen=True)
class DataOptions:
    """How much data each view gives, and the seed of every random choice in it (the
    commands' flags are checked into a :class:`qdqapp.specs.DataSpec`, which makes
    these)."""

    batch_size: int = 256
    calib_batches: int = 8
    eval_batches: int | None = None
    image_size: int = 224
    seed: int = 0
    #: text data: the model's tokenizer (the flow sets it from the model spec)
    tokenizer: Any = field(default=None, repr=False, compare=False)


class _Batches:
    """``limit`` batches from ``make()``, rebuilt on every pass (so every pass is equal)."""

    def __init__(self, make: Callable[[], Iterable], limit: int | None,
                 inputs_only: bool) -> None:
        self.make, self.limit, self.inputs_only = make, limit, inputs_only

    def __iter__(self) -> Iterator:
        for batch in itertools.islice(self.make(), self.limit):
            yield batch[0] if self.inputs_only and isinstance(batch, (tuple, list)) else batch

    def __len__(self) -> int:
        total = len(self.make())  # a DataLoader knows its length without loading
        return total if self.limit is None else min(total, self.limit)


def rows_of(batch, rows: int):
    """The first ``rows`` samples of a batch: a tensor, or a dict of keyword tensors."""
    if isinstance(batch, dict):
        return {k: v[:rows] for k, v in batch.items()}
    return batch[:rows]


def _loader(dataset, batch_size: int, shuffle: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                       generator=gen, num_workers=0)


class DataSource:
    """The views of one data spec (see the module docstring)."""

    labelled: bool = True
    #: sentences tokenised for a text model: batches are dicts of token tensors
    text: bool = False
    #: decoded tensors already in memory (keeping evaluation batches costs little more)
    in_memory: bool = True

    def __init__(self, spec: str, opts: DataOptions, description: str) -> None:
        self.spec, self.opts, self.description = spec, opts, description

    def calib(self) -> Iterable[torch.Tensor]:
        raise NotImplementedError

    def eval(self) -> Iterable | None:
        return None

    def eval_inputs(self) -> Iterable[torch.Tensor]:
        data = self.eval()
        return _Batches(lambda: data, None, True) if data is not None else self.calib()

    def train(self) -> Iterable | None:
        return None

    def example(self) -> torch.Tensor:
        for batch in self.calib():
            return rows_of(batch, 1)
        raise CliError(f"data {self.spec!r}: gives no batch")

    def check_batch(self, rows: int = 64) -> torch.Tensor:
        """A fixed batch (the first calibration batch, at most ``rows``): the same one in
        every process, so checks on it repeat exactly."""
        for batch in self.calib():
            return rows_of(batch, rows)
        raise CliError(f"data {self.spec!r}: gives no batch")


@dataclass(frozen=True)
class DataKind:
    """``check(arg)`` refuses a bad spec cheaply; ``open(spec, arg, opts)`` reads it.
    ``text``: the data is sentences, for a model with a tokenizer (and only for one)."""

    name: str
    grammar: str
    check: Callable[[str], None]
    open: Callable[[str, str, DataOptions], DataSource]
    text: bool = False


DATA_KINDS: Registry[DataKind] = Registry("data kind")
register_data_kind = DATA_KINDS.register


def parse_data_spec(spec: str) -> tuple[DataKind, str]:
    """``"random:8x3x32x32"`` -> (the random kind, ``"8x3x32x32"``); an existing folder
    is an image folder."""
    kind, _, arg = spec.partition(":")
    if kind in DATA_KINDS:
        return DATA_KINDS[kind], arg
    if spec and Path(spec).is_dir():
        return DATA_KINDS["imagefolder"], spec
    raise CliError(f"data {spec!r}: expected {DATA_KINDS.grammar()} (or an existing folder)")


def open_data(spec: str, opts: DataOptions | None = None) -> DataSource:
    """The views of the spec text ``spec`` (checked here), for Python use; the commands
    open a :class:`qdqapp.specs.DataSpec` instead."""
    kind, arg = parse_data_spec(spec)
    kind.check(arg)
    return kind.open(spec, arg, opts or DataOptions())


# ----------------------------------------------------------------- random
class RandomSource(DataSource):
    labelled = False

    def __init__(self, spec: str, shape: tuple[int, ...], opts: DataOptions) -> None:
        super().__init__(spec, opts, f"random tensors of shape {list(shape)}")
        self.shape = shape

    def _batches(self, count: int, seed: int) -> list[torch.Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return [torch.randn(self.shape, generator=gen) for _ in range(count)]

    def calib(self) -> list[torch.Tensor]:
        return self._batches(self.opts.calib_batches, self.opts.seed)

    def eval_inputs(self) -> list[torch.Tensor]:
        return self._batches(self.opts.eval_batches or self.opts.calib_batches,
                             self.opts.seed + 1)


def _random_shape(arg: str) -> tuple[int, ...]:
    shape = parse_shape(arg, "random batch shape")
    if len(shape) < 2:
        raise CliError(f"random batch shape {arg!r}: needs a batch dimension and a sample "
                       "shape, like 8x3x32x32")
    return shape


def _check_random(arg: str) -> None:
    _random_shape(arg)


register_data_kind(DataKind(
    "random", "random:NxCxHxW", _check_random,
    lambda spec, arg, opts: RandomSource(spec, _random_shape(arg), opts)))


class SplitSource(DataSource):
    """Labelled data with a training split (calibration: shuffled with the seed, the same
    batches every pass; QAT: ``train_loader``) and an evaluation split (in order)."""

    calib_set: torch.utils.data.Dataset
    eval_set: torch.utils.data.Dataset
    train_set: torch.utils.data.Dataset

    def calib(self) -> _Batches:
        o = self.opts
        return _Batches(lambda: _loader(self.calib_set, o.batch_size, True, o.seed),
                        o.calib_batches, True)

    def eval(self) -> _Batches:
        o = self.opts
        return _Batches(lambda: _loader(self.eval_set, o.batch_size, False, o.seed),
                        o.eval_batches, False)

    def train(self):
        return _loader(self.train_set, self.opts.batch_size, True, self.opts.seed)


# ----------------------------------------------------------------- Fashion-MNIST
class FashionMnistSource(SplitSource):
    def __init__(self, spec: str, root: str | None, opts: DataOptions) -> None:
        from qdqapp.data import DataError, fashion_mnist

        try:
            self.calib_set = self.train_set = fashion_mnist("train", root=root)
            self.eval_set = fashion_mnist("test", root=root)
        except DataError as err:
            raise CliError(str(err)) from err
        super().__init__(spec, opts, f"Fashion-MNIST ({opts.calib_batches * opts.batch_size} "
                                     f"calibration images, {len(self.eval_set)} test images)")

    def example(self) -> torch.Tensor:
        return self.calib_set[0][0].unsqueeze(0)


def _check_fashion_mnist(root: str) -> None:
    if root and not Path(root).is_dir():
        raise CliError(f"data 'fashion-mnist:{root}': no such folder")


register_data_kind(DataKind(
    "fashion-mnist", "fashion-mnist[:ROOT]", _check_fashion_mnist,
    lambda spec, arg, opts: FashionMnistSource(spec, arg or None, opts)))


# ----------------------------------------------------------------- image folders
def image_transform(size: int = 224, train: bool = False):
    """The one image preprocessing: resize to ``size * 8/7`` and centre-crop ``size``
    (256/224), ImageNet mean/std; training adds random resized crops and flips."""
    from torchvision import transforms

    normalize = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    if train:
        return transforms.Compose([transforms.RandomResizedCrop(size),
                                   transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                   normalize])
    return transforms.Compose([transforms.Resize(round(size * 8 / 7)),
                               transforms.CenterCrop(size), transforms.ToTensor(), normalize])


class ImageFolderSource(SplitSource):
    in_memory = False  # images are decoded as they are read

    def __init__(self, spec: str, root: Path, opts: DataOptions) -> None:
        from torchvision import datasets

        self.train_dir = root / "train" if (root / "train").is_dir() else root
        self.val_dir = root / "val" if (root / "val").is_dir() else root
        tf = image_transform(opts.image_size)
        try:
            self.calib_set = datasets.ImageFolder(str(self.train_dir), tf)
            self.eval_set = datasets.ImageFolder(str(self.val_dir), tf)
            self.train_set = datasets.ImageFolder(str(self.train_dir),
                                                  image_transform(opts.image_size, True))
        except (FileNotFoundError, RuntimeError) as err:
            raise CliError(f"data {spec!r}: not an image folder with one subfolder per class "
                           f"({first_line(err)})") from err
        super().__init__(spec, opts, f"ImageFolder {root} ({len(self.calib_set)} calibration "
                                     f"/ {len(self.eval_set)} eval images)")


def _check_image_folder(arg: str) -> None:
    if not arg:
        raise CliError("data 'imagefolder:': expected imagefolder:DIR")
    if not Path(arg).is_dir():
        raise CliError(f"data 'imagefolder:{arg}': no such folder")


register_data_kind(DataKind(
    "imagefolder", "imagefolder:DIR", _check_image_folder,
    lambda spec, arg, opts: ImageFolderSource(spec, Path(arg), opts)))


# ----------------------------------------------------------------- text
#: ``text:DIR``: the calibration and the evaluation file, the first of each that exists
TEXT_SPLITS = {"calibration": ("calib.txt", "train.txt"), "evaluation": ("test.txt", "val.txt")}


def _text_files(arg: str) -> tuple[Path, Path]:
    """(calibration file, evaluation file) of ``text:ARG``."""
    if not arg:
        raise CliError("data 'text:': expected text:FILE (one sentence per line) or text:DIR")
    path = Path(arg)
    if path.is_dir():
        found = []
        for split, names in TEXT_SPLITS.items():
            hit = next((path / n for n in names if (path / n).is_file()), None)
            if hit is None:
                raise CliError(f"data 'text:{arg}': a folder needs a {split} file "
                               f"({' or '.join(names)})")
            found.append(hit)
        return found[0], found[1]
    if not path.is_file():
        raise CliError(f"data 'text:{arg}': no such file")
    return path, path


def _read_text(spec: str, path: Path) -> list[str]:
    from qdqapp.hf import HFError, read_sentences

    try:
        return read_sentences(path)
    except HFError as err:
        raise CliError(f"data {spec!r}: {err}") from err


def _check_text(arg: str) -> None:
    spec = f"text:{arg}"
    for path in dict.fromkeys(_text_files(arg)):
        _read_text(spec, path)


class TextSource(DataSource):
    """Sentences tokenised into padded keyword batches; no labels (agreement with FP32)."""

    labelled = False
    text = True

    def __init__(self, spec: str, arg: str, opts: DataOptions) -> None:
        from qdqapp.hf import text_batches

        if opts.tokenizer is None:
            raise CliError(f"data {spec!r}: text needs the model's tokenizer (a text model, "
                           "hf:DIR)")
        calib_file, eval_file = _text_files(arg)
        self.calib_sentences = _read_text(spec, calib_file)
        self.eval_sentences = _read_text(spec, eval_file)
        n = opts.batch_size
        self._calib = text_batches(opts.tokenizer, self.calib_sentences, n)[:opts.calib_batches]
        self._eval = text_batches(opts.tokenizer, self.eval_sentences, n)[:opts.eval_batches]
        used = sum(len(b["input_ids"]) for b in self._calib)
        tested = sum(len(b["input_ids"]) for b in self._eval)
        where = (f"{calib_file}" if calib_file == eval_file
                 else f"{calib_file} / {eval_file}")
        super().__init__(spec, opts, f"text {where} ({used} calibration / {tested} "
                                     "evaluation sentences)")

    def calib(self) -> list[dict[str, torch.Tensor]]:
        return self._calib

    def eval_inputs(self) -> list[dict[str, torch.Tensor]]:
        return self._eval


register_data_kind(DataKind("text", "text:FILE", _check_text,
                            lambda spec, arg, opts: TextSource(spec, arg, opts), text=True))
