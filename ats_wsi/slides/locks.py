"""Several jobs, one output folder: per-slide claims and an exclusive file lock.

A job claims a slide before predicting it by creating ``<out>/locks/<slide_id>.lock`` with
``O_CREAT | O_EXCL`` (atomic, also on NFS v3+), holding its host, pid and start time. While it
holds claims, a heartbeat thread touches them; a claim whose heartbeat is older than
``stale_after_s``, or whose process is gone on this host, is stale and may be taken over.
A takeover happens under :func:`exclusive` on ``locks/.takeover`` so that two jobs never both
replace the same stale claim. Claims are released (deleted) once the slide's row is in the CSV.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from os import PathLike
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_STALE_AFTER_S", "SlideClaims", "exclusive", "lock_name"]

DEFAULT_STALE_AFTER_S = 600.0
"""A claim not refreshed for this long belongs to a dead or hung job."""


@contextlib.contextmanager
def exclusive(path: str | PathLike[str]) -> Iterator[None]:
    """Hold ``fcntl.flock(LOCK_EX)`` on ``path`` (created if needed) for the block.

    flock locks an open file description, so it also excludes threads of one process that
    open the file separately.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        # Closing the descriptor releases the lock.
        os.close(fd)


def lock_name(slide_id: str) -> str:
    """A file name for ``slide_id`` (path separators and leading dots made harmless)."""
    safe = "".join(c if c.isalnum() or c in "-_.+=@" else "_" for c in slide_id)
    return f"{safe.lstrip('.') or '_'}.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class SlideClaims:
    """The claims one job holds in ``out_dir/locks``.

    Args:
        out_dir: the shared output folder.
        stale_after_s: heartbeat age after which another job may take a claim over.
        heartbeat_s: how often held claims are touched (default ``stale_after_s / 10``,
            at most 30 s).
    """

    def __init__(
        self,
        out_dir: str | PathLike[str],
        stale_after_s: float = DEFAULT_STALE_AFTER_S,
        heartbeat_s: float | None = None,
    ) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s}")
        self.dir = Path(out_dir) / "locks"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stale_after_s = float(stale_after_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else min(30.0, stale_after_s / 10)
        self.host = socket.gethostname()
        # Written into every claim so that a job never deletes a claim taken over from it.
        self.token = uuid.uuid4().hex
        self.held: dict[str, Path] = {}
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def path(self, slide_id: str) -> Path:
        """The lock file of ``slide_id``."""
        return self.dir / lock_name(slide_id)

    def _create(self, slide_id: str) -> bool:
        path = self.path(slide_id)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        info = {
            "slide_id": slide_id,
            "host": self.host,
            "pid": os.getpid(),
            "token": self.token,
            "time": time.time(),
        }
        with os.fdopen(fd, "w") as fh:
            json.dump(info, fh)
        with self._mutex:
            self.held[slide_id] = path
        self._start_heartbeat()
        return True

    def owner(self, slide_id: str) -> dict[str, Any] | None:
        """What the lock file of ``slide_id`` says (None if there is none or it is unreadable)."""
        try:
            return json.loads(self.path(slide_id).read_text())
        except (OSError, ValueError):
            return None

    def is_stale(self, slide_id: str, max_age_s: float | None = None) -> bool:
        """Whether the claim on ``slide_id`` is abandoned: its heartbeat is older than
        ``max_age_s`` (default ``stale_after_s``), or it was made on this host by a process
        that no longer runs."""
        path = self.path(slide_id)
        try:
            age = time.time() - path.stat().st_mtime
        except FileNotFoundError:
            return False
        if age > (self.stale_after_s if max_age_s is None else max_age_s):
            return True
        owner = self.owner(slide_id)
        if owner and owner.get("host") == self.host and isinstance(owner.get("pid"), int):
            return owner["pid"] != os.getpid() and not _pid_alive(owner["pid"])
        # A lock being written (empty for an instant) or from another host: not ours to judge.
        return False

    def claim(self, slide_id: str) -> bool:
        """Claim ``slide_id``; False when another live job holds it."""
        if slide_id in self.held:
            return True
        if self._create(slide_id):
            return True
        if not self.is_stale(slide_id):
            return False
        with exclusive(self.dir / ".takeover"):
            # Re-checked under the lock: another job may have taken it over meanwhile.
            if self.path(slide_id).exists() and not self.is_stale(slide_id):
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path(slide_id).unlink()
            return self._create(slide_id)

    def owns(self, slide_id: str) -> bool:
        """Whether the claim file of ``slide_id`` is this job's (not taken over since)."""
        owner = self.owner(slide_id)
        return owner is not None and owner.get("token") == self.token

    def release(self, slide_id: str) -> None:
        """Delete the claim if this job still holds it."""
        with self._mutex:
            path = self.held.pop(slide_id, None)
        if path is not None and self.owns(slide_id):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def release_all(self) -> None:
        """Release every claim this job holds and stop the heartbeat."""
        for slide_id in list(self.held):
            self.release(slide_id)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def clear_stale(self, max_age_s: float | None = None) -> list[str]:
        """Delete abandoned claims (see :meth:`is_stale`); returns their slide ids.

        ``max_age_s`` defaults to two heartbeats: a claim whose heartbeat has stopped, which a
        live job never leaves. Use it after a crash instead of waiting ``stale_after_s``.
        """
        age = 2 * self.heartbeat_s + 1 if max_age_s is None else max_age_s
        cleared = []
        with exclusive(self.dir / ".takeover"):
            for path in sorted(self.dir.glob("*.lock")):
                # The stem is the sanitised id, which lock_name maps to the same file.
                slide_id = path.stem
                if slide_id not in self.held and self.is_stale(slide_id, age):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                    cleared.append(slide_id)
        return cleared

    def _start_heartbeat(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="slide-claims", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with self._mutex:
                held = list(self.held.items())
            for slide_id, path in held:
                if self.owns(slide_id):
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(path)

    def __enter__(self) -> SlideClaims:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release_all()
