"""The ``torchvision_resnet`` feature net: a torchvision ResNet-18/34/50 with ImageNet weights
from a local file, as a :class:`~ats_wsi.encoders.protocol.PatchEncoder`.

A whole non-timm encoder in one file, the example of docs/encoders.md ("Adding an encoder")::

    feature_net: {name: torchvision_resnet, arch: resnet50, weights: /models/resnet50-0676ba61.pth}

* architecture: ``torchvision.models.<arch>(weights=None)`` with ``fc`` replaced by an identity,
  so the output is the global-average-pooled last stage (512 / 512 / 2048 features);
* weights: a local file only, torchvision's own layout (a plain state dict, ``.pth``) or the same
  tensors as ``.safetensors``; the classifier ``fc.*`` is dropped by declaration, anything else
  must match strictly. Hub names, torchvision enum names (``IMAGENET1K_V1``) and URLs are refused
  with a message naming the file to download;
* input: [0, 1] RGB patches of any size, resized to ``input_size`` (bilinear, antialiased) and
  normalised with the ImageNet mean/std inside (``normalizes_input = True``); output
  L2-normalised;
* frozen by default (``fully_frozen``: eval mode always, no gradients); ``freeze: false`` trains
  it all;
* ``encoder_id`` = ``torchvision-<arch>@<input_size>:<first 12 hex of the file's sha256>``; a
  checkpoint references the file by path + sha256 (plus the tensors when it was trained).

torchvision is imported when the encoder is built, never by ``import ats_wsi``.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_wsi.encoders.presets import IMAGENET_MEAN, IMAGENET_STD
from ats_wsi.encoders.protocol import ENCODER_STATE_FORMAT, prepare_input
from ats_wsi.encoders.weights import (
    EncoderWeightsError,
    EncoderWeightsMissingError,
    add_missing_bn_counters,
    check_state_dict,
    check_weights_reference,
    file_sha256,
    load_weights_file,
    resolve_weights_path,
)

__all__ = ["ARCHS", "TorchvisionResNetEncoder", "build_torchvision_resnet"]

ARCHS: dict[str, str] = {
    "resnet18": "resnet18-f37072fd.pth",
    "resnet34": "resnet34-b627a593.pth",
    "resnet50": "resnet50-0676ba61.pth",
}
"""Supported architectures and torchvision's ImageNet (IMAGENET1K_V1) weight file of each."""

_DOWNLOADS = "https://download.pytorch.org/models/"
_ENUM_RE = re.compile(r"^(?:ResNet\d+_Weights\.)?(?:IMAGENET1K_V\d+|DEFAULT)$")


def _hint(arch: str) -> str:
    return (
        f"{ARCHS[arch]} (torchvision's ImageNet weights, {_DOWNLOADS}{ARCHS[arch]}; a torchvision "
        "that downloaded it keeps it in ~/.cache/torch/hub/checkpoints/)"
    )


class TorchvisionResNetEncoder(nn.Module):
    """A torchvision ResNet without its classifier: [0, 1] RGB (M, 3, p, p) -> L2-normalised
    (M, out_dim). Build it with :func:`build_torchvision_resnet`."""

    normalizes_input = True

    def __init__(
        self,
        model: nn.Module,
        *,
        arch: str,
        out_dim: int,
        input_size: int,
        weights_path: str,
        weights_sha256: str,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(freeze, bool):
            raise ValueError(f"torchvision_resnet: freeze must be true or false, got {freeze!r}")
        self.model = model
        self.out_dim = int(out_dim)
        self.input_size = int(input_size)
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.encoder_id = f"torchvision-{arch}@{self.input_size}:{weights_sha256[:12]}"
        # What a checkpoint records to rebuild the encoder (beside the weights reference).
        self.config = {
            "name": "torchvision_resnet",
            "build": {"arch": arch, "input_size": self.input_size, "freeze": freeze},
        }
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.fully_frozen = freeze
        for p in self.model.parameters():
            p.requires_grad_(not freeze)
        self.train(False)

    def train(self, mode: bool = True) -> TorchvisionResNetEncoder:
        """Frozen: always eval (BatchNorm statistics never move)."""
        return super().train(bool(mode) and not self.fully_frozen)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters fine-tuning updates (empty when frozen)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def preprocess(self, x: Tensor) -> Tensor:
        """[0, 1] (or uint8) patches -> resized, ImageNet-normalised network input."""
        return prepare_input(x, self.input_size, self.mean, self.std, "torchvision_resnet")

    def embed(self, x: Tensor) -> Tensor:
        """Pooled, un-normalised features of preprocessed input (torchvision's with fc=Identity)."""
        return self.model(x)

    def forward(self, x: Tensor) -> Tensor:
        grad = torch.no_grad() if self.fully_frozen else contextlib.nullcontext()
        with grad:
            f = self.embed(self.preprocess(x))
        return F.normalize(f.float(), p=2.0, dim=1)

    def checkpoint_state(self) -> dict[str, Any]:
        """The file by reference (path + sha256); the tensors too when the encoder trains."""
        tensors = None
        if not self.fully_frozen:
            tensors = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return {
            "format": ENCODER_STATE_FORMAT,
            "encoder_id": self.encoder_id,
            "config": dict(self.config),
            "weights": {"path": self.weights_path, "sha256": self.weights_sha256},
            "state_dict": tensors,
        }

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Check the file's hash against the checkpoint's, load stored (trained) tensors."""
        check_weights_reference(state.get("weights"), self.weights_path, self.weights_sha256)
        if state.get("state_dict"):
            self.model.load_state_dict(dict(state["state_dict"]), strict=True)

    def extra_repr(self) -> str:
        return f"encoder_id={self.encoder_id!r}, out_dim={self.out_dim}"


def build_torchvision_resnet(
    arch: str = "resnet50",
    weights: str | os.PathLike[str] | None = None,
    freeze: bool = True,
    input_size: int = 224,
    in_channels: int = 3,
) -> TorchvisionResNetEncoder:
    """The ``torchvision_resnet`` feature net.

    Args:
        arch: ``resnet18``, ``resnet34`` or ``resnet50``.
        weights: a local torchvision state dict (``.pth``) or ``.safetensors`` file, or a folder
            holding exactly one; required (nothing is downloaded).
        freeze: true (default): frozen and cacheable; false: every parameter trains.
        input_size: side patches are resized to before the network.
        in_channels: must be 3 (RGB).
    """
    if in_channels != 3:
        raise ValueError(f"torchvision_resnet takes RGB patches (in_channels=3), got {in_channels}")
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; available: {', '.join(ARCHS)}")
    todo = f"download {_hint(arch)} yourself and set feature_net.weights to its local path"
    if weights is None:
        raise EncoderWeightsMissingError(f"torchvision_resnet {arch} needs weights: {todo}")
    if _ENUM_RE.match(os.fspath(weights)):
        raise EncoderWeightsError(
            f"weights {os.fspath(weights)!r} is a torchvision weights name; ats_wsi never "
            f"downloads at run time: {todo}"
        )
    path = resolve_weights_path(weights, _hint(arch))  # refuses hub names and URLs
    import torchvision

    with torch.device("meta"):  # no random init; the file's tensors are assigned below
        model = getattr(torchvision.models, arch)(weights=None)
    out_dim = int(model.fc.in_features)
    model.fc = nn.Identity()
    sd = add_missing_bn_counters(model, load_weights_file(path))
    dropped = check_state_dict(model, sd, str(path), ignore_prefixes=("fc.",))
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items() if k not in dropped}
    model.load_state_dict(sd, strict=True, assign=True)
    return TorchvisionResNetEncoder(
        model,
        arch=arch,
        out_dim=out_dim,
        input_size=input_size,
        weights_path=str(path),
        weights_sha256=file_sha256(path),
        freeze=freeze,
    )
