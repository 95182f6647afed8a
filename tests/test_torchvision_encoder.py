"""The ``torchvision_resnet`` feature net (ats_wsi.encoders.torchvision_resnet) and the
PatchEncoder protocol it implements: a real torchvision ResNet-18 state dict written to a
temporary file, loaded offline, frozen, checkpointed by reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from ats_wsi.checkpoint import load_model_state, model_state
from ats_wsi.encoders import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    EncoderHashMismatchError,
    EncoderWeightsError,
    EncoderWeightsMissingError,
    PatchEncoder,
    TorchvisionResNetEncoder,
    build_timm_encoder,
    build_torchvision_resnet,
    encoder_modules,
    encoder_parameters,
)
from ats_wsi.model import ATSModel
from ats_wsi.nets import build_feature_net

SIZE = 32  # encoder input side: small, so resnet18 runs fast on CPU


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """One torch thread: on the shared 2-core CI box two threads are several times slower."""


def _resnet18(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None).eval()


@pytest.fixture()
def weights(tmp_path: Path) -> Path:
    """torchvision's own layout: a plain resnet18 state dict saved with torch.save."""
    path = tmp_path / "resnet18-f37072fd.pth"
    torch.save(_resnet18().state_dict(), path)
    return path


def _reference(x: torch.Tensor) -> torch.Tensor:
    """torchvision's resnet18 (same seed), fc = Identity, the same resize + normalisation."""
    ref = _resnet18()
    ref.fc = nn.Identity()
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        return ref((x - mean) / std)


def _spec(path: Path | str, **kw: object) -> dict[str, object]:
    return {"name": "torchvision_resnet", "arch": "resnet18", "weights": str(path), **kw}


def test_resnet18_matches_torchvision_and_is_frozen(weights: Path) -> None:
    net = build_torchvision_resnet("resnet18", weights, input_size=SIZE)
    assert isinstance(net, TorchvisionResNetEncoder) and net.out_dim == 512
    assert net.normalizes_input is True and net.fully_frozen is True
    x = torch.rand(3, 3, 48, 48)  # not the encoder's side: resized inside
    want = _reference(x)
    assert torch.equal(net.embed(net.preprocess(x)), want)
    assert torch.equal(net(x), F.normalize(want, dim=1))
    assert net(x).shape == (3, 512)
    # Frozen: no trainable parameters, eval mode whatever the parent does, no graph.
    assert net.trainable_parameters() == [] and not any(p.requires_grad for p in net.parameters())
    parent = nn.Sequential(net).train()
    assert not net.training and not any(m.training for m in net.modules())
    assert not parent[0](x).requires_grad
    assert encoder_parameters(parent) == []


def test_registered_feature_net_and_safetensors(weights: Path, tmp_path: Path) -> None:
    net = build_feature_net(**_spec(weights, input_size=SIZE))  # type: ignore[arg-type]
    assert isinstance(net, TorchvisionResNetEncoder)
    from safetensors.torch import save_file

    st = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in _resnet18().state_dict().items()}, str(st))
    other = build_torchvision_resnet("resnet18", st, input_size=SIZE)
    x = torch.rand(2, 3, SIZE, SIZE)
    assert torch.equal(other(x), net(x))


def test_encoder_id_names_arch_size_and_file(weights: Path, tmp_path: Path) -> None:
    from ats_wsi.encoders import file_sha256

    net = build_torchvision_resnet("resnet18", weights, input_size=SIZE)
    assert net.encoder_id == f"torchvision-resnet18@{SIZE}:{file_sha256(weights)[:12]}"
    assert build_torchvision_resnet("resnet18", weights, input_size=64).encoder_id != net.encoder_id
    other = tmp_path / "other.pth"
    torch.save(_resnet18(seed=1).state_dict(), other)
    assert build_torchvision_resnet("resnet18", other, input_size=SIZE).encoder_id != net.encoder_id


def _ats(path: Path, **kw: object) -> ATSModel:
    torch.manual_seed(0)
    return ATSModel.from_config(
        {
            "attention_net": {"name": "histology", "width": 4},
            "feature_net": _spec(path, input_size=SIZE, **kw),
            "num_classes": 2,
            "n_patches": 3,
            "patch_size": 16,
        }
    )


def _forward(model: ATSModel) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x_high = torch.rand(1, 3, 64, 64, generator=gen)
    x_low = F.avg_pool2d(x_high, 4)
    with torch.no_grad():
        return model.eval()(x_low, x_high, generator=torch.Generator().manual_seed(1)).logits


def test_checkpoint_references_the_file_and_restores_identical_outputs(weights: Path) -> None:
    model = _ats(weights)
    with torch.no_grad():
        model.head.weight.add_(0.5)  # "trained"
    state = model_state(model)
    assert not [k for k in state["model"] if k.startswith("feature_net.")]  # by reference
    blob = state["encoders"]["feature_net"]
    assert blob["state_dict"] is None and blob["weights"]["path"] == str(weights)
    assert blob["encoder_id"] == model.feature_net.encoder_id
    state = torch.load(_roundtrip(state, weights.parent / "ckpt.pt"), weights_only=True)
    back = _ats(weights)
    load_model_state(back, state)
    assert torch.equal(_forward(back), _forward(model))
    # The file changed after saving: the rebuilt encoder's hash no longer matches.
    sd = _resnet18().state_dict()
    sd["conv1.weight"] = sd["conv1.weight"] + 1
    torch.save(sd, weights)
    with pytest.raises(EncoderHashMismatchError, match="resnet18-f37072fd.pth"):
        load_model_state(_ats(weights), state)


def _roundtrip(state: dict[str, object], path: Path) -> Path:
    torch.save(state, path)
    return path


def test_trainable_encoder_checkpoints_carry_its_tensors(weights: Path) -> None:
    model = _ats(weights, freeze=False)
    assert not model.feature_net.fully_frozen
    assert len(encoder_parameters(model)) == len(list(model.feature_net.parameters()))
    with torch.no_grad():
        model.feature_net.model.conv1.weight.mul_(2.0)  # "fine-tuned"
    state = model_state(model)
    assert "conv1.weight" in state["encoders"]["feature_net"]["state_dict"]
    back = _ats(weights, freeze=False)
    load_model_state(back, state)
    assert torch.equal(_forward(back), _forward(model))


@pytest.mark.parametrize(
    "name",
    [
        "https://download.pytorch.org/models/resnet18-f37072fd.pth",
        "hf-hub:timm/resnet18.tv_in1k",
        "IMAGENET1K_V1",
        "ResNet18_Weights.DEFAULT",
    ],
)
def test_hub_names_and_urls_are_refused_saying_what_to_download(name: str) -> None:
    with pytest.raises(EncoderWeightsError, match="never downloads") as info:
        build_torchvision_resnet("resnet18", name)
    msg = str(info.value)
    assert "\n" not in msg and "resnet18-f37072fd.pth" in msg and "feature_net.weights" in msg


def test_missing_file_or_weights_name_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(EncoderWeightsMissingError, match=str(missing)):
        build_torchvision_resnet("resnet50", missing)
    with pytest.raises(EncoderWeightsMissingError, match="resnet50-0676ba61.pth"):
        build_torchvision_resnet("resnet50")
    with pytest.raises(ValueError, match="available: resnet18, resnet34, resnet50"):
        build_torchvision_resnet("resnet101", missing)


def test_weights_of_another_resnet_are_refused(weights: Path) -> None:
    with pytest.raises(EncoderWeightsError, match="resnet18-f37072fd.pth"):
        build_torchvision_resnet("resnet34", weights)


def test_protocol_separates_encoders_from_plain_feature_nets(weights: Path) -> None:
    tv = build_torchvision_resnet("resnet18", weights, input_size=SIZE)
    timm_net = build_timm_encoder(arch="resnet18", weights="random", device="meta")
    assert isinstance(tv, PatchEncoder) and isinstance(timm_net, PatchEncoder)
    for name in ("histology", "mnist", "sts_resnet"):
        assert not isinstance(build_feature_net(name), PatchEncoder)
    model = nn.Sequential(build_feature_net("histology"), tv)
    assert list(encoder_modules(model)) == ["1"]
