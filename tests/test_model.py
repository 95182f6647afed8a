"""ATSModel: wiring, shapes, locations, gradients, masks, determinism."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from ats_wsi.model import ATSModel, ATSOutput
from ats_wsi.nets import build_attention_net, build_feature_net
from ats_wsi.patches import PatchSource, TensorPatchSource, extract_patches

B, LOW, HIGH, P = 3, 12, 48, 16  # scale 4: cell i centred at 4 i + 2 high-res px


def make_model(**kw: object) -> ATSModel:
    torch.manual_seed(0)
    cfg: dict = {"num_classes": 5, "n_patches": 4, "patch_size": P} | kw
    return ATSModel(
        build_attention_net("mnist", in_channels=1),
        build_feature_net("mnist", in_channels=1),
        **cfg,
    )


def make_batch(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x_high = torch.rand(B, 1, HIGH, HIGH, generator=gen)
    return F.avg_pool2d(x_high, HIGH // LOW), x_high


def test_output_shapes_and_locations() -> None:
    model = make_model()
    x_low, x_high = make_batch()
    out = model(x_low, x_high, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, ATSOutput)
    assert out.logits.shape == (B, 5)
    assert out.attention.shape == (B, LOW, LOW)
    assert out.probs.shape == (B, LOW * LOW)
    assert torch.allclose(out.probs.sum(1), torch.ones(B))
    assert torch.equal(out.attention.flatten(1), out.probs)
    assert out.indices.shape == out.locations.shape[:2] == (B, 4)
    assert out.patches.shape == (B, 4, 1, P, P)
    assert out.features.shape == (B, 4, 32)
    # Boxes are centred on their cell: centre = 4 * (row, col) + 2.
    rc = torch.stack((out.indices // LOW, out.indices % LOW), dim=-1)
    assert torch.equal(out.locations + P // 2, 4 * rc + 2)
    # ... so every box centre is inside the image, boxes may stick out by at most P/2.
    assert (out.locations >= -P // 2).all() and (out.locations + P <= HIGH + P // 2).all()
    # Without replacement: distinct cells per sample.
    assert all(len(set(row.tolist())) == 4 for row in out.indices)


def test_patches_are_cut_at_the_locations() -> None:
    model = make_model()
    x_low, x_high = make_batch()
    out = model(x_low, TensorPatchSource(x_high, P), generator=torch.Generator().manual_seed(2))
    assert torch.equal(out.patches, extract_patches(x_high, out.locations, P))


def test_gradients_reach_both_networks() -> None:
    for sampler in ("without_replacement", "with_replacement"):
        model = make_model(sampler=sampler, smoothing=1e-4)
        x_low, x_high = make_batch()
        out = model(x_low, x_high, generator=torch.Generator().manual_seed(3))
        F.cross_entropy(out.logits, torch.tensor([0, 1, 2])).backward()
        for part in (model.attention_net, model.feature_net, model.head):
            for name, p in part.named_parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0, (sampler, name)


def test_mask_is_respected_and_n_is_clamped() -> None:
    model = make_model(n_patches=6)
    x_low, x_high = make_batch()
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(B, LOW, LOW, generator=gen) < 0.3
    mask[0] = False
    mask[0, 2, 3] = mask[0, 7, 1] = mask[0, 11, 11] = True  # sample 0: only 3 cells allowed
    for sampler in ("with_replacement", "without_replacement", "topk"):
        for _ in range(5):
            out = model(x_low, x_high, mask, sampler=sampler, generator=gen)
            allowed = mask.flatten(1).gather(1, out.indices)
            assert allowed.all(), sampler
            assert (out.probs[~mask.flatten(1)] == 0).all()
            expected_n = 6 if sampler == "with_replacement" else 3
            assert out.indices.shape == (B, expected_n)
    out = model(x_low, x_high, mask, sampler="without_replacement", generator=gen)
    assert set(out.indices[0].tolist()) == {2 * LOW + 3, 7 * LOW + 1, 11 * LOW + 11}


def test_deterministic_given_a_generator() -> None:
    model = make_model()
    x_low, x_high = make_batch()
    a = model(x_low, x_high, generator=torch.Generator().manual_seed(5))
    b = model(x_low, x_high, generator=torch.Generator().manual_seed(5))
    c = model(x_low, x_high, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.indices, b.indices) and torch.equal(a.logits, b.logits)
    assert not torch.equal(a.indices, c.indices)


def test_topk_and_per_call_overrides() -> None:
    model = make_model()
    x_low, x_high = make_batch()
    out = model(x_low, x_high, sampler="topk", n_patches=7)
    assert torch.equal(out.indices, out.probs.topk(7, dim=1).indices)
    # topk pairs with the topk estimator: attention-weighted mean of the drawn features.
    a = out.probs.gather(1, out.indices).unsqueeze(-1)
    est = (a * out.features).sum(1) / a.sum(1)
    assert torch.allclose(out.logits, model.head(est), atol=1e-6)


class HalfResSource:
    """A source that reads each box at half resolution, like a slide read at a coarser level."""

    def __init__(self, x: Tensor, patch_size: int) -> None:
        self.inner = TensorPatchSource(x, patch_size)
        self.shape = self.inner.shape
        self.patch_size = patch_size

    def extract(self, top_left: Tensor) -> Tensor:
        p = self.inner.extract(top_left)
        return F.avg_pool2d(p.flatten(0, 1), 2).unflatten(0, p.shape[:2])


def test_custom_source_with_coarser_patches() -> None:
    x_low, x_high = make_batch()
    model = make_model(patch_size=8)  # ignored: the source's patch_size wins
    src = HalfResSource(x_high, 2 * P)
    assert isinstance(src, PatchSource)
    out = model(x_low, src, generator=torch.Generator().manual_seed(7))
    assert out.patches.shape == (B, 4, 1, P, P)
    rc = torch.stack((out.indices // LOW, out.indices % LOW), dim=-1)
    assert torch.equal(out.locations + P, 4 * rc + 2)


def test_from_config_and_validation() -> None:
    model = ATSModel.from_config(
        {
            "attention_net": {"name": "sts", "in_channels": 3},
            "feature_net": "sts_resnet",
            "num_classes": 4,
            "n_patches": 2,
            "patch_size": 24,
            "sampler": "with_replacement",
            "smoothing": 1e-5,
        }
    )
    assert model.receptive_field == 9 and model.head.in_features == 32
    x_high = torch.rand(2, 3, 200, 200)
    out = model(F.avg_pool2d(x_high, 2), x_high, generator=torch.Generator().manual_seed(0))
    assert out.logits.shape == (2, 4) and out.attention.shape == (2, 11, 11)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_model(sampler="nope")
    with pytest.raises(TypeError, match="receptive_field"):
        ATSModel(torch.nn.Conv2d(1, 1, 1), build_feature_net("mnist"), 2, 1, 8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_runs_on_cuda() -> None:
    model = make_model().cuda()
    x_low, x_high = make_batch()
    gen = torch.Generator(device="cuda").manual_seed(0)
    out = model(x_low.cuda(), x_high.cuda(), generator=gen)
    out.logits.sum().backward()
    assert out.logits.is_cuda and out.locations.is_cuda
    assert torch.equal(out.patches, extract_patches(x_high.cuda(), out.locations, P))


def test_input_normalisation_inside_the_model_equals_normalising_outside() -> None:
    x_low, x_high = make_batch()
    plain, inside = make_model(), make_model(input_mean=0.5, input_std=0.25)
    gen = torch.Generator().manual_seed(3)
    # Boxes reaching outside the image are filled with 0 before normalisation: -2 after.
    outside = TensorPatchSource((x_high - 0.5) / 0.25, P, fill=-2.0)
    want = plain((x_low - 0.5) / 0.25, outside, generator=gen)
    got = inside(x_low, x_high, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got.logits, want.logits, rtol=0, atol=0)
    assert torch.equal(got.indices, want.indices)
    # The output keeps the patches as read, not as normalised.
    assert torch.equal(got.patches, extract_patches(x_high, got.locations, P))
    # Configuration, not state: checkpoints of models without normalisation still load.
    assert "input_mean" not in inside.state_dict()
    inside.load_state_dict(plain.state_dict())


def test_feature_net_that_normalises_itself_gets_raw_patches() -> None:
    seen: list[Tensor] = []
    net = build_feature_net("mnist", in_channels=1)
    net.normalizes_input = True
    net.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    torch.manual_seed(0)
    model = ATSModel(
        build_attention_net("mnist", in_channels=1),
        net,
        num_classes=5,
        n_patches=4,
        patch_size=P,
        input_mean=0.5,
        input_std=0.25,
    )
    x_low, x_high = make_batch()
    out = model(x_low, x_high, generator=torch.Generator().manual_seed(3))
    assert torch.equal(seen[0], out.patches.reshape(-1, 1, P, P))


def test_normalisation_needs_both_statistics() -> None:
    with pytest.raises(ValueError, match="both input_mean and input_std"):
        make_model(input_mean=0.5)


def test_uint8_views_are_prepared_block_by_block() -> None:
    """A uint8 view gives the float view's attention (scaled and normalised per block), in
    one piece and block by block on a view above ``whole``, with tissue blocks skipped."""
    from ats_wsi.nets import build_attention_net

    torch.manual_seed(0)
    model = ATSModel(
        build_attention_net("tile_pool", pool=8),
        build_feature_net("histology"),
        2,
        4,
        32,
        sampler="topk",
        input_mean=[0.7, 0.5, 0.6],
        input_std=[0.2, 0.25, 0.3],
    ).eval()
    gen = torch.Generator().manual_seed(1)
    u8 = torch.randint(0, 256, (1, 3, 1096, 1040), dtype=torch.uint8, generator=gen)
    high = torch.rand(1, 3, 1096, 1040, generator=gen)
    mask = torch.zeros(1, 137, 130, dtype=torch.bool)
    mask[0, 10:60, 5:40] = True
    mask[0, 120:, 100:] = True
    with torch.no_grad():
        a = model(u8, high, mask)
        b = model(u8.float() / 255, high, mask)
        whole = model.attention_net(model.prep_view(u8))
    torch.testing.assert_close(a.attention, b.attention, rtol=0, atol=0)
    assert torch.equal(a.indices, b.indices)
    kept = mask[0]
    torch.testing.assert_close(
        a.attention[0],
        torch.softmax(torch.where(kept, whole[0, 0], -torch.inf).flatten(), 0).view_as(kept),
        rtol=1e-5,
        atol=1e-7,
    )
