import gzip
import shutil

import pytest
import torch

from qdqapp import data as fm

needs_data = pytest.mark.skipif(
    not (fm.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist is not installed",
)


@needs_data
def test_test_split_decodes_normalised_images_and_labels():
    ds = fm.fashion_mnist("test")
    assert len(ds) == 10_000
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert y.dtype == torch.int64
    images, labels = ds.tensors
    assert labels.min() == 0 and labels.max() == 9
    assert torch.bincount(labels).tolist() == [1000] * 10  # the test split is balanced
    # Normalisation: pixel 0 maps to -MEAN/STD and the data is roughly centred.
    assert images.min().item() == pytest.approx(-fm.MEAN / fm.STD, abs=1e-5)
    assert abs(images.mean().item()) < 0.1
    assert 0.9 < images.std().item() < 1.1
    assert fm.fashion_mnist("test") is ds  # decoded once


@needs_data
def test_loader_limit_batches_and_shuffle():
    loader = fm.fashion_mnist_loader("test", batch_size=64, limit=200)
    batches = list(loader)
    assert [len(b[0]) for b in batches] == [64, 64, 64, 8]
    first = torch.cat([b[1] for b in batches])
    assert torch.equal(first, fm.fashion_mnist("test").tensors[1][:200])
    shuffled = torch.cat([b[1] for b in fm.fashion_mnist_loader(
        "test", batch_size=64, limit=200, shuffle=True)])
    assert not torch.equal(shuffled, first)
    assert torch.equal(shuffled.sort().values, first.sort().values)


@needs_data
def test_root_from_environment(tmp_path, monkeypatch):
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(fm.DEFAULT_ROOT / name, tmp_path / name)
    monkeypatch.setenv(fm.ENV_VAR, str(tmp_path))
    assert len(fm.fashion_mnist("test")) == 10_000


def test_missing_files_name_the_install_command(tmp_path):
    with pytest.raises(fm.DataError, match="apt-get install dataset-fashion-mnist"):
        fm.fashion_mnist("train", root=tmp_path)


def test_bad_split_is_refused(tmp_path):
    with pytest.raises(ValueError, match="split"):
        fm.fashion_mnist("valid", root=tmp_path)


@needs_data
def test_truncated_file_names_the_file(tmp_path):
    shutil.copy(fm.DEFAULT_ROOT / "t10k-labels-idx1-ubyte.gz", tmp_path)
    raw = (fm.DEFAULT_ROOT / "t10k-images-idx3-ubyte.gz").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(fm.DataError, match="t10k-images-idx3-ubyte.gz"):
        fm.fashion_mnist("test", root=tmp_path)


def test_idx_payload_shorter_than_header_says_truncated(tmp_path):
    header = bytes([0, 0, 8, 1]) + (10).to_bytes(4, "big")
    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(7)))
    with pytest.raises(fm.DataError, match="truncated"):
        fm.read_idx(path)
    path.write_bytes(gzip.compress(header + bytes(range(10))))
    assert fm.read_idx(path).tolist() == list(range(10))


def test_non_idx_file_is_refused(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(b"PK\x03\x04not an idx file"))
    with pytest.raises(fm.DataError, match="not an idx file"):
        fm.read_idx(path)
