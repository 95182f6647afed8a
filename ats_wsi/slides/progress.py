"""Progress bars for slide loops (tqdm: slides done, slides/s, ETA).

Bars go to stderr and are shown only on a terminal unless asked for, so logs and tests stay
clean.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["progress_bar", "slide_progress"]


def progress_bar(total: int, desc: str, enabled: bool | None = None, unit: str = "slide") -> Any:
    """A tqdm bar of ``total`` ``unit``s; ``enabled`` None: only when stderr is a terminal."""
    from tqdm.auto import tqdm

    disable = (not sys.stderr.isatty()) if enabled is None else not enabled
    return tqdm(total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, leave=False)


def slide_progress(
    desc: str, total: int, enabled: bool | None = None
) -> Callable[[Iterable[Any]], Iterable[Any]]:
    """What :func:`~ats_wsi.slides.engine.run_slides` takes as ``progress``: wraps its stream
    of slides in a bar."""

    def wrap(stream: Iterable[Any]) -> Iterable[Any]:
        bar = progress_bar(total, desc, enabled)
        try:
            for item in stream:
                yield item
                bar.update(1)
        finally:
            bar.close()

    return wrap
