"""Key maps: foreign checkpoint layouts renamed onto timm's module names (efficientnet_pytorch,
transformers ViT / Dinov2), and the keys each layout has that timm's model does not."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["KEY_MAPS", "KEY_MAP_DROPS", "map_hf_vit_keys", "map_lukemelas_efficientnet_keys"]


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


KEY_MAPS: dict[str, Callable[[Mapping[str, Tensor], nn.Module], dict[str, Tensor]]] = {
    "lukemelas_efficientnet": map_lukemelas_efficientnet_keys,
    "hf_vit": map_hf_vit_keys,
}


KEY_MAP_DROPS: dict[str, tuple[str, ...]] = {
    "lukemelas_efficientnet": (),
    "hf_vit": ("pooler.", "embeddings.mask_token"),
}
"""Checkpoint keys each foreign layout has and timm's model does not (dropped by declaration)."""

