"""Prefetcher: results in input order, failures handed back, not fatal."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from ats_wsi.io import LowResItem, LowResLoader, NoTissueError, Prefetcher, SlideNotFoundError


def test_prefetch_in_order_with_failures(
    pyramid_tiff: Path, pyramid_zarr: Path, blank_tiff: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.svs"
    paths = [pyramid_tiff, missing, pyramid_zarr, blank_tiff, pyramid_tiff]
    with Prefetcher(paths, LowResLoader(mpp=16.0), depth=2) as prefetcher:
        results = list(prefetcher)
    assert [p for p, _ in results] == paths
    ok = [r for _, r in results]
    assert isinstance(ok[1], SlideNotFoundError) and "missing.svs" in str(ok[1])
    assert isinstance(ok[3], NoTissueError) and "blank.tif" in str(ok[3])
    for item in (ok[0], ok[2], ok[4]):
        assert isinstance(item, LowResItem)
        assert item.image.shape == (125, 120, 3) and item.mask is not None and item.mask.any()
        assert item.scale == pytest.approx((32.0, 32.0)) and item.view().shape == (1, 3, 125, 120)
    np.testing.assert_array_equal(ok[0].image, ok[4].image)
    # The zarr copy has one level fewer, so its view is resampled from 8x instead of read at
    # 16x: nearly, not exactly, the same.
    assert np.abs(ok[0].image.astype(int) - ok[2].image).mean() < 2.0


def test_prefetch_with_existing_client_and_plain_function() -> None:
    from distributed import Client

    with Client(
        processes=False, n_workers=1, threads_per_worker=2, dashboard_address=None
    ) as client:
        prefetcher = Prefetcher(range(6), _square_or_fail, depth=3, client=client)
        out = list(prefetcher)
        prefetcher.close()  # must not close a client it did not start
        assert client.status == "running"
    assert [k for k, _ in out] == list(range(6))
    assert [v for _, v in out if not isinstance(v, Exception)] == [0, 1, 4, 16, 25]
    assert isinstance(out[3][1], ValueError)


def _square_or_fail(k: int) -> int:
    if k == 3:
        raise ValueError("three")
    return k * k


@pytest.fixture
def restore_environ() -> Iterator[None]:
    """distributed's Nanny writes its pre-spawn variables (OMP_NUM_THREADS=1,
    PYTHONHASHSEED=6640, ...) into this process's os.environ for good: put it back, so that
    later tests and their subprocesses see the run's own environment."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.slow
@pytest.mark.usefixtures("restore_environ")
def test_prefetch_worker_processes(cmu_svs: Path, tmp_path: Path) -> None:
    # Spawned workers import the loader by name and open the slide themselves; exceptions
    # (SlideError pickles with its path) come back across the process boundary.
    paths = [cmu_svs, tmp_path / "missing.svs"]
    with Prefetcher(paths, LowResLoader(mpp=16.0), depth=2, processes=True, n_workers=1) as pf:
        results = list(pf)
    assert isinstance(results[0][1], LowResItem) and results[0][1].mask is not None
    assert isinstance(results[1][1], SlideNotFoundError) and results[1][1].path.endswith(
        "missing.svs"
    )
