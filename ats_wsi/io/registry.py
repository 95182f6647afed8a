"""The backend registry: which reader opens a path, and :func:`open_slide`.

Backends join with :func:`register_backend`; the built-in ones register in
:mod:`ats_wsi.io.backends`, which ``import ats_wsi.io`` runs (and Python runs a package before
any of its modules, so every user of this registry sees them). This module imports no backend.

A path goes to the backend whose registered suffix its name ends with (longest first), else to
the first backend whose ``detect`` accepts the file (an OME-Zarr store without the suffix, a
TIFF OpenSlide does not read), else to :data:`DEFAULT_BACKEND`. The default backend's own
suffixes do not route by name: they would send it every TIFF before ``detect`` could look.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ats_wsi.io.base import SlideReader, existing_path
from ats_wsi.io.errors import MissingResolutionError, UnsupportedSlideError
from ats_wsi.io.mpp import MppSpec, PathLikeStr

__all__ = [
    "BACKENDS",
    "DEFAULT_BACKEND",
    "SUFFIX_BACKENDS",
    "SlideFactory",
    "backend_for",
    "open_slide",
    "register_backend",
    "slide_suffixes",
    "unregister_backend",
]

SlideFactory = Callable[..., SlideReader]
Detector = Callable[[Path], bool]

BACKENDS: dict[str, SlideFactory] = {}
"""Backend name -> factory ``(path, mpp=None, objective_power=None) -> SlideReader``."""

SUFFIX_BACKENDS: dict[str, str] = {}
"""Lower-case name suffix -> backend; anything else is detected or goes to the default."""

BACKEND_SUFFIXES: dict[str, tuple[str, ...]] = {}
"""Backend name -> the lower-case suffixes it reads (what a slide folder scan accepts)."""

DETECTORS: dict[str, Detector] = {}
"""Backend name -> content test for paths that no suffix routes."""

DEFAULT_BACKEND = "openslide"


def register_backend(
    name: str,
    factory: SlideFactory,
    suffixes: Sequence[str] = (),
    detect: Detector | None = None,
) -> None:
    """Add (or replace) a backend.

    Args:
        name: what ``open_slide(..., backend=name)`` takes.
        factory: ``(path, mpp=None, objective_power=None) -> SlideReader``.
        suffixes: file-name suffixes it reads (".svs", ".ome.zarr"): they route paths to it
            (unless it is the default backend) and :func:`slide_suffixes` lists them.
        detect: ``(path) -> bool`` for its files that no suffix routes.
    """
    unregister_backend(name)
    BACKENDS[name] = factory
    lowered = tuple(dict.fromkeys(s.lower() for s in suffixes))
    BACKEND_SUFFIXES[name] = lowered
    if name != DEFAULT_BACKEND:
        for suffix in lowered:
            SUFFIX_BACKENDS[suffix] = name
    if detect is not None:
        DETECTORS[name] = detect


def unregister_backend(name: str) -> None:
    """Remove a backend, its suffixes and its detector (nothing happens for an unknown name)."""
    BACKENDS.pop(name, None)
    BACKEND_SUFFIXES.pop(name, None)
    DETECTORS.pop(name, None)
    for suffix in [s for s, b in SUFFIX_BACKENDS.items() if b == name]:
        del SUFFIX_BACKENDS[suffix]


def slide_suffixes() -> tuple[str, ...]:
    """Every suffix a registered backend reads, lower-case, in registration order."""
    return tuple(dict.fromkeys(s for suffixes in BACKEND_SUFFIXES.values() for s in suffixes))


def backend_for(path: PathLikeStr) -> str:
    """Backend name :func:`open_slide` would use for ``path``."""
    p = Path(path)
    name = p.name.lower()
    # Longest suffix first so ".ome.zarr"-style entries beat ".zarr".
    for suffix in sorted(SUFFIX_BACKENDS, key=len, reverse=True):
        if name.endswith(suffix):
            return SUFFIX_BACKENDS[suffix]
    for backend, detect in DETECTORS.items():
        if detect(p):
            return backend
    return DEFAULT_BACKEND


def _tagged(reader: SlideReader, source: str) -> SlideReader:
    reader.mpp_source = source  # type: ignore[attr-defined] - every BaseSlideReader has it
    return reader


def open_slide(
    path: PathLikeStr,
    backend: str | None = None,
    mpp: float | tuple[float, float] | MppSpec | None = None,
    objective_power: float | None = None,
) -> SlideReader:
    """Open a slide with the backend registered for its path (or the one named).

    Args:
        path: slide file, or OME-Zarr directory.
        backend: a key of :data:`BACKENDS`; None picks one from the path.
        mpp: level-0 microns per pixel overriding the file's metadata, or an :class:`MppSpec`
            (metadata first, the user's value as fallback or, with ``override``, instead).
        objective_power: used as mpp = 10 / power when ``mpp`` is not given.

    Raises:
        SlideNotFoundError, UnsupportedSlideError, CorruptSlideError, MissingResolutionError,
        SlideTooLargeError.
    """
    p = existing_path(path)
    name = backend if backend is not None else backend_for(p)
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise UnsupportedSlideError(
            p, f"unknown backend {name!r}; known: {sorted(BACKENDS)}"
        ) from None
    if not isinstance(mpp, MppSpec):
        given = mpp is not None or objective_power is not None
        reader = factory(p, mpp=mpp, objective_power=objective_power)
        return _tagged(reader, "override" if given else "metadata")
    value, source = mpp.user_value(p)
    if value is not None and mpp.override:
        return _tagged(factory(p, mpp=value), "override")
    try:
        return _tagged(factory(p), "metadata")
    except MissingResolutionError:
        # Only slides without metadata pay for this second open.
        if value is not None:
            return _tagged(factory(p, mpp=value), source)
        if mpp.allow_missing:
            return _tagged(factory(p, mpp=1.0), "none")
        raise
