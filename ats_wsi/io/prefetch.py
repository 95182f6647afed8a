"""Background loading of per-slide data with dask.distributed.

:class:`Prefetcher` keeps up to ``depth`` loads in flight on a dask cluster while the caller works
on the current slide, and yields results in input order. Loads receive a *path*, never an open
reader: slide handles are not picklable, so each load opens (and closes) its own reader on the
worker. With ``processes=True`` the load function must be importable (a module-level function or
an instance of a module-level class such as :class:`LowResLoader`), because dask starts workers
with ``spawn``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from os import PathLike
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ats_wsi.io.readers import Closing, MppSpec, SlideReader, open_slide

__all__ = ["LowResItem", "LowResLoader", "Prefetcher"]


@dataclass(frozen=True)
class LowResItem:
    """What a training / inference loop needs before sampling patches from a slide.

    Attributes:
        path: the slide.
        image: (h, w, 3) uint8 low-resolution view (uint8 keeps transfers 4x smaller).
        scale: (sy, sx) level-0 pixels per view pixel.
        mask: boolean (h, w) tissue mask, or None when not computed.
        dimensions: level-0 (width, height).
        mpp: level-0 (x, y) microns per pixel.
    """

    path: str
    image: np.ndarray
    scale: tuple[float, float]
    mask: np.ndarray | None
    dimensions: tuple[int, int]
    mpp: tuple[float, float]

    def pixels(self) -> Tensor:
        """The view as uint8 (1, 3, h, w), channels first."""
        return torch.from_numpy(np.ascontiguousarray(self.image.transpose(2, 0, 1)))[None]

    def view(self) -> Tensor:
        """The view as float (1, 3, h, w) in [0, 1], as :func:`low_res_view` returns it."""
        # In place: a 100k px slide's view is 113 MB as float; "/ 255" would hold it twice.
        return self.pixels().float().div_(255)


@dataclass(frozen=True)
class LowResLoader:
    """Picklable load function: path -> :class:`LowResItem` (view at ``mpp`` + tissue mask).

    Errors (missing file, no tissue, ...) propagate; :class:`Prefetcher` hands them back.
    """

    mpp: float = 8.0
    tissue: bool = True
    backend: str | None = None
    slide_mpp: float | MppSpec | None = None
    objective_power: float | None = None

    def __call__(self, path: str | PathLike[str]) -> LowResItem:
        with open_slide(path, self.backend, self.slide_mpp, self.objective_power) as reader:
            return self.read(reader, path)

    def read(self, reader: SlideReader, path: str | PathLike[str] | None = None) -> LowResItem:
        """The item of an already open ``reader`` (``path`` defaults to the reader's)."""
        from ats_wsi.io.tissue import tissue_mask

        image = reader.thumbnail(self.mpp)
        width, height = reader.dimensions
        mask = tissue_mask(image, self.mpp, slide=reader.path) if self.tissue else None
        return LowResItem(
            path=str(path if path is not None else reader.path),
            image=image,
            scale=(height / image.shape[0], width / image.shape[1]),
            mask=mask,
            dimensions=reader.dimensions,
            mpp=reader.mpp,
        )


class Prefetcher(Closing):
    """Iterate ``(path, result or exception)`` over ``paths``, loading ahead with dask.

    Args:
        paths: slides (or any picklable keys) passed one by one to ``load``.
        load: function run on a dask worker for each path.
        depth: loads kept in flight; bounds memory at ``depth`` results plus the current one.
        client: an existing ``distributed.Client`` to submit to (not closed here).
        scheduler: address of a running scheduler to connect to, when no client is given.
        processes: for a new local cluster, worker processes instead of threads. Threads are
            the default: OpenSlide, zarr and numpy release the GIL, and nothing is pickled.
        n_workers: workers of a new local cluster (default ``depth``).

    A load that raises does not stop the iteration: its exception is yielded in its place.
    """

    def __init__(
        self,
        paths: Iterable[Any],
        load: Callable[[Any], Any],
        depth: int = 2,
        *,
        client: Any | None = None,
        scheduler: str | None = None,
        processes: bool = False,
        n_workers: int | None = None,
    ) -> None:
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.paths = list(paths)
        self.load = load
        self.depth = depth
        self._client = client
        self._owns_client = False
        self._scheduler = scheduler
        self._processes = processes
        self._n_workers = n_workers if n_workers is not None else depth

    @property
    def client(self) -> Any:
        """The dask client, started on first use."""
        if self._client is None:
            from distributed import Client

            if self._scheduler is not None:
                self._client = Client(self._scheduler)
            else:
                self._client = Client(
                    processes=self._processes,
                    n_workers=self._n_workers,
                    threads_per_worker=1,
                    dashboard_address=None,
                )
            self._owns_client = True
        return self._client

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        client = self.client
        pending: deque[tuple[Any, Any]] = deque()
        remaining = iter(self.paths)

        def submit_next() -> None:
            for path in remaining:
                # pure=False: the same path listed twice is loaded twice, as asked.
                pending.append((path, client.submit(self.load, path, pure=False)))
                return

        for _ in range(self.depth):
            submit_next()
        while pending:
            path, future = pending.popleft()
            try:
                result: Any = future.result()
            except Exception as e:  # handed back to the caller, not fatal for the others
                result = e
            future.release()
            # Refill before yielding so the next loads run while the caller works on this one.
            submit_next()
            yield path, result

    def close(self) -> None:
        """Close the client if this prefetcher started it."""
        if self._owns_client and self._client is not None:
            self._client.close()
            self._client = None
            self._owns_client = False
