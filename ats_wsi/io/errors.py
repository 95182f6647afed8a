"""Slide I/O exceptions.

Every message names the file and the problem, so a failure inside a batch job over thousands of
slides says which slide to look at. The classes also derive from the matching built-in error, so
callers that already catch ``FileNotFoundError`` / ``ValueError`` keep working.
"""

from __future__ import annotations

from os import PathLike

__all__ = [
    "CorruptSlideError",
    "MissingResolutionError",
    "NoTissueError",
    "SlideError",
    "SlideNotFoundError",
    "SlideTooLargeError",
    "SlideTooSmallError",
    "UnsupportedSlideError",
]


class SlideError(Exception):
    """Base class of slide I/O errors; ``path`` is the slide concerned (or None)."""

    def __init__(self, path: str | PathLike[str] | None, problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        where = "<in-memory slide>" if path is None else str(path)
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[type[SlideError], tuple[str | None, str]]:
        # Default exception pickling replays ``args`` (the joined message) into __init__, which
        # takes (path, problem); dask ships exceptions between processes, so keep them intact.
        return (type(self), (self.path, self.problem))


class SlideNotFoundError(SlideError, FileNotFoundError):
    """The slide path does not exist."""


class UnsupportedSlideError(SlideError, ValueError):
    """Not a slide or image format any backend reads (or the requested backend cannot)."""


class CorruptSlideError(SlideError, OSError):
    """The file looks like a supported format but cannot be decoded (truncated, damaged)."""


class MissingResolutionError(SlideError, ValueError):
    """The slide has no microns-per-pixel metadata and none was given by the user."""


class SlideTooLargeError(SlideError, ValueError):
    """A plain (non-pyramidal) image too large to read without a pyramid; ``limit`` is the
    largest pixel count accepted."""

    def __init__(
        self, path: str | PathLike[str] | None, problem: str, limit: int | None = None
    ) -> None:
        super().__init__(path, problem)
        self.limit = limit

    def __reduce__(self) -> tuple[type[SlideError], tuple[str | None, str, int | None]]:
        return (type(self), (self.path, self.problem, self.limit))


class NoTissueError(SlideError, ValueError):
    """The tissue mask of the slide is empty."""


class SlideTooSmallError(SlideError, ValueError):
    """The slide is smaller than what was asked of it (a patch, a low-resolution view)."""
