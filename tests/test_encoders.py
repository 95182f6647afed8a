"""Pretrained patch encoders (ats_wsi.encoders): presets, offline weight loading, the bundled
EfficientNet-Lite0 weights on real H&E tiles, freezing, the feature cache, checkpoint helpers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from ats_wsi import encoders as E
from ats_wsi.encoders import (
    PRESETS,
    EncoderHashMismatchError,
    EncoderWeightsError,
    EncoderWeightsMissingError,
    FeatureCache,
    FeatureKey,
    TimmEncoder,
    build_timm_encoder,
)
from ats_wsi.nets import build_feature_net

SLIDES = Path(__file__).resolve().parents[2] / "shared" / "data" / "slides"


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """One torch thread: on the shared 2-core CI box two threads are several times slower."""


@pytest.fixture(scope="module")
def lite0() -> TimmEncoder:
    """The bundled ImageNet EfficientNet-Lite0, frozen (read-only use in the tests)."""
    return build_timm_encoder(preset="efficientnet-lite0")


def _save(sd: dict[str, torch.Tensor], path: Path) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


# ----------------------------------------------------------------------------- registry, contract


def test_timm_is_a_registered_feature_net_meeting_the_contract(lite0: TimmEncoder) -> None:
    net = build_feature_net("timm")  # no arguments: the bundled efficientnet-lite0
    assert isinstance(net, TimmEncoder) and isinstance(net, E.PatchEncoder)
    assert net.normalizes_input is True
    assert net.out_dim == 1280 and net.encoder_id == lite0.encoder_id
    sha = E.file_sha256(net.weights_path)
    assert net.encoder_id.startswith("efficientnet-lite0:") and net.encoder_id.endswith(sha[:12])
    x = torch.rand(3, 3, 70, 70)  # not the encoder's 224: resized inside
    f = net(x)
    assert torch.allclose(net((x * 255).round().to(torch.uint8)), net((x * 255).round() / 255))
    assert f.shape == (3, 1280) and not f.requires_grad
    assert torch.allclose(f.norm(dim=1), torch.ones(3), atol=1e-5)
    # The encoder's own input handling: resize to 224 + (x - 0.5) / 0.5 before the timm model.
    import torch.nn.functional as F

    ref = F.interpolate(x, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    with torch.no_grad():
        expect = F.normalize(net.model((ref - 0.5) / 0.5), dim=1)
    assert torch.allclose(f, expect, atol=1e-5)


def test_encoder_id_names_architecture_input_size_and_weights() -> None:
    torch.manual_seed(0)
    a = build_timm_encoder(preset="efficientnet-lite0", weights="random")
    torch.manual_seed(1)
    b = build_timm_encoder(preset="efficientnet-lite0", weights="random")
    torch.manual_seed(0)
    c = build_timm_encoder(preset="efficientnet-lite0", weights="random", input_size=160)
    assert a.encoder_id != b.encoder_id  # other random weights
    assert a.encoder_id.split(":")[2] == c.encoder_id.split(":")[2]  # same weights...
    assert a.encoder_id != c.encoder_id  # ... other input size
    assert len(a.encoder_id) < 60


# ----------------------------------------------------------------------------- presets


# Published sizes: UNI 303M, UNI2-h 681M, Virchow2 632M, H-optimus-0 1.1B, Prov-GigaPath 1.13B,
# Phikon 86M, Phikon-v2 ~300M (model cards / papers); out_dim as the model cards state.
PUBLISHED = {
    "uni": (303e6, 1024),
    "uni2-h": (681e6, 1536),
    "virchow2": (632e6, 2560),
    "h-optimus-0": (1.1e9, 1536),
    "gigapath": (1.13e9, 1536),
    "phikon": (86e6, 768),
    "phikon-v2": (300e6, 1024),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_large_presets_on_the_meta_device(name: str) -> None:
    net = build_timm_encoder(preset=name, weights="random", device="meta")
    n = sum(p.numel() for p in net.model.parameters())
    published, dim = PUBLISHED[name]
    assert n == PRESETS[name].params
    assert abs(n - published) / published < 0.035, n
    assert net.out_dim == dim == PRESETS[name].out_dim
    f = net(torch.rand(2, 3, 97, 97, device="meta"))  # the shapes a forward produces
    assert f.shape == (2, dim)


def test_preset_architecture_details_on_the_meta_device() -> None:
    sd = {
        n: build_timm_encoder(preset=n, weights="random", device="meta").model.state_dict()
        for n in ("uni", "uni2-h", "virchow2", "h-optimus-0", "gigapath")
    }
    # UNI: LayerScale (init_values) must exist or the released weights cannot load strictly.
    assert sd["uni"]["blocks.23.ls1.gamma"].shape == (1024,)
    assert sd["uni"]["pos_embed"].shape == (1, 197, 1024)
    # UNI2-h: 24 blocks of width 1536, 8 registers, no position embedding for prefix tokens,
    # packed SwiGLU (fc1 2 x 4096).
    u2 = sd["uni2-h"]
    assert u2["reg_token"].shape == (1, 8, 1536) and u2["pos_embed"].shape == (1, 256, 1536)
    assert (
        u2["blocks.23.mlp.fc1.weight"].shape == (8192, 1536) and "blocks.24.norm1.weight" not in u2
    )
    # Virchow2: 32 blocks of 1280, 4 registers, positions for all 5 prefix tokens.
    v2 = sd["virchow2"]
    assert v2["reg_token"].shape == (1, 4, 1280) and v2["pos_embed"].shape == (1, 261, 1280)
    assert v2["blocks.31.mlp.fc2.weight"].shape == (1280, 3416)
    # H-optimus-0: DINOv2 giant with 4 registers, 40 blocks; GigaPath: patch 16, no registers.
    assert sd["h-optimus-0"]["reg_token"].shape == (1, 4, 1536)
    assert "blocks.39.ls2.gamma" in sd["h-optimus-0"]
    g = sd["gigapath"]
    assert g["patch_embed.proj.weight"].shape == (1536, 3, 16, 16) and "reg_token" not in g
    assert g["pos_embed"].shape == (1, 197, 1536)


def test_virchow2_embedding_is_class_token_and_mean_of_patch_tokens() -> None:
    torch.manual_seed(0)
    # A small ViT with Virchow2's token layout (4 registers, global_pool "") and its pooling.
    net = build_timm_encoder(
        arch="vit_small_patch16_224",
        weights="random",
        kwargs={"img_size": 32, "depth": 1, "reg_tokens": 4, "global_pool": ""},
        pooling="cls_mean",
    )
    assert net.out_dim == 2 * 384
    x = torch.rand(2, 3, 32, 32)
    tokens = net.model(net.preprocess(x))
    assert tokens.shape == (2, 1 + 4 + 4, 384)
    expect = torch.cat([tokens[:, 0], tokens[:, 5:].mean(1)], dim=1)
    assert torch.allclose(net(x), torch.nn.functional.normalize(expect, dim=1), atol=1e-5)


@pytest.mark.parametrize(
    ("preset", "suffix"), [("resnet50-trunc", ".safetensors"), ("efficientnet-lite0", ".pth")]
)
def test_small_presets_round_trip_through_a_weights_file(
    preset: str, suffix: str, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    a = build_timm_encoder(preset=preset, weights="random")
    full = E.create_timm_model(PRESETS[preset].arch, num_classes=1000)
    sd = dict(full.state_dict())  # a complete checkpoint: heads / truncated stages included
    sd.update(a.model.state_dict())
    if preset == "efficientnet-lite0":  # stored in the package's (lukemelas) layout
        ref = torch.load(E._package_weights(E._PACKAGE_LITE0), weights_only=True)
        sd = dict(zip(ref.keys(), sd.values(), strict=True))
    path = _save(sd, tmp_path / f"w{suffix}")
    b = build_timm_encoder(preset=preset, weights=tmp_path)  # a folder holding one file
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(a(x), b(x))
    assert b.weights_path == str(path) and b.out_dim == PRESETS[preset].out_dim
    declared = {"resnet50-trunc": ("layer4.", "fc."), "efficientnet-lite0": ("classifier.",)}
    assert b.dropped_keys and all(k.startswith(declared[preset]) for k in b.dropped_keys)


def test_old_torchvision_files_without_num_batches_tracked_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    a = build_timm_encoder(preset="resnet50-trunc", weights="random")
    sd = {k: v for k, v in a.model.state_dict().items() if "num_batches_tracked" not in k}
    b = build_timm_encoder(preset="resnet50-trunc", weights=_save(sd, tmp_path / "old.pth"))
    x = torch.rand(1, 3, 48, 48)
    assert torch.equal(a(x), b(x))


# ----------------------------------------------------------------------------- offline errors


@pytest.mark.parametrize(
    "name",
    [
        "hf-hub:MahmoodLab/UNI",
        "hf_hub:prov-gigapath/prov-gigapath",
        "timm/resnet50.tv_in1k",
        "https://example.org/w.pth",
        "s3://bucket/w.safetensors",
    ],
)
def test_hub_names_and_urls_are_refused_with_a_one_line_message(name: str) -> None:
    with pytest.raises(EncoderWeightsError, match="never downloads") as err:
        build_timm_encoder(preset="uni", weights=name)
    msg = str(err.value)
    assert "\n" not in msg and "pytorch_model.bin" in msg and "MahmoodLab/UNI" in msg
    with pytest.raises(EncoderWeightsError, match="hub name or URL"):
        build_timm_encoder(arch=name, weights="random")


def test_a_missing_file_says_what_to_download_and_where(tmp_path: Path) -> None:
    with pytest.raises(EncoderWeightsMissingError) as err:
        build_timm_encoder(preset="virchow2", weights=tmp_path / "nope.bin")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, ValueError)
    msg = str(err.value)
    assert "nope.bin" in msg and "paige-ai/Virchow2" in msg and "\n" not in msg
    with pytest.raises(EncoderWeightsMissingError, match="MahmoodLab/UNI2-h"):
        build_timm_encoder(preset="uni2-h")  # no weights given, none bundled


def test_folders_need_exactly_one_weights_file(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not weights")
    with pytest.raises(EncoderWeightsMissingError, match=str(tmp_path)):
        E.resolve_weights_path(tmp_path)
    (tmp_path / "a.pth").write_bytes(b"")
    assert E.resolve_weights_path(tmp_path) == tmp_path / "a.pth"
    (tmp_path / "b.safetensors").write_bytes(b"")
    with pytest.raises(EncoderWeightsError, match="several weight files.*a.pth, b.safetensors"):
        E.resolve_weights_path(tmp_path)


def test_weights_of_another_architecture_name_the_file_and_keys(tmp_path: Path) -> None:
    torch.manual_seed(0)
    other = build_timm_encoder(preset="resnet50-trunc", weights="random")
    path = _save(other.model.state_dict(), tmp_path / "resnet.pth")
    with pytest.raises(EncoderWeightsError) as err:
        build_timm_encoder(arch="tf_efficientnet_lite0", weights=path)
    msg = str(err.value)
    assert "resnet.pth" in msg and "missing: conv_stem.weight" in msg
    assert "unexpected: conv1.weight" in msg and "\n" not in msg


def test_uni_weights_need_the_presets_layerscale() -> None:
    # A UNI-shaped checkpoint (meta tensors) against plain vit_large_patch16_224: the missing
    # LayerScale is what the preset's init_values=1e-5 adds.
    uni = build_timm_encoder(preset="uni", weights="random", device="meta").model.state_dict()
    plain = E.create_timm_model("vit_large_patch16_224", device="meta")
    with pytest.raises(EncoderWeightsError, match=r"unexpected: blocks\.0\.ls1\.gamma"):
        E.check_state_dict(plain, uni, "uni.bin")
    assert (
        E.check_state_dict(
            E.create_timm_model(
                "vit_large_patch16_224", dict(PRESETS["uni"].kwargs), device="meta"
            ),
            uni,
            "uni.bin",
        )
        == []
    )


def test_kwargs_that_would_download_are_refused_and_conch_is_explained() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        build_timm_encoder(arch="resnet18", weights="random", kwargs={"pretrained": True})
    with pytest.raises(ValueError, match="attentional pooler"):
        build_timm_encoder(preset="conch", weights="random")


# ----------------------------------------------------------------------------- bundled weights


def test_lite0_package_weights_map_completely_onto_tf_efficientnet_lite0() -> None:
    raw = torch.load(E._package_weights(E._PACKAGE_LITE0), weights_only=True)
    assert len(raw) == 296
    full = E.create_timm_model("tf_efficientnet_lite0", num_classes=1000)
    mapped = E.map_lukemelas_efficientnet_keys(raw, full)
    assert len(mapped) == len(raw)  # every tensor consumed, no two onto one name
    assert E.check_state_dict(full, mapped, "lite0") == []  # strict: names and shapes
    # The feature net drops exactly the 1000-class head, by declaration.
    net = build_timm_encoder(preset="efficientnet-lite0")
    assert sorted(net.dropped_keys) == ["classifier.bias", "classifier.weight"]


def _image(name: str) -> torch.Tensor:
    import skimage.data

    img = getattr(skimage.data, name)()[..., :3]
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()[None] / 255


def test_lite0_imagenet_predictions_are_meaningful(one_thread: None) -> None:
    import torch.nn.functional as F

    raw = torch.load(E._package_weights(E._PACKAGE_LITE0), weights_only=True)
    model = E.create_timm_model("tf_efficientnet_lite0", num_classes=1000).eval()
    model.load_state_dict(E.map_lukemelas_efficientnet_keys(raw, model), strict=True)
    # ImageNet classes: 281-285 cats; 967 espresso, 968 cup, 504 coffee mug.
    for name, classes in (("chelsea", {281, 282, 283, 284, 285}), ("coffee", {967, 968, 504})):
        x = F.interpolate(_image(name), size=(224, 224), mode="bilinear", antialias=True)
        with torch.no_grad():
            top = model((x - 0.5) / 0.5).softmax(1)[0].topk(5)
        assert int(top.indices[0]) in classes, (name, top)
        assert float(top.values[0]) > 0.5


def _kather_crops(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` random 64-96 px crops of each Kather tile (two tissue classes), rotated, with each
    crop's per-channel mean and std standardised so colour alone cannot tell them apart."""
    import tifffile
    import torch.nn.functional as F

    g = np.random.default_rng(seed)
    xs, ys = [], []
    for label in (0, 1):
        tile = tifffile.imread(SLIDES / f"kather-tile-{label + 1}.tif")[..., :3]
        t = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1).float() / 255
        for _ in range(n):
            s = int(g.integers(64, 97))
            y0, x0 = (int(v) for v in g.integers(0, t.shape[-1] - s + 1, size=2))
            p = torch.rot90(t[:, y0 : y0 + s, x0 : x0 + s], int(g.integers(4)), (1, 2))
            mu, sd = p.mean((1, 2), keepdim=True), p.std((1, 2), keepdim=True).clamp_min(1e-3)
            p = ((p - mu) / sd * 0.15 + 0.6).clamp(0, 1)
            xs.append(F.interpolate(p[None], size=(80, 80), mode="bilinear", antialias=True)[0])
            ys.append(label)
    return torch.stack(xs), np.array(ys)


def _cv_logreg(f: np.ndarray, y: np.ndarray) -> float:
    """Stratified 5-fold accuracy of a standardised logistic regression (fixed folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
    folds = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(clf, f, y, cv=folds).mean())


def _loo_centroid(f: np.ndarray, y: np.ndarray) -> float:
    ok = 0
    for i in range(len(y)):
        rest = np.arange(len(y)) != i
        centroids = np.stack([f[rest & (y == k)].mean(0) for k in (0, 1)])
        ok += int(np.argmax(centroids @ f[i]) == y[i])
    return ok / len(y)


@pytest.mark.skipif(not (SLIDES / "kather-tile-1.tif").exists(), reason="shared slides absent")
def test_lite0_features_separate_real_tissue_classes(lite0: TimmEncoder) -> None:
    x, y = _kather_crops(20, seed=0)
    pre = lite0(x).numpy()
    torch.manual_seed(0)
    rand = build_timm_encoder(preset="efficientnet-lite0", weights="random")(x).numpy()
    acc_pre, acc_rand = _cv_logreg(pre, y), _cv_logreg(rand, y)
    # Measured: 1.00 pretrained vs 0.80 at random init (0.62-0.80 over init seeds 0-3); a
    # leave-one-out nearest centroid gives 1.00 vs 0.50-0.53 (random features nearly collinear).
    assert acc_pre >= 0.95, acc_pre
    assert acc_pre - acc_rand >= 0.15, (acc_pre, acc_rand)
    assert _loo_centroid(pre, y) >= 0.95
    assert _loo_centroid(rand, y) <= 0.8


# ----------------------------------------------------------------------------- HF ViT key maps


def _transformers():  # noqa: ANN202  (a module; a dependency of tiatoolbox, not ours)
    return pytest.importorskip("transformers")


def _tiny_hf(kind: str, image_size: int) -> nn.Module:
    transformers = _transformers()
    torch.manual_seed(0)
    if kind == "vit":
        cfg = transformers.ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            image_size=image_size,
            patch_size=16,
        )
        return transformers.ViTModel(cfg).eval()
    cfg = transformers.Dinov2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=16,
        layerscale_value=0.5,
    )
    model = transformers.Dinov2Model(cfg).eval()
    with torch.no_grad():  # non-trivial LayerScale and position embeddings
        for n, p in model.named_parameters():
            if "lambda1" in n or "position_embeddings" in n:
                p.copy_(torch.randn_like(p) * 0.5)
    return model


_TINY_TIMM = {"embed_dim": 64, "depth": 2, "num_heads": 4, "img_size": 32}


@pytest.mark.parametrize(("kind", "hf_size"), [("vit", 32), ("dinov2", 32), ("dinov2", 48)])
def test_hf_vit_and_dinov2_checkpoints_match_transformers(
    kind: str, hf_size: int, tmp_path: Path
) -> None:
    hf = _tiny_hf(kind, hf_size)
    kwargs = dict(_TINY_TIMM)
    kwargs.update({"norm_layer": "LayerNorm:1e-12"} if kind == "vit" else {"init_values": 1.0})
    path = _save(dict(hf.state_dict()), tmp_path / "model.safetensors")
    net = build_timm_encoder(
        arch="vit_base_patch16_224",
        weights=path,
        kwargs=kwargs,
        key_map="hf_vit",
        input_size=32,
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
    )
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=(x - 0.5) / 0.5).last_hidden_state[:, 0]
        ours = net.embed(net.preprocess(x))
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()
    expected_drops = {
        "vit": {"pooler.dense.weight", "pooler.dense.bias"},
        "dinov2": {"embeddings.mask_token"},
    }[kind]
    assert set(net.dropped_keys) == expected_drops


def test_legacy_transformers_vit_layout_as_phikon_ships_it(tmp_path: Path) -> None:
    transformers = _transformers()
    hf = _tiny_hf("vit", 32)
    legacy_names = [  # transformers 4 names, the layout of checkpoints on the hub
        (".attention.q_proj.", ".attention.attention.query."),
        (".attention.k_proj.", ".attention.attention.key."),
        (".attention.v_proj.", ".attention.attention.value."),
        (".attention.o_proj.", ".attention.output.dense."),
        (".mlp.fc1.", ".intermediate.dense."),
        (".mlp.fc2.", ".output.dense."),
    ]
    legacy = {}
    for k, v in hf.state_dict().items():
        k = k.replace("layers.", "encoder.layer.", 1) if k.startswith("layers.") else k
        for new, old in legacy_names:
            k = k.replace(new, old)
        legacy[k] = v
    assert "encoder.layer.1.attention.attention.value.bias" in legacy
    folder = tmp_path / "phikon"
    folder.mkdir()
    _save(legacy, folder / "model.safetensors")
    hf.config.save_pretrained(folder)
    # transformers itself reads this layout back into the same model: the names are right.
    back = transformers.ViTModel.from_pretrained(folder).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=x).last_hidden_state[:, 0]
        assert torch.allclose(back(pixel_values=x).last_hidden_state[:, 0], ref, atol=1e-6)
    net = build_timm_encoder(
        arch="vit_base_patch16_224",
        weights=folder / "model.safetensors",
        key_map="hf_vit",
        kwargs={**_TINY_TIMM, "norm_layer": "LayerNorm:1e-12"},
        mean=(0.0,) * 3,
        std=(1.0,) * 3,
        input_size=32,
    )
    with torch.no_grad():
        assert torch.allclose(net.embed(net.preprocess(x)), ref, atol=1e-4)
    # With a preset, the config.json next to the weights must describe the preset's model.
    with pytest.raises(EncoderWeightsError, match=r"config\.json.*hidden_size=64"):
        build_timm_encoder(preset="phikon", weights=folder)


@pytest.mark.parametrize(
    ("preset", "config"),
    [
        ("phikon", {}),  # transformers' ViTConfig defaults are ViT-B/16 at 224
        (
            "phikon-v2",
            {
                "hidden_size": 1024,
                "num_hidden_layers": 24,
                "num_attention_heads": 16,
                "patch_size": 16,
                "image_size": 224,
            },
        ),
    ],
)
def test_phikon_presets_fit_full_size_transformers_models(preset: str, config: dict) -> None:
    transformers = _transformers()
    cls = transformers.ViTModel if preset == "phikon" else transformers.Dinov2Model
    cfg_cls = transformers.ViTConfig if preset == "phikon" else transformers.Dinov2Config
    with torch.device("meta"):
        hf = cls(cfg_cls(**config))
    net = build_timm_encoder(preset=preset, weights="random", device="meta")
    mapped = E.map_hf_vit_keys(hf.state_dict(), net.model)
    drops = E.check_state_dict(net.model, mapped, preset, PRESETS[preset].ignore_prefixes)
    assert len(drops) == (2 if preset == "phikon" else 1)


# ----------------------------------------------------------------------------- freezing


def test_frozen_encoders_stay_in_eval_mode_and_have_no_gradients(lite0: TimmEncoder) -> None:
    parent = nn.Sequential(lite0, nn.Linear(1280, 2)).train()
    assert not lite0.training and not any(m.training for m in lite0.modules())
    assert not any(p.requires_grad for p in lite0.parameters())
    bn = lite0.model.bn1.running_mean.clone()
    out = parent(torch.rand(2, 3, 48, 48))
    out.sum().backward()
    assert torch.equal(lite0.model.bn1.running_mean, bn)  # BatchNorm statistics untouched
    assert E.encoder_parameters(parent) == []


def test_freeze_n_trains_the_last_n_blocks_and_what_follows() -> None:
    torch.manual_seed(0)
    net = build_timm_encoder(preset="efficientnet-lite0", weights="random", freeze=2)
    trainable = {n for n, p in net.model.named_parameters() if p.requires_grad}
    assert trainable and all(
        n.startswith(("blocks.5.3.", "blocks.6.", "conv_head.", "bn2.")) for n in trainable
    )
    assert any(n.startswith("blocks.5.3.") for n in trainable)
    model = nn.Sequential(net, nn.Linear(1280, 2))
    assert {id(p) for p in E.encoder_parameters(model)} == {
        id(p) for p in net.parameters() if p.requires_grad
    }
    model.train()
    assert net.training and net.model.blocks[6].training and not net.model.bn1.training
    stem_bn = net.model.bn1.running_mean.clone()
    head_bn = net.model.bn2.running_mean.clone()
    model(torch.rand(4, 3, 40, 40)).sum().backward()
    assert torch.equal(net.model.bn1.running_mean, stem_bn)  # frozen part: eval statistics
    assert not torch.equal(net.model.bn2.running_mean, head_bn)  # trainable part trains
    assert net.model.conv_head.weight.grad is not None and net.model.conv_stem.weight.grad is None
    with pytest.raises(ValueError, match="only 16 blocks"):
        build_timm_encoder(preset="efficientnet-lite0", weights="random", freeze=17)
    zero = build_timm_encoder(preset="efficientnet-lite0", weights="random", freeze=0)
    assert zero.fully_frozen and not zero.train().training  # no trainable block: frozen


def test_unfrozen_encoder_follows_the_parent_and_gets_gradients() -> None:
    torch.manual_seed(0)
    net = build_timm_encoder(preset="resnet50-trunc", weights="random", freeze=False)
    net.train()
    assert net.training and all(p.requires_grad for p in net.parameters())
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    assert net.model.conv1.weight.grad is not None


def test_cuda_helpers_leave_cpu_unchanged(lite0: TimmEncoder) -> None:
    x = torch.rand(2, 3, 40, 40)
    with E.cuda_autocast("cpu"):
        inside = lite0(x)
    assert torch.equal(inside, lite0(x)) and inside.dtype == torch.float32
    assert isinstance(E.cuda_autocast("cpu"), type(E.cuda_autocast("cuda", enabled=False)))
    lin = nn.Conv2d(3, 4, 3)
    assert E.prepare_for_device(lin, "cpu").weight.is_contiguous()


# ----------------------------------------------------------------------------- feature cache


def _keys(n: int, enc: str = "enc:a", slide: str = "s1", mpp: float = 0.5) -> list[FeatureKey]:
    return [FeatureKey.of(slide, 10 * i, 20 * i, 224, mpp, enc) for i in range(n)]


def test_cache_hits_misses_and_lru_eviction_by_bytes() -> None:
    cache = FeatureCache(max_bytes=4 * 8 * 4)  # room for four 8-d float32 rows
    keys = _keys(6)
    feats = torch.arange(48, dtype=torch.float32).view(6, 8)
    hits, missing = cache.get_many(keys[:2])
    assert hits == {} and missing == keys[:2] and cache.hit_rate == 0.0
    cache.put_many(keys[:4], feats[:4])
    assert len(cache) == 4 and cache.nbytes == 4 * 8 * 4
    hits, missing = cache.get_many([keys[0], keys[3]])  # touches 0 and 3
    assert missing == [] and torch.equal(hits[keys[3]], feats[3])
    cache.put_many(keys[4:], feats[4:])  # evicts the least recently used: 1 and 2
    assert keys[1] not in cache and keys[2] not in cache and keys[0] in cache
    assert cache.nbytes <= cache.max_bytes
    _, missing = cache.get_many(keys)
    assert missing == [keys[1], keys[2]]
    assert (cache.hits, cache.misses) == (2 + 4, 2 + 2)
    assert cache.hit_rate == pytest.approx(6 / 10)


def test_cache_keys_separate_encoders_mpp_and_slides() -> None:
    cache = FeatureCache()
    cache.put_many(_keys(1), torch.ones(1, 3))
    for other in (_keys(1, enc="enc:b"), _keys(1, mpp=1.0), _keys(1, slide="s2")):
        assert cache.get_many(other)[1] == other
    assert FeatureKey.of(Path("s1"), 0, 0, 224, 0.5000000001, "enc:a") == _keys(1)[0]


def test_cache_fetch_computes_only_the_missing_rows() -> None:
    cache = FeatureCache()
    keys = _keys(5)
    table = torch.randn(5, 4)
    calls: list[list[int]] = []

    request = [keys[0], keys[1], keys[4], keys[0]]

    def compute(idx: list[int]) -> torch.Tensor:
        calls.append(idx)
        return table[[keys.index(request[i]) for i in idx]]

    cache.put_many(keys[1:3], table[1:3])
    out = cache.fetch(request, compute)
    assert calls == [[0, 2]]  # key 0 (once) and key 4, by position in the request
    assert torch.equal(out, table[[0, 1, 4, 0]])
    request = keys[:3]
    assert torch.equal(cache.fetch(request, compute), table[:3]) and len(calls) == 1


def test_cache_on_disk_survives_restarts_and_memory_eviction(tmp_path: Path) -> None:
    store = tmp_path / "features.zarr"
    keys = _keys(5) + _keys(2, slide="s2")
    feats = torch.randn(7, 6)
    first = FeatureCache(max_bytes=2 * 6 * 4, path=store)
    first.put_many(keys, feats)
    assert len(first) == 2  # memory keeps two rows, the disk all seven
    hits, missing = first.get_many(keys)
    assert missing == [] and first.disk_hits >= 5
    second = FeatureCache(max_bytes=1 << 20, path=store)
    hits, missing = second.get_many(keys[::-1] + _keys(1, enc="enc:other"))
    assert missing == _keys(1, enc="enc:other")
    assert all(torch.equal(hits[k], feats[i]) for i, k in enumerate(keys))
    second.put_many(keys[:1], feats[:1] + 1)  # an existing box is not appended again
    third = FeatureCache(path=store)
    assert torch.equal(third.get_many(keys[:1])[0][keys[0]], feats[0])


# ----------------------------------------------------------------------------- checkpoints


def test_frozen_encoder_checkpoints_reference_the_file_by_hash(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_timm_encoder(preset="resnet50-trunc", weights="random")
    path = _save(src.model.state_dict(), tmp_path / "r50.safetensors")
    net = build_timm_encoder(preset="resnet50-trunc", weights=path)
    state = E.encoder_state_for_checkpoint(net)
    assert state["state_dict"] is None and state["weights"]["path"] == str(path)
    assert state["weights"]["sha256"] == E.file_sha256(path)
    back = E.restore_encoder(state)
    x = torch.rand(2, 3, 40, 40)
    assert back.encoder_id == net.encoder_id and torch.equal(back(x), net(x))
    model = nn.Sequential(nn.Linear(2, 2), net)
    kept = E.strip_encoder_tensors(model.state_dict(), model)
    assert set(kept) == {"0.weight", "0.bias"}
    moved = tmp_path / "moved.safetensors"
    path.rename(moved)
    assert torch.equal(E.restore_encoder(state, weights=moved)(x), net(x))
    sd = src.model.state_dict()
    sd["conv1.weight"] = sd["conv1.weight"] + 1  # another file of the same architecture
    _save(sd, moved)
    with pytest.raises(EncoderHashMismatchError, match="moved.safetensors"):
        E.restore_encoder(state, weights=moved)
    other = build_timm_encoder(preset="resnet50-trunc", weights=moved)
    with pytest.raises(EncoderHashMismatchError, match="moved.safetensors"):
        E.load_encoder_state(other, state)


def test_fine_tuned_encoder_checkpoints_carry_the_trained_tensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build_timm_encoder(preset="efficientnet-lite0", weights="random")
    raw_names = torch.load(E._package_weights(E._PACKAGE_LITE0), weights_only=True).keys()
    full = dict(src.model.state_dict())
    full["classifier.weight"], full["classifier.bias"] = torch.zeros(1000, 1280), torch.zeros(1000)
    path = _save(dict(zip(raw_names, full.values(), strict=True)), tmp_path / "l0.pth")
    net = build_timm_encoder(preset="efficientnet-lite0", weights=path, freeze=1)
    with torch.no_grad():
        net.model.conv_head.weight.mul_(2.0)  # "training"
    net.train()
    net(torch.rand(4, 3, 32, 32))  # updates the trainable BatchNorm's statistics
    state = E.encoder_state_for_checkpoint(net)
    assert (
        "conv_head.weight" in state["state_dict"] and "conv_stem.weight" not in state["state_dict"]
    )
    back = E.restore_encoder(state).eval()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(back(x), net.eval()(x))
    torch.manual_seed(1)
    rnd = build_timm_encoder(preset="efficientnet-lite0", weights="random")
    rstate = E.encoder_state_for_checkpoint(rnd)
    assert rstate["weights"] is None and len(rstate["state_dict"]) == len(rnd.model.state_dict())
    again = E.restore_encoder(rstate)
    assert again.encoder_id == rnd.encoder_id and torch.equal(again(x), rnd(x))


def test_benchmark_reports_a_positive_time(lite0: TimmEncoder) -> None:
    from ats_wsi.benchmarks.encoders import benchmark_ms_per_patch

    ms = benchmark_ms_per_patch(lite0, patch_size=32, batch=2, repeats=1, threads=1)
    assert 0 < ms < 10_000
