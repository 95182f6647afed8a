"""The ``timm`` feature net: a timm architecture with locally held weights as a
:class:`~ats_wsi.encoders.protocol.PatchEncoder`.

* the architecture comes from ``timm.create_model(arch, pretrained=False, num_classes=0,
  **kwargs)`` (or from a :data:`~ats_wsi.encoders.presets.PRESETS` entry holding the exact
  arguments of a published encoder), the weights from a local file the user downloaded;
  nothing is ever fetched;
* it takes [0, 1] RGB patches of any size, resizes them to the encoder's input size (bilinear,
  antialiased), applies the encoder's own mean/std, pools and L2-normalises
  (``normalizes_input = True``);
* ``encoder_id`` names architecture + input size + weights hash, for feature caches and
  checkpoints.

:func:`build_timm_encoder` runs three steps: :func:`resolve_encoder_spec` (arguments + preset
-> what to build and which file), :func:`load_encoder_weights` (the timm model with the file's
weights) and :func:`build_encoder` (input size, normalisation, pooling, ``encoder_id``).
timm is imported on use only.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_wsi.encoders.device import cuda_autocast
from ats_wsi.encoders.keymaps import KEY_MAP_DROPS, KEY_MAPS
from ats_wsi.encoders.presets import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    NOT_EXPRESSIBLE,
    PRESETS,
    EncoderPreset,
)
from ats_wsi.encoders.protocol import ENCODER_STATE_FORMAT, prepare_input
from ats_wsi.encoders.timm_models import create_timm_model, model_blocks
from ats_wsi.encoders.weights import (
    EncoderHashMismatchError,
    EncoderWeightsError,
    EncoderWeightsMissingError,
    _package_weights,
    _where_hint,
    add_missing_bn_counters,
    check_state_dict,
    check_weights_reference,
    file_sha256,
    load_weights_file,
    resolve_weights_path,
)

__all__ = [
    "TimmEncoder",
    "TimmEncoderSpec",
    "build_encoder",
    "build_timm_encoder",
    "load_encoder_weights",
    "resolve_encoder_spec",
    "restore_encoder",
]


def _hash_tensors(sd: Mapping[str, Tensor]) -> str:
    h = hashlib.sha256()
    for k, v in sd.items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class TimmEncoder(nn.Module):
    """A timm model as an ATS feature net: [0, 1] RGB (M, 3, p, p) -> L2-normalised (M, out_dim).

    Patches whose side is not ``input_size`` are resized (bilinear, antialiased); the encoder's
    ``mean`` / ``std`` are applied here (``normalizes_input = True``). ``pooling``: ``model``
    (the timm model's own pooled output), ``avg`` (global average of the last feature map of a
    ``features_only`` net) or ``cls_mean`` (class token concatenated with the mean of the patch
    tokens, prefix tokens excluded). Build it with :func:`build_timm_encoder`.

    Freezing: ``freeze=True`` freezes every parameter, keeps the module in eval mode whatever
    the parent does and runs the forward under ``torch.no_grad``; ``freeze=n`` leaves the last
    ``n`` blocks (and the layers after them) trainable, the frozen part staying in eval mode;
    ``freeze=False`` trains everything. On CUDA the forward runs under bf16 autocast
    (``cuda_bf16``) and returns float32.
    """

    normalizes_input = True

    def __init__(
        self,
        model: nn.Module,
        *,
        out_dim: int,
        input_size: int | None,
        mean: Sequence[float],
        std: Sequence[float],
        pooling: str,
        encoder_id: str,
        freeze: bool | int = True,
        config: Mapping[str, Any] | None = None,
        weights_path: str | None = None,
        weights_sha256: str | None = None,
        dropped_keys: Sequence[str] = (),
        cuda_bf16: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in ("model", "avg", "cls_mean"):
            raise ValueError(f"unknown pooling {pooling!r}; use model, avg or cls_mean")
        self.model = model
        self.out_dim = int(out_dim)
        self.input_size = None if input_size is None else int(input_size)
        self.pooling = pooling
        self.encoder_id = encoder_id
        self.config = dict(config or {})
        self.weights_path = weights_path
        self.weights_sha256 = weights_sha256
        self.dropped_keys = list(dropped_keys)
        self.cuda_bf16 = bool(cuda_bf16)
        self.register_buffer(
            "mean",
            torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1),
            persistent=False,
        )
        self.register_buffer(
            "std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False
        )
        self.freeze = freeze
        self._frozen_modules: list[nn.Module] = []
        self._apply_freeze(freeze)
        self.train(False)

    # -- freezing
    def _apply_freeze(self, freeze: bool | int) -> None:
        if isinstance(freeze, bool):
            n = None if freeze else 0
        elif isinstance(freeze, int) and freeze >= 0:
            n = freeze if freeze > 0 else None
        else:
            raise ValueError(f"freeze must be true, false or a block count >= 0, got {freeze!r}")
        params = list(self.model.named_parameters())
        if n is None:  # fully frozen
            trainable: set[str] = set()
        elif n == 0 or freeze is False:
            trainable = {k for k, _ in params}
        else:
            units = model_blocks(self.model)
            if n > len(units):
                raise ValueError(f"freeze: {n} but the encoder has only {len(units)} blocks")
            first = {id(p) for p in units[-n].parameters()}
            start = next(i for i, (_, p) in enumerate(params) if id(p) in first)
            trainable = {k for k, _ in params[start:]}
        for k, p in params:
            p.requires_grad_(k in trainable)
        self.fully_frozen = not trainable
        self._frozen_modules = [
            m
            for m in self.model.modules()
            if any(True for _ in m.parameters(recurse=False))
            and not any(p.requires_grad for p in m.parameters(recurse=False))
        ]

    def train(self, mode: bool = True) -> TimmEncoder:
        """Fully frozen: always eval. Partly frozen: the frozen modules stay in eval."""
        super().train(bool(mode) and not self.fully_frozen)
        for m in self._frozen_modules:
            m.train(False)
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters fine-tuning updates (empty when fully frozen)."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # -- checkpoints (PatchEncoder)
    def checkpoint_state(self) -> dict[str, Any]:
        """What an ATS checkpoint stores for this encoder.

        Built from a weights file and fully frozen: *referenced* (config + path + sha256, no
        tensors). (Partly) trainable: its trainable parameters and all buffers on top of that
        reference. Randomly initialised: its whole state dict.
        """
        ref = (
            {"path": self.weights_path, "sha256": self.weights_sha256}
            if self.weights_path is not None
            else None
        )
        sd = self.model.state_dict()
        if ref is not None and self.fully_frozen:
            tensors = None
        elif ref is None:
            tensors = {k: v.detach().cpu().clone() for k, v in sd.items()}
        else:
            names = {n for n, p in self.model.named_parameters() if p.requires_grad}
            names |= {n for n, _ in self.model.named_buffers()}
            tensors = {k: v.detach().cpu().clone() for k, v in sd.items() if k in names}
        return {
            "format": ENCODER_STATE_FORMAT,
            "encoder_id": self.encoder_id,
            "config": dict(self.config),
            "weights": ref,
            "state_dict": tensors,
        }

    def load_checkpoint_state(self, state: Mapping[str, Any]) -> None:
        """Apply a :meth:`checkpoint_state` blob to this (already built) encoder.

        The weights file it was built from must have the recorded sha256
        (:class:`EncoderHashMismatchError` naming the file otherwise); stored tensors are loaded
        on top (all of their names must exist in the encoder).
        """
        check_weights_reference(state.get("weights"), self.weights_path, self.weights_sha256)
        tensors = state.get("state_dict")
        if tensors:
            own = self.model.state_dict()
            unknown = [k for k in tensors if k not in own]
            if unknown:
                raise EncoderWeightsError(
                    f"checkpoint encoder tensors not in {self.encoder_id}: {', '.join(unknown[:4])}"
                )
            self.model.load_state_dict(dict(tensors), strict=False)

    # -- forward
    def preprocess(self, x: Tensor) -> Tensor:
        """[0, 1] (or uint8) patches -> resized, normalised encoder input."""
        return prepare_input(x, self.input_size, self.mean, self.std, "TimmEncoder")

    def embed(self, x: Tensor) -> Tensor:
        """Pooled, un-normalised features of preprocessed input."""
        out = self.model(x)
        if self.pooling == "avg":
            if isinstance(out, list | tuple):
                out = out[-1]
            return out.mean(dim=(-2, -1)) if out.dim() == 4 else out
        if self.pooling == "cls_mean":
            npt = int(getattr(self.model, "num_prefix_tokens", 1))
            return torch.cat([out[:, 0], out[:, npt:].mean(dim=1)], dim=-1)
        return out

    def forward(self, x: Tensor) -> Tensor:
        grad = torch.no_grad() if self.fully_frozen else contextlib.nullcontext()
        with grad, cuda_autocast(x.device, enabled=self.cuda_bf16):
            f = self.embed(self.preprocess(x))
        return F.normalize(f.float(), p=2.0, dim=1)

    def extra_repr(self) -> str:
        return f"encoder_id={self.encoder_id!r}, out_dim={self.out_dim}, freeze={self.freeze!r}"


def _cfg_digest(cfg: Mapping[str, Any]) -> str:
    text = json.dumps(cfg, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:8]



# ----------------------------------------------------------------------------- building


@dataclass(frozen=True)
class TimmEncoderSpec:
    """What :func:`build_timm_encoder`'s arguments resolve to, before any file is read."""

    arch: str
    """The timm architecture built."""
    kwargs: dict[str, Any]
    """``timm.create_model`` arguments: the preset's, overridden by the caller's."""
    preset: EncoderPreset | None
    key_map: str | None
    ignore_prefixes: tuple[str, ...]
    """Checkpoint keys dropped by declaration (preset and key map)."""
    weights_path: Path | None
    """The local weights file; None: random initialisation."""
    device: str | torch.device | None
    arch_given: str | None = None
    kwargs_given: dict[str, Any] | None = None

    @property
    def meta(self) -> bool:
        """Shapes only (parameters on the meta device)."""
        return self.device is not None and torch.device(self.device).type == "meta"


def _preset(preset: str | None, arch: str | None) -> EncoderPreset | None:
    if preset is None and arch is None:
        preset = "efficientnet-lite0"
    if preset is None:
        return None
    key = preset.lower()
    if key in NOT_EXPRESSIBLE:
        raise ValueError(f"preset {preset!r} is not available: {NOT_EXPRESSIBLE[key]}")
    if key not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[key]


def resolve_encoder_spec(
    arch: str | None = None,
    preset: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    kwargs: Mapping[str, Any] | None = None,
    key_map: str | None = None,
    in_channels: int = 3,
    device: str | torch.device | None = None,
) -> TimmEncoderSpec:
    """Step 1 of :func:`build_timm_encoder`: preset + overrides -> architecture, kwargs, key
    map and the one local weights file (or random init). Nothing is read or built yet."""
    if in_channels != 3:
        raise ValueError(f"pretrained encoders take RGB patches (in_channels=3), got {in_channels}")
    p = _preset(preset, arch)
    arch_name = arch if arch is not None else p.arch  # type: ignore[union-attr]
    kw = {**(dict(p.kwargs) if p else {}), **dict(kwargs or {})}
    kw.pop("num_classes", None)
    key_map = key_map if key_map is not None else (p.key_map if p else None)
    if key_map is not None and key_map not in KEY_MAPS:
        raise ValueError(f"unknown key_map {key_map!r}; available: {', '.join(sorted(KEY_MAPS))}")
    ignore = tuple(p.ignore_prefixes) if p else ()
    ignore += KEY_MAP_DROPS.get(key_map or "", ())
    hint = f"{p.weight_file} from {p.source}" if p else None

    # Weights: a local file (hashed), the preset's bundled file, or an explicit random init.
    random_init = isinstance(weights, str) and weights == "random"
    path: Path | None = None
    if not random_init:
        if weights is None:
            if p is None or p.default_weights is None:
                what = f"preset {p.name!r}" if p else f"arch {arch_name!r}"
                raise EncoderWeightsMissingError(
                    f"{what} needs weights: {_where_hint(hint)} and set feature_net.weights to "
                    "its local path (or weights: random for an untrained encoder)"
                )
            path = _package_weights(p.default_weights)
        else:
            path = resolve_weights_path(weights, hint)
    spec = TimmEncoderSpec(
        arch=arch_name,
        kwargs=kw,
        preset=p,
        key_map=key_map,
        ignore_prefixes=ignore,
        weights_path=path,
        device=device,
        arch_given=arch,
        kwargs_given=dict(kwargs) if kwargs else None,
    )
    if spec.meta and not random_init:
        raise ValueError("device='meta' builds shapes only: use weights='random'")
    return spec


def load_encoder_weights(spec: TimmEncoderSpec) -> tuple[nn.Module, list[str]]:
    """Step 2: the timm model with the spec's weights file loaded strictly (or randomly
    initialised), on ``spec.device``, and the checkpoint keys dropped by declaration."""
    path = spec.weights_path
    if path is None:
        return create_timm_model(spec.arch, spec.kwargs, device=spec.device), []
    # Build on the meta device (no random init of a billion parameters), load by assignment.
    model = create_timm_model(spec.arch, spec.kwargs, device="meta")
    sd = load_weights_file(path)
    if spec.key_map is not None:
        sd = KEY_MAPS[spec.key_map](sd, model)
    add_missing_bn_counters(model, sd)
    _check_hf_config(path, spec.preset, model)
    ignore = spec.ignore_prefixes
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(head, str) and head:  # num_classes=0: a checkpoint's classifier is unused
        ignore += (head + ".",)
    dropped = check_state_dict(model, sd, str(path), ignore)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items() if k not in dropped}
    model.load_state_dict(sd, strict=True, assign=True)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = create_timm_model(spec.arch, spec.kwargs)  # non-persistent buffers: build for real
        model.load_state_dict(sd, strict=True)
    if spec.device is not None:
        model = model.to(spec.device)
    return model, dropped


def _output_dim(model: nn.Module, pool: str, features_only: bool) -> int:
    if pool == "avg" and features_only:
        return int(model.feature_info.channels()[-1])  # type: ignore[union-attr,operator]
    if pool == "cls_mean":
        return 2 * int(model.num_features)  # type: ignore[arg-type]
    return int(getattr(model, "head_hidden_size", None) or model.num_features)  # type: ignore[arg-type]


def _input_size(model: nn.Module, p: EncoderPreset | None, input_size: int | None) -> int | None:
    """The side patches are resized to: given, the preset's, the ViT's, else timm's config."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = input_size if input_size is not None else (p.input_size if p else None)
    pe = getattr(model, "patch_embed", None)
    pe_size = getattr(pe, "img_size", None)
    if size is None and pe_size is not None:  # a ViT built for another size: feed it that
        size = int(pe_size[0])
    if size is None and cfg.get("input_size"):
        size = int(cfg["input_size"][-1])
    if (
        size is not None
        and pe is not None
        and not getattr(model, "dynamic_img_size", True)
        and tuple(getattr(pe, "img_size", (size, size))) != (size, size)
    ):
        raise ValueError(
            f"input_size {size} differs from the ViT's img_size {tuple(pe.img_size)} and "
            "dynamic_img_size is off; set kwargs.img_size or kwargs.dynamic_img_size: true"
        )
    return size


def build_encoder(
    spec: TimmEncoderSpec,
    model: nn.Module,
    dropped: Sequence[str] = (),
    *,
    freeze: bool | int = True,
    input_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pooling: str | None = None,
    cuda_bf16: bool = True,
) -> TimmEncoder:
    """Step 3: wrap the loaded model as a :class:`TimmEncoder` (input size, normalisation,
    pooling, ``encoder_id`` and the config a checkpoint records)."""
    p = spec.preset
    features_only = bool(spec.kwargs.get("features_only", False))
    pool = pooling or (p.pooling if p else ("avg" if features_only else "model"))
    out_dim = _output_dim(model, pool, features_only)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = _input_size(model, p, input_size)
    m_ = (
        tuple(mean)
        if mean is not None
        else (p.mean if p else tuple(cfg.get("mean", IMAGENET_MEAN)))
    )
    s_ = tuple(std) if std is not None else (p.std if p else tuple(cfg.get("std", IMAGENET_STD)))
    build_args = {
        "arch": spec.arch_given,
        "preset": p.name if p else None,
        "freeze": freeze,
        "input_size": input_size,
        "kwargs": spec.kwargs_given,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "pooling": pooling,
        "key_map": spec.key_map if (p is None or spec.key_map != p.key_map) else None,
        "cuda_bf16": cuda_bf16,
    }
    resolved = {
        "arch": spec.arch,
        "kwargs": dict(spec.kwargs),
        "input_size": size,
        "mean": list(m_),
        "std": list(s_),
        "pooling": pool,
        "key_map": spec.key_map,
    }
    path = spec.weights_path
    if path is not None:
        digest, short = file_sha256(path), file_sha256(path)[:12]
    elif spec.meta:
        digest, short = "meta", "meta"
    else:
        digest = _hash_tensors(model.state_dict())
        short = "rnd" + digest[:9]
    label = p.name if p and spec.arch_given is None and not spec.kwargs_given else spec.arch
    enc = TimmEncoder(
        model,
        out_dim=out_dim,
        input_size=size,
        mean=m_,
        std=s_,
        pooling=pool,
        encoder_id=f"{label}:{_cfg_digest(resolved)}:{short}",
        freeze=freeze,
        config={"build": build_args, "resolved": resolved},
        weights_path=str(path) if path is not None else None,
        weights_sha256=digest if path is not None else None,
        dropped_keys=dropped,
        cuda_bf16=cuda_bf16,
    )
    return enc.to(spec.device) if spec.device is not None else enc


def build_timm_encoder(
    arch: str | None = None,
    preset: str | None = None,
    weights: str | os.PathLike[str] | None = None,
    freeze: bool | int = True,
    input_size: int | None = None,
    kwargs: Mapping[str, Any] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    pooling: str | None = None,
    key_map: str | None = None,
    in_channels: int = 3,
    device: str | torch.device | None = None,
    cuda_bf16: bool = True,
) -> TimmEncoder:
    """The ``timm`` feature net (registered as ``feature_net: {name: timm, ...}``).

    Args:
        arch: a timm architecture name (``arch`` or ``preset``; neither: ``efficientnet-lite0``).
        preset: a :data:`PRESETS` name; ``arch`` / ``kwargs`` given as well override it.
        weights: a local ``.safetensors`` / ``.pth`` / ``.bin`` file or a folder holding one;
            ``"random"`` for random initialisation; None: the preset's bundled weights if it
            has any, else an error saying which file to download.
        freeze: true (default), false, or the number of trailing blocks left trainable.
        input_size: side patches are resized to (default: the preset's, else timm's
            pretrained_cfg); must match ``img_size`` of a ViT without ``dynamic_img_size``.
        kwargs: extra ``timm.create_model`` arguments (merged over the preset's).
        mean, std: override the encoder's input normalisation.
        pooling: ``model``, ``avg`` or ``cls_mean`` (default: the preset's; ``avg`` for
            ``features_only`` nets, else ``model``).
        key_map: ``lukemelas_efficientnet`` or ``hf_vit`` to rename a foreign checkpoint.
        in_channels: must be 3 (RGB).
        device: where the parameters are created, e.g. ``"meta"`` for shape checks (meta
            requires ``weights="random"``).
        cuda_bf16: bf16 autocast when the input is on CUDA.
    """
    spec = resolve_encoder_spec(arch, preset, weights, kwargs, key_map, in_channels, device)
    model, dropped = load_encoder_weights(spec)
    return build_encoder(
        spec,
        model,
        dropped,
        freeze=freeze,
        input_size=input_size,
        mean=mean,
        std=std,
        pooling=pooling,
        cuda_bf16=cuda_bf16,
    )


def _check_hf_config(path: Path, preset: EncoderPreset | None, model: nn.Module) -> None:
    """A transformers config.json next to the weights must agree with the built ViT."""
    if preset is None or preset.key_map != "hf_vit":
        return
    cfg_file = path.parent / "config.json"
    if not cfg_file.is_file():
        return
    try:
        cfg = json.loads(cfg_file.read_text())
    except (OSError, ValueError):
        return
    blocks = getattr(model, "blocks", [])
    want = {
        "hidden_size": int(getattr(model, "embed_dim", -1)),
        "num_hidden_layers": len(blocks),
        "patch_size": int(model.patch_embed.patch_size[0]),  # type: ignore[union-attr,index]
    }
    bad = [f"{k}={cfg[k]} (preset: {v})" for k, v in want.items() if k in cfg and cfg[k] != v]
    if bad:
        raise EncoderWeightsError(
            f"{str(cfg_file)!r} describes another model than preset {preset.name!r}: "
            + ", ".join(bad)
        )



def restore_encoder(
    state: Mapping[str, Any], weights: str | os.PathLike[str] | None = None
) -> TimmEncoder:
    """Rebuild the timm encoder a checkpoint describes, offline.

    ``weights`` overrides the recorded path (a moved file); the file's sha256 must match the
    recorded one (:class:`EncoderHashMismatchError` naming the file). No network is used.
    """
    build = dict(state["config"]["build"])
    ref = state.get("weights")
    if ref is not None:
        path = resolve_weights_path(weights if weights is not None else ref["path"])
        digest = file_sha256(path)
        if digest != ref["sha256"]:
            raise EncoderHashMismatchError(
                f"weights file {str(path)!r} has sha256 {digest} but the checkpoint recorded "
                f"{ref['sha256']} for {ref['path']!r}"
            )
        w: str | os.PathLike[str] = path
    else:
        w = "random"
    net = build_timm_encoder(weights=w, **build)
    if ref is None:
        net.model.load_state_dict(dict(state["state_dict"]), strict=True)
        net.encoder_id = state.get("encoder_id", net.encoder_id)
        return net
    net.load_checkpoint_state(state)
    return net
