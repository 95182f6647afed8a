"""timm models without downloads: ``timm.create_model(pretrained=False)`` with YAML-friendly
layer names, and the repeated blocks a partial freeze counts."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from ats_wsi.encoders.weights import EncoderWeightsError, _is_remote

__all__ = ["create_timm_model", "model_blocks"]

_FORBIDDEN_KWARGS = ("pretrained", "pretrained_cfg_overlay", "checkpoint_path", "cache_dir")


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


def model_blocks(model: nn.Module) -> list[nn.Module]:
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
