"""MNIST digits: the real IDX files, or scikit-learn's bundled 8 x 8 digits as a stand-in.

Every loader returns a :class:`DigitPool` whose ``source`` string says exactly which digits
were used (file, split and index range); pipelines record it with every result.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DigitPool",
    "IDXFormatError",
    "load_digit_pools",
    "load_mnist_idx",
    "load_sklearn_digits",
    "read_idx",
    "write_idx",
]

# IDX type codes (third magic byte) -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, str] = {
    0x08: "u1",
    0x09: "i1",
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}
_GZIP_MAGIC = b"\x1f\x8b"


class IDXFormatError(ValueError):
    """A file is not a well-formed IDX file (the message names the file)."""


@dataclass(frozen=True)
class DigitPool:
    """Digits to draw from.

    Attributes:
        images: uint8 (n, 28, 28), 0 = background, 255 = ink.
        labels: int64 (n,), values 0..9.
        source: where the digits came from, recorded with results.
    """

    images: np.ndarray
    labels: np.ndarray
    source: str

    def __post_init__(self) -> None:
        if self.images.ndim != 3 or self.images.dtype != np.uint8:
            raise ValueError(
                f"images must be uint8 (n, h, w), got {self.images.dtype} {self.images.shape}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.labels.shape[0]} labels for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, start: int, stop: int | None) -> DigitPool:
        """Digits ``[start:stop]`` (by index), with the range appended to ``source``."""
        stop = len(self) if stop is None else stop
        if not 0 <= start < stop <= len(self):
            raise ValueError(f"range [{start}:{stop}] outside a pool of {len(self)} digits")
        return DigitPool(
            self.images[start:stop], self.labels[start:stop], f"{self.source}[{start}:{stop}]"
        )


def _open_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    # Decide by content, not by name: some mirrors ship gzipped files without ".gz".
    if raw[:2] == _GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise IDXFormatError(f"{path}: corrupt gzip stream ({exc})") from exc
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (plain or gzipped) into a native-endian array.

    Raises:
        IDXFormatError: bad magic number, unknown type code, or a payload whose size does not
            match the header; the message names the file.
    """
    path = Path(path)
    data = _open_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IDXFormatError(f"{path}: not an IDX file (magic number {data[:4].hex() or 'empty'})")
    code, ndim = data[2], data[3]
    if code not in _IDX_DTYPES:
        raise IDXFormatError(f"{path}: unknown IDX type code 0x{code:02x}")
    if ndim == 0:
        raise IDXFormatError(f"{path}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise IDXFormatError(f"{path}: truncated IDX header")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise IDXFormatError(
            f"{path}: header shape {shape} needs {expected} payload bytes, "
            f"file has {len(data) - header}"
        )
    arr = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="))


def write_idx(path: str | Path, array: np.ndarray, compress: bool | None = None) -> Path:
    """Write ``array`` as IDX (gzipped when ``compress`` or the name ends in ``.gz``)."""
    path = Path(path)
    array = np.asarray(array)
    codes = {np.dtype(v).newbyteorder("="): k for k, v in _IDX_DTYPES.items()}
    key = array.dtype.newbyteorder("=")
    if key not in codes:
        raise ValueError(f"dtype {array.dtype} has no IDX type code")
    code = codes[key]
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    payload = header + array.astype(_IDX_DTYPES[code]).tobytes()
    if compress is None:
        compress = path.suffix == ".gz"
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def _find(directory: Path, prefix: str, kind: str) -> Path:
    """``train-images-idx3-ubyte`` and the common variants (``.`` for ``-``, ``.gz``)."""
    dims = "3" if kind == "images" else "1"
    for sep in ("-", "."):
        for ext in ("", ".gz"):
            p = directory / f"{prefix}-{kind}{sep}idx{dims}-ubyte{ext}"
            if p.is_file():
                return p
    raise FileNotFoundError(f"no {prefix}-{kind}-idx{dims}-ubyte[.gz] in {directory}")


def load_mnist_idx(directory: str | Path, split: str = "test") -> DigitPool:
    """Load the real MNIST ``train`` or ``test`` (t10k) split from IDX files in ``directory``.

    Raises:
        FileNotFoundError: the split's files are not there.
        IDXFormatError: a file is malformed or images and labels disagree (names the file).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(directory)
    prefix = "train" if split == "train" else "t10k"
    img_path = _find(directory, prefix, "images")
    lbl_path = _find(directory, prefix, "labels")
    images = read_idx(img_path)
    labels = read_idx(lbl_path)
    if images.ndim != 3 or images.shape[1:] != (28, 28) or images.dtype != np.uint8:
        raise IDXFormatError(
            f"{img_path}: expected uint8 (n, 28, 28), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise IDXFormatError(f"{lbl_path}: expected uint8 (n,), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != images.shape[0]:
        raise IDXFormatError(
            f"{lbl_path}: {labels.shape[0]} labels for {images.shape[0]} images in {img_path}"
        )
    if labels.size and labels.max() > 9:
        raise IDXFormatError(f"{lbl_path}: label {int(labels.max())} outside 0..9")
    return DigitPool(images, labels.astype(np.int64), f"mnist-idx:{img_path.resolve()}")


def load_sklearn_digits() -> DigitPool:
    """scikit-learn's bundled 1797 real 8 x 8 digits as 28 x 28 uint8 (the offline stand-in).

    Each digit is upsampled (bilinear) to 20 x 20 and centred in a 28 x 28 box, the layout of
    MNIST digits; intensities 0..16 are scaled to 0..255.
    """
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.zeros((len(bunch.images), 28, 28), np.uint8)
    for i, img in enumerate(bunch.images):
        big = Image.fromarray((img * (255.0 / 16.0)).astype(np.float32))
        big = np.asarray(big.resize((20, 20), Image.BILINEAR))
        images[i, 4:24, 4:24] = np.clip(np.round(big), 0, 255).astype(np.uint8)
    return DigitPool(images, bunch.target.astype(np.int64), "sklearn-digits-8x8-upsampled-28x28")


def load_digit_pools(
    mnist_dir: str | Path | None = None,
    test_split_start: int | None = None,
) -> tuple[DigitPool, DigitPool]:
    """Disjoint (train, test) digit pools.

    * ``mnist_dir`` with both MNIST splits: train and t10k as they are.
    * ``mnist_dir`` with only t10k (what these machines have): split by index, train =
      ``[0:test_split_start]``, test = ``[test_split_start:]`` (default 8000 of 10000).
    * no ``mnist_dir``: scikit-learn's digits, split the same way (default 80 % / 20 %: 1438 / 359).
    """
    if mnist_dir is not None:
        mnist_dir = Path(mnist_dir)
        if not mnist_dir.is_dir():
            raise FileNotFoundError(f"MNIST directory {mnist_dir} does not exist")
        test = load_mnist_idx(mnist_dir, "test")
        try:
            train = load_mnist_idx(mnist_dir, "train")
        except FileNotFoundError:
            split = 8000 if test_split_start is None else test_split_start
            return test.subset(0, split), test.subset(split, None)
        return train, test
    pool = load_sklearn_digits()
    split = int(round(0.8 * len(pool))) if test_split_start is None else test_split_start
    return pool.subset(0, split), pool.subset(split, None)
