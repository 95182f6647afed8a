"""MNIST IDX reading (written by the tests), the real shared test split, the sklearn stand-in."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from ats_wsi.datasets.mnist import (
    IDXFormatError,
    load_digit_pools,
    load_mnist_idx,
    load_sklearn_digits,
    read_idx,
    write_idx,
)

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


def _fake_split(directory: Path, prefix: str, n: int, gz: bool, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    ext = ".gz" if gz else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{ext}", images)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{ext}", labels)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    images, labels = _fake_split(tmp_path, "t10k", 7, gz)
    pool = load_mnist_idx(tmp_path, "test")
    np.testing.assert_array_equal(pool.images, images)
    np.testing.assert_array_equal(pool.labels, labels)
    assert pool.labels.dtype == np.int64 and pool.images.dtype == np.uint8
    assert "t10k-images" in pool.source


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_dtypes(tmp_path: Path, dtype: type) -> None:
    arr = (
        (np.arange(24).reshape(2, 3, 4) - 5).astype(dtype)
        if dtype != np.uint8
        else (np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    )
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.idx", arr)), arr)


def test_gzip_detected_by_content_not_name(tmp_path: Path) -> None:
    arr = np.arange(10, dtype=np.uint8)
    path = write_idx(tmp_path / "labels-no-ext", arr, compress=True)
    np.testing.assert_array_equal(read_idx(path), arr)


def test_malformed_files_name_the_file(tmp_path: Path) -> None:
    bad_magic = tmp_path / "bad_magic"
    bad_magic.write_bytes(b"\x01\x02\x08\x01\x00\x00\x00\x01\x00")
    with pytest.raises(IDXFormatError, match="bad_magic"):
        read_idx(bad_magic)
    bad_code = tmp_path / "bad_code"
    bad_code.write_bytes(b"\x00\x00\x07\x01\x00\x00\x00\x01\x00")
    with pytest.raises(IDXFormatError, match="bad_code.*type code"):
        read_idx(bad_code)
    truncated = tmp_path / "truncated.gz"
    arr = np.zeros((3, 28, 28), np.uint8)
    raw = bytes([0, 0, 8, 3]) + np.asarray(arr.shape, ">u4").tobytes() + arr.tobytes()[:-5]
    truncated.write_bytes(gzip.compress(raw))
    with pytest.raises(IDXFormatError, match="truncated.gz.*payload"):
        read_idx(truncated)
    corrupt = tmp_path / "corrupt.gz"
    corrupt.write_bytes(gzip.compress(raw)[:-12])
    with pytest.raises(IDXFormatError, match="corrupt.gz"):
        read_idx(corrupt)


def test_images_labels_mismatch_names_file(tmp_path: Path) -> None:
    _fake_split(tmp_path, "t10k", 5, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(IDXFormatError, match="t10k-labels-idx1-ubyte"):
        load_mnist_idx(tmp_path, "test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(5, 12, np.uint8))
    with pytest.raises(IDXFormatError, match="outside 0..9"):
        load_mnist_idx(tmp_path, "test")
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((5, 20, 20), np.uint8))
    with pytest.raises(IDXFormatError, match="t10k-images-idx3-ubyte"):
        load_mnist_idx(tmp_path, "test")


def test_missing_split(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="t10k-images"):
        load_mnist_idx(tmp_path, "test")


def test_pools_split_t10k_disjointly(tmp_path: Path) -> None:
    images, labels = _fake_split(tmp_path, "t10k", 20, gz=True)
    train, test = load_digit_pools(tmp_path, test_split_start=15)
    assert (len(train), len(test)) == (15, 5)
    np.testing.assert_array_equal(train.images, images[:15])
    np.testing.assert_array_equal(test.images, images[15:])
    assert train.source.endswith("[0:15]") and test.source.endswith("[15:20]")


def test_pools_use_both_splits_when_present(tmp_path: Path) -> None:
    _fake_split(tmp_path, "t10k", 6, gz=False, seed=1)
    _fake_split(tmp_path, "train", 9, gz=True, seed=2)
    train, test = load_digit_pools(tmp_path)
    assert (len(train), len(test)) == (9, 6)
    assert "train-images" in train.source and "t10k-images" in test.source


@pytest.mark.skipif(not (SHARED / "t10k-images-idx3-ubyte.gz").exists(), reason="no shared MNIST")
def test_real_mnist_test_split() -> None:
    pool = load_mnist_idx(SHARED, "test")
    assert pool.images.shape == (10_000, 28, 28)
    assert np.bincount(pool.labels).tolist()[:3] == [980, 1135, 1032]  # official class counts
    train, test = load_digit_pools(SHARED)
    assert (len(train), len(test)) == (8000, 2000)


def test_sklearn_fallback() -> None:
    pool = load_sklearn_digits()
    assert pool.images.shape == (1797, 28, 28) and pool.images.dtype == np.uint8
    assert pool.images.max() == 255 and pool.images[:, :4].max() == 0  # centred like MNIST
    assert set(np.unique(pool.labels)) == set(range(10))
    assert "sklearn" in pool.source
    train, test = load_digit_pools(None)
    assert len(train) + len(test) == 1797 and "sklearn" in test.source
