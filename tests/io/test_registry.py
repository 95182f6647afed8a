"""The backend registry and the opening sequence a new backend inherits from BaseSlideReader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ats_wsi.io import (
    CorruptSlideError,
    MissingResolutionError,
    MppSpec,
    SlideNotFoundError,
    UnsupportedSlideError,
    backend_for,
    open_slide,
    register_backend,
    slide_suffixes,
    unregister_backend,
)
from ats_wsi.io.base import BaseSlideReader
from ats_wsi.io.registry import BACKENDS, SUFFIX_BACKENDS


class RawReader(BaseSlideReader):
    """A toy format: b"RAW" + one byte per side + grey pixels; b"RAW!" is a damaged one."""

    def __init__(self, path, mpp=None, objective_power=None) -> None:
        self._open_slide(path, mpp, objective_power)

    def _open(self) -> tuple[float, float] | None:
        with self._backend_errors("raw", unsupported=(KeyError,), corrupt=(ValueError,)):
            data = self.path.read_bytes()
            if not data.startswith(b"RAW"):
                raise KeyError("no RAW signature")
            if data[3:4] == b"!":
                raise ValueError("damaged")
        side = data[3]
        self._pixels = np.frombuffer(data[4 : 4 + side * side], np.uint8).reshape(side, side)
        self._level_dimensions = ((side, side),)
        self._level_downsamples = (1.0,)
        return None  # the format has no resolution

    def _read_level(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        return np.repeat(self._pixels[y : y + height, x : x + width, None], 3, axis=2)


@pytest.fixture()
def raw_backend():
    register_backend("raw", RawReader, [".RAW"])
    yield "raw"
    unregister_backend("raw")
    assert "raw" not in BACKENDS and ".raw" not in SUFFIX_BACKENDS


def test_builtin_registrations() -> None:
    assert {"openslide", "zarr", "image", "tiatoolbox"} <= set(BACKENDS)
    assert {".svs", ".ome.tif", ".zarr", ".png"} <= set(slide_suffixes())
    # The default backend's suffixes do not route by name: a plain TIFF is detected by content.
    assert ".tif" not in SUFFIX_BACKENDS and backend_for("missing/b.tif") == "openslide"
    assert backend_for("a/b.ome.zarr") == "zarr"


def test_new_backend_joins_and_leaves(raw_backend: str, tmp_path: Path) -> None:
    path = tmp_path / "s.raw"
    path.write_bytes(b"RAW\x04" + bytes(range(16)))
    assert backend_for(path) == raw_backend and ".raw" in slide_suffixes()
    with pytest.raises(MissingResolutionError, match="s.raw"):
        open_slide(path)
    with open_slide(path, mpp=MppSpec(default=0.5)) as r:
        assert isinstance(r, RawReader) and r.mpp == (0.5, 0.5) and r.mpp_source == "cli"
        assert r.read_region((1, 2), 0, (2, 2))[..., 0].tolist() == [[9, 10], [13, 14]]
        # Outside the slide is white, resampling comes from the base class.
        assert r.read_region((3, 3), 0, (2, 2))[1, 1].tolist() == [255, 255, 255]
        assert r.thumbnail(1.0).shape == (2, 2, 3)
    direct = RawReader(path, mpp=0.25)
    assert (direct.mpp, direct.mpp_source) == ((0.25, 0.25), "override")


def test_opening_sequence_maps_errors(raw_backend: str, tmp_path: Path) -> None:
    with pytest.raises(SlideNotFoundError, match="no such file"):
        open_slide(tmp_path / "none.raw")
    (tmp_path / "other.raw").write_bytes(b"JUNK")
    with pytest.raises(UnsupportedSlideError, match=r"not a slide format: raw cannot read it"):
        open_slide(tmp_path / "other.raw", mpp=1.0)
    (tmp_path / "bad.raw").write_bytes(b"RAW!")
    with pytest.raises(CorruptSlideError, match="raw failed to open it: damaged"):
        open_slide(tmp_path / "bad.raw", mpp=1.0)


def test_reregistering_replaces_the_suffixes(raw_backend: str) -> None:
    register_backend("raw", RawReader, [".raw2"])
    assert backend_for("x.raw2") == "raw" and backend_for("x.raw") != "raw"
