"""The level-0 resolution policy: where a slide's microns per pixel come from.

The file's metadata wins unless the caller overrides it; an :class:`MppSpec` says what to use
when the file has none (a manifest column, a command-line default) and whether the user's value
should win anyway. :data:`MPP_SOURCES` names where a reader's mpp came from.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cached_property
from os import PathLike

import numpy as np

from ats_wsi.io.errors import MissingResolutionError

__all__ = [
    "MPP_SOURCES",
    "NO_MPP_HELP",
    "MppSpec",
    "PathLikeStr",
    "resolve_mpp",
    "slide_key",
]

PathLikeStr = str | PathLike[str]

MPP_SOURCES = ("metadata", "manifest", "cli", "override", "none")
"""Where a reader's level-0 mpp came from (``none``: pixel units, for conversion only)."""

NO_MPP_HELP = (
    "no microns-per-pixel metadata; give the level-0 resolution with --mpp UM_PER_PX "
    "(command line), an 'mpp' or 'magnification' manifest column, or mpp=... (Python)"
)


def _positive(value: float, what: str, path: object) -> float:
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{path}: {what} must be positive, got {value!r}")
    return v


def slide_key(path: PathLikeStr) -> str:
    """The key a per-slide table uses for ``path`` (absolute, normalised)."""
    return os.path.abspath(os.fspath(path))


@dataclass(frozen=True)
class MppSpec:
    """How :func:`open_slide` picks a slide's level-0 mpp when its file may lack one.

    The file's metadata wins, unless ``override`` is set and the user gave a value. The user's
    value is the slide's entry in ``per_slide`` (from a manifest), else ``default`` (e.g.
    ``--mpp``, reported as ``default_source``). ``allow_missing`` opens a slide that has
    neither in pixel units (mpp 1, ``mpp_source`` ``none``): conversion needs no microns.

    Attributes:
        default: mpp for slides without metadata or a per-slide value.
        override: the user's value replaces the metadata.
        per_slide: ``(slide_key(path), mpp)`` pairs.
        default_source: what ``mpp_source`` says when ``default`` is used.
        allow_missing: open slides without any mpp in pixel units instead of raising.
    """

    default: float | None = None
    override: bool = False
    per_slide: tuple[tuple[str, float], ...] = ()
    default_source: str = "cli"
    allow_missing: bool = False

    def __post_init__(self) -> None:
        if self.default is not None:
            _positive(self.default, "mpp", "<default>")
        for key, value in self.per_slide:
            _positive(value, "mpp", key)
        if self.default_source not in MPP_SOURCES:
            raise ValueError(f"default_source must be one of {MPP_SOURCES}")

    @cached_property
    def _table(self) -> dict[str, float]:
        return dict(self.per_slide)

    def user_value(self, path: PathLikeStr) -> tuple[float | None, str]:
        """(the user's mpp for ``path`` or None, and where it comes from)."""
        value = self._table.get(slide_key(path))
        if value is not None:
            return float(value), "manifest"
        if self.default is not None:
            return float(self.default), self.default_source
        return None, ""


def resolve_mpp(
    path: PathLikeStr | None,
    metadata_mpp: tuple[float, float] | None,
    mpp: float | tuple[float, float] | None = None,
    objective_power: float | None = None,
) -> tuple[float, float]:
    """Level-0 (x, y) microns per pixel from the user's values or the file's metadata.

    What the user passes wins: ``mpp`` first, then ``objective_power`` (mpp = 10 / power, the
    usual 10x ~ 1 um/px convention), then the file's metadata.

    Raises:
        MissingResolutionError: none of the three is available.
        ValueError: a given value is not a positive finite number.
    """
    if mpp is not None:
        pair = (float(mpp), float(mpp)) if np.isscalar(mpp) else tuple(float(v) for v in mpp)
        if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
            raise ValueError(f"{path}: mpp must be positive, got {mpp!r}")
        return (pair[0], pair[1])
    if objective_power is not None:
        if not (math.isfinite(objective_power) and objective_power > 0):
            raise ValueError(f"{path}: objective_power must be positive, got {objective_power!r}")
        value = 10.0 / float(objective_power)
        return (value, value)
    if metadata_mpp is not None and all(math.isfinite(v) and v > 0 for v in metadata_mpp):
        return (float(metadata_mpp[0]), float(metadata_mpp[1]))
    raise MissingResolutionError(path, NO_MPP_HELP)
