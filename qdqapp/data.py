"""Fashion-MNIST from the idx files Debian ships (package ``dataset-fashion-mnist``).

Nothing is downloaded at run time: the four gzip'd idx files are read from
``/usr/share/datasets/fashion-mnist/`` (or ``root``, or the ``QDQ_FASHION_MNIST``
environment variable). A whole split is decoded once into two tensors, so iterating over
it costs no per-sample Python work beyond indexing.

Example::

    test = fashion_mnist("test")                 # 10,000 (1x28x28 float, int64 label)
    loader = fashion_mnist_loader("train", batch_size=256, shuffle=True, limit=5000)
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

__all__ = [
    "DEFAULT_ROOT", "ENV_VAR", "MEAN", "STD", "CLASSES", "DataError",
    "fashion_mnist", "fashion_mnist_loader", "read_idx",
]

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "QDQ_FASHION_MNIST"
INSTALL_HINT = "sudo apt-get install dataset-fashion-mnist"
#: Per-pixel mean and standard deviation of the training images (pixels scaled to [0, 1]).
MEAN = 0.2860
STD = 0.3530
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
           "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", 60_000),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", 10_000),
}
_IDX_UBYTE = 0x08


class DataError(RuntimeError):
    """The data set is missing or unreadable; the message names the file and the fix."""


def _root(root: str | os.PathLike | None) -> Path:
    if root is not None:
        return Path(root)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_ROOT


def read_idx(path: str | os.PathLike) -> torch.Tensor:
    """Decode one (optionally gzip'd) idx file of unsigned bytes into a uint8 tensor."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as err:
        raise DataError(f"{path}: cannot be read as a gzip'd idx file ({err}); "
                        f"reinstall it with `{INSTALL_HINT}` (--reinstall)") from err
    if len(raw) < 4:
        raise DataError(f"{path}: too short for an idx header ({len(raw)} bytes)")
    zero, dtype, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype != _IDX_UBYTE or not 1 <= ndim <= 4:
        raise DataError(f"{path}: not an idx file of unsigned bytes "
                        f"(magic {raw[:4].hex()})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: header cut short")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for size in shape:
        count *= size
    if len(raw) - header != count:
        raise DataError(f"{path}: holds {len(raw) - header} data bytes, its header "
                        f"announces {count} for shape {tuple(shape)} (truncated or corrupt)")
    data = torch.frombuffer(bytearray(raw[header:]), dtype=torch.uint8)
    return data.reshape(shape)


def _load_split(split: str, root: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if split not in _FILES:
        raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}")
    images_name, labels_name, expected = _FILES[split]
    missing = [name for name in (images_name, labels_name) if not (root / name).is_file()]
    if missing:
        where = f"{root}" + (f" (from ${ENV_VAR})" if os.environ.get(ENV_VAR) else "")
        raise DataError(f"Fashion-MNIST not found: {', '.join(missing)} missing in {where}; "
                        f"install it with `{INSTALL_HINT}` or point {ENV_VAR} at a folder "
                        "holding the idx .gz files")
    images = read_idx(root / images_name)
    labels = read_idx(root / labels_name)
    if images.dim() != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{root / images_name}: expected N x 28 x 28 images, "
                        f"got {tuple(images.shape)}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise DataError(f"{root / labels_name}: {labels.shape[0]} labels for "
                        f"{images.shape[0]} images")
    if images.shape[0] != expected:
        raise DataError(f"{root / images_name}: {images.shape[0]} images, the {split} split "
                        f"has {expected}")
    x = images.unsqueeze(1).float().div_(255.0).sub_(MEAN).div_(STD)
    return x, labels.long()


_CACHE: dict[tuple[str, str], TensorDataset] = {}


def fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> Dataset:
    """The whole ``split`` ('train' or 'test') as normalised float 1x28x28 images and
    int64 labels; decoded once per process and cached."""
    base = _root(root)
    key = (split, str(base.resolve()))
    if key not in _CACHE:
        _CACHE[key] = TensorDataset(*_load_split(split, base))
    return _CACHE[key]


def fashion_mnist_loader(
    split: str = "train",
    batch_size: int = 256,
    shuffle: bool | None = None,
    limit: int | None = None,
    root: str | os.PathLike | None = None,
    seed: int = 0,
    drop_last: bool = False,
    sampler=None,
    **kwargs,
) -> DataLoader:
    """A DataLoader over ``split``; shuffled by default for 'train' only.

    ``limit`` keeps the first ``limit`` samples (quick runs, tests). ``sampler`` (e.g. a
    ``DistributedSampler``) replaces shuffling. Extra keyword arguments go to DataLoader.
    """
    data = fashion_mnist(split, root)
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"limit must be positive, got {limit}")
        data = Subset(data, range(min(limit, len(data))))
    if shuffle is None:
        shuffle = split == "train" and sampler is None
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    return DataLoader(data, batch_size=batch_size, shuffle=bool(shuffle) and sampler is None,
                      sampler=sampler, drop_last=drop_last, generator=generator, **kwargs)
