"""Checkpoints, JSON-lines metrics logs and atomic writes.

Checkpoints are written atomically (temp file + ``os.replace``) and hold only plain data and
tensors, so :func:`load_checkpoint` reads them with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "CHECKPOINT_FORMAT",
    "ResumeState",
    "append_jsonl",
    "atomic_write_bytes",
    "atomic_write_text",
    "library_versions",
    "load_checkpoint",
    "load_model_state",
    "model_state",
    "read_jsonl",
    "resume",
    "save_checkpoint",
    "truncate_jsonl",
]

CHECKPOINT_FORMAT = 1


def library_versions() -> dict[str, str]:
    """Versions recorded in checkpoints and results."""
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "ats_wsi": _ats_version(),
    }


def _ats_version() -> str:
    from ats_wsi import __version__

    return __version__


# ----------------------------------------------------------------------------- JSON lines


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON object as a line (flushed and fsynced: a crash loses at most it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file ([] if it does not exist; a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # interrupted while writing the last line
            raise ValueError(f"{path}: line {n + 1} is not JSON") from None
    return out


def atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temp file in the same folder and ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` through :func:`atomic_write_bytes`: a reader (another rank, another job)
    sees the old file or the whole new one, never a partial one. Newlines are written as given."""
    path = Path(path)
    data = text.encode(encoding)
    atomic_write_bytes(path, lambda fh: fh.write(data))
    return path


def truncate_jsonl(path: str | Path, max_epoch: int) -> int:
    """Drop records whose ``epoch`` is greater than ``max_epoch`` (atomically); return kept."""
    path = Path(path)
    records = read_jsonl(path)
    kept = [r for r in records if int(r.get("epoch", -1)) <= max_epoch]
    if len(kept) != len(records) or path.exists():
        text = "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")
        atomic_write_bytes(path, lambda fh: fh.write(text))
    return len(kept)


# ----------------------------------------------------------------------------- checkpoints


def _plain(obj: Any, where: str = "state") -> Any:
    """Copy ``obj`` keeping only what ``torch.load(weights_only=True)`` accepts.

    Dict subclasses (e.g. the ``Counter`` in ``MultiStepLR``'s state) become dicts, subclasses
    of str / int / float their base type, sets sorted lists; anything else unknown is an
    error naming where it was found.
    """
    if obj is None or type(obj) in (bool, int, float, str, torch.dtype, torch.Size):
        return obj
    if isinstance(obj, Tensor):
        return obj
    # Subclasses (torch.__version__ is a str subclass, IntEnum an int one) are not allowed.
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, Mapping):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a weights-only checkpoint")


def _encoders(model: nn.Module) -> dict[str, Any]:
    # The PatchEncoder protocol check imports no timm: cheap for plain models.
    from ats_wsi.encoders.protocol import encoder_modules

    return encoder_modules(model)


def model_state(model: nn.Module) -> dict[str, Any]:
    """``{"model": state_dict}`` and, for models holding pretrained encoders, ``"encoders"``:
    a frozen encoder built from a weights file is referenced by path + sha256 instead of
    stored (:meth:`ats_wsi.encoders.PatchEncoder.checkpoint_state`)."""
    encoders = _encoders(model)
    if not encoders:
        return {"model": model.state_dict()}
    from ats_wsi.encoders.protocol import strip_encoder_tensors

    return {
        "model": strip_encoder_tensors(model.state_dict(), model),
        "encoders": {name: net.checkpoint_state() for name, net in encoders.items()},
    }


def load_model_state(model: nn.Module, ckpt: Mapping[str, Any]) -> None:
    """Load what :func:`model_state` stored into a model built from the same config (strict:
    every tensor is accounted for; an encoder's weights file must have the recorded hash)."""
    encoders = _encoders(model)
    if not encoders:
        model.load_state_dict(ckpt["model"])
        return
    stored = ckpt.get("encoders") or {}
    missing = sorted(set(encoders) - set(stored))
    if missing:
        raise ValueError(f"checkpoint has no encoder state for {missing}")
    prefixes = tuple(f"{name}." for name in encoders)
    result = model.load_state_dict(ckpt["model"], strict=False)
    absent = [k for k in result.missing_keys if not k.startswith(prefixes)]
    if absent or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not match the model: missing {absent[:4]}, "
            f"unexpected {list(result.unexpected_keys)[:4]}"
        )
    for name, net in encoders.items():
        net.load_checkpoint_state(stored[name])


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int,
    config: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a weights-only-loadable checkpoint after ``epoch`` (1-based).

    Stored: model, optimizer and scheduler ``state_dict``s, ``epoch``, ``config`` (plain
    data), library versions, torch's global CPU RNG state and the states of ``generators``
    (e.g. the DataLoader's shuffling generator), plus ``extra``.
    """
    path = Path(path)
    payload = _plain(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": int(epoch),
            **model_state(model),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "config": dict(config or {}),
            "versions": library_versions(),
            "rng": {
                "torch": torch.get_rng_state(),
                **{k: g.get_state() for k, g in (generators or {}).items()},
            },
            "extra": dict(extra or {}),
        }
    )
    atomic_write_bytes(path, lambda fh: torch.save(payload, fh))
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a format check."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an ats_wsi checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


@dataclass
class ResumeState:
    """Where to continue: the next epoch (1-based) and what the checkpoint carried."""

    start_epoch: int
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def resume(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    log_path: str | Path | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    map_location: Any = "cpu",
) -> ResumeState:
    """Restore states from ``path`` and return the epoch to start from.

    Log lines written after the checkpoint (by a run that died before its next checkpoint)
    are dropped from ``log_path``, so the resumed run does not duplicate them.
    """
    ckpt = load_checkpoint(path, map_location)
    load_model_state(model, ckpt)
    if optimizer is not None and ckpt["optimizer"] is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    for name, gen in (generators or {}).items():
        if name in rng:
            gen.set_state(rng[name])
    epoch = int(ckpt["epoch"])
    if log_path is not None:
        truncate_jsonl(log_path, epoch)
    return ResumeState(epoch + 1, ckpt.get("config", {}), ckpt.get("extra", {}))
