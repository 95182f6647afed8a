"""Network registry and the contracts every registered net must meet."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ats_wsi import nets
from ats_wsi.nets import (
    ATTENTION_NETS,
    FEATURE_NETS,
    build_attention_net,
    build_feature_net,
    register_attention_net,
    register_feature_net,
)

# (name, in_channels, low-res input (h, w), expected map (a_h, a_w), expected receptive field)
ATTENTION_CASES = [
    ("mnist", 1, (20, 30), (20, 30), 0),
    ("sts", 3, (72, 96), (8, 11), 9),  # (72 - 8) / 8 = 8, (96 - 8) / 8 = 11
    ("histology", 3, (24, 16), (24, 16), 0),
    ("tile_pool", 3, (24, 16), (3, 2), 0),  # one cell per 8 x 8 view pixels (a 256 px tile)
    ("uniform_tiles", 3, (24, 16), (3, 2), 0),
]
# (name, in_channels, patch side, expected out_dim)
FEATURE_CASES = [
    ("mnist", 1, 16, 32),
    ("sts_resnet", 3, 32, 32),
    ("histology", 3, 32, 32),
    ("timm", 3, 32, 1280),  # ats_wsi.encoders: the bundled EfficientNet-Lite0
]


# Feature nets that need a weights file, tested in their own files.
COVERED_ELSEWHERE = {"torchvision_resnet"}  # tests/test_torchvision_encoder.py


def test_every_registered_net_is_covered() -> None:
    assert {c[0] for c in ATTENTION_CASES} == set(ATTENTION_NETS)
    assert {c[0] for c in FEATURE_CASES} | COVERED_ELSEWHERE == set(FEATURE_NETS)


@pytest.mark.parametrize(("name", "channels", "size", "out", "rf"), ATTENTION_CASES)
def test_attention_shapes(
    name: str, channels: int, size: tuple[int, int], out: tuple[int, int], rf: int
) -> None:
    torch.manual_seed(0)
    net = build_attention_net(name, in_channels=channels)
    logits = net(torch.rand(2, channels, *size))
    assert logits.shape == (2, 1, *out)
    assert net.receptive_field == rf


@pytest.mark.parametrize(("name", "channels", "size", "dim"), FEATURE_CASES)
def test_features_are_unit_norm(name: str, channels: int, size: int, dim: int) -> None:
    torch.manual_seed(0)
    net = build_feature_net(name, in_channels=channels)
    f = net(torch.rand(6, channels, size, size))
    assert net.out_dim == dim
    assert f.shape == (6, dim)
    assert torch.allclose(f.norm(dim=1), torch.ones(6), atol=1e-5)


def test_uniform_tiles_attention_is_uniform() -> None:
    net = build_attention_net("uniform_tiles")
    assert not list(net.parameters())
    assert torch.equal(net(torch.rand(2, 3, 24, 16)), torch.zeros(2, 1, 3, 2))


def test_features_depend_on_the_input() -> None:
    # Guards the He initialisation: fresh features must tell faint noise patches apart (with
    # PyTorch's default init their cosine similarity is > 0.999, with He init about 0.97).
    torch.manual_seed(0)
    net = build_feature_net("mnist", in_channels=1)
    f = net(0.1 * torch.randn(8, 1, 16, 16))
    cos = f @ f.T
    assert cos[~torch.eye(8, dtype=torch.bool)].max() < 0.99


def test_width_and_channels_are_configurable() -> None:
    f = build_feature_net("histology", in_channels=1, width=4)
    assert f.out_dim == 8 and f(torch.rand(2, 1, 16, 16)).shape == (2, 8)
    a = build_attention_net("histology", in_channels=1, width=2)
    assert a(torch.rand(1, 1, 5, 5)).shape == (1, 1, 5, 5)


def test_unknown_names_list_the_available_ones() -> None:
    with pytest.raises(ValueError, match="available: histology, mnist, sts"):
        build_attention_net("nope")
    with pytest.raises(ValueError, match="sts_resnet"):
        build_feature_net("nope")


def test_register_and_duplicate() -> None:
    @register_attention_net("_test_tiny")
    def tiny(in_channels: int = 1) -> nets.AttentionNet:
        return nets.AttentionNet(nn.Conv2d(in_channels, 1, 1))

    try:
        assert build_attention_net("_test_tiny", in_channels=2).receptive_field == 0
        with pytest.raises(ValueError, match="already registered"):
            register_attention_net("_test_tiny")(tiny)
        with pytest.raises(ValueError, match="already registered"):
            register_feature_net("mnist")(tiny)
    finally:
        del ATTENTION_NETS["_test_tiny"]


def _receptive_extent(convs: nn.Module, size: int = 31) -> int:
    """Side of the input window that one output unit of ``convs`` depends on.

    Weights are made positive and biases zero so no ReLU is dead and every dependency shows
    up as a non-zero gradient.
    """
    convs = copy.deepcopy(convs)
    for m in convs.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.constant_(m.weight, 0.1)
            nn.init.zeros_(m.bias)
    x = torch.ones(1, convs[0].in_channels, size, size, requires_grad=True)
    out = convs(x)
    out[0, 0, out.shape[2] // 2, out.shape[3] // 2].backward()
    rows = x.grad[0].abs().sum(dim=(0, 2)).nonzero()
    return int(rows.max() - rows.min() + 1)


def test_sts_receptive_field_matches_measurement() -> None:
    net = build_attention_net("sts", in_channels=3)
    convs = net[0]  # the conv stack before max-pool 8
    # receptive_field = 9 is the window one conv output sees: 1 + 4 * (3 - 1).
    assert _receptive_extent(convs) == net.receptive_field == 9
    # The border the valid convs remove is one pixel less (4 per side); see sts_attention.
    assert 40 - convs(torch.rand(1, 3, 40, 40)).shape[-1] == net.receptive_field - 1


def test_sts_widths_change_channels_not_geometry() -> None:
    net = build_attention_net("sts", in_channels=3, widths=(4, 4, 8))
    widths = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [4, 4, 8, 1] and net.receptive_field == 9
    assert net(torch.rand(1, 3, 72, 96)).shape == (1, 1, 8, 11)
    with pytest.raises(ValueError, match="3 widths"):
        build_attention_net("sts", widths=(8, 16))


def test_same_padding_nets_lose_no_border() -> None:
    for name, channels in (("mnist", 1), ("histology", 3)):
        net = build_attention_net(name, in_channels=channels)
        assert net(torch.rand(1, channels, 11, 13)).shape[-2:] == (11, 13)
        assert net.receptive_field == 0


def test_convs_start_with_zero_bias() -> None:
    for name, channels in (("mnist", 1), ("sts", 3), ("histology", 3)):
        for m in build_attention_net(name, in_channels=channels).modules():
            if isinstance(m, nn.Conv2d):
                assert torch.count_nonzero(m.bias) == 0


@pytest.mark.parametrize(
    ("name", "kw", "geometry"),
    [("tile_pool", {"pool": 8}, (3, 8)), ("histology", {}, (2, 1)), ("sts", {}, None)],
)
def test_blockwise_attention_equals_the_whole_view(name, kw, geometry) -> None:
    """Blocks with a halo of real neighbours give the whole-view logits (odd sizes, pool
    remainders, blocks much smaller than the view); nets without a tiling run whole."""
    from ats_wsi.nets import build_attention_net

    torch.manual_seed(0)
    net = build_attention_net(name, **kw).eval()
    assert net.tiling() == geometry
    x = torch.rand(1, 3, 301, 263)
    with torch.no_grad():
        whole, blocks = net(x), net.forward_blocks(x, block=64, whole=64)
    assert blocks.shape == whole.shape
    torch.testing.assert_close(blocks, whole, rtol=1e-5, atol=1e-5)


def test_blockwise_attention_skips_blocks_without_kept_cells() -> None:
    """With ``keep``, blocks holding no kept cell are not run (their cells are 0), every
    block holding one is, and the masked attention distribution is unchanged."""
    from ats_wsi.attention import attention_distribution
    from ats_wsi.nets import build_attention_net

    torch.manual_seed(0)
    net = build_attention_net("tile_pool", pool=8).eval()
    x = torch.rand(1, 3, 301, 263)
    keep = torch.zeros(1, 37, 32, dtype=torch.bool)
    keep[0, 2:6, 3:8] = True  # inside the first block (64 px = 8 cells a side)
    keep[0, 30, 31] = True  # one cell in the last block
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    with torch.no_grad():
        whole = net(x)
        calls.clear()
        blocks = net.forward_blocks(x, block=64, keep=keep, whole=64)
    assert blocks.shape == whole.shape and len(calls) == 2  # of 5 x 4 blocks
    torch.testing.assert_close(blocks[0, 0][keep[0]], whole[0, 0][keep[0]], rtol=1e-5, atol=1e-5)
    assert blocks[0, 0, 8:24].abs().sum() == 0  # skipped rows of blocks
    torch.testing.assert_close(
        attention_distribution(blocks, keep),
        attention_distribution(whole, keep),
        rtol=1e-5,
        atol=1e-7,
    )
    with torch.no_grad():  # a mask on another grid is ignored: every block runs
        calls.clear()
        net.forward_blocks(x, block=64, keep=torch.ones(1, 5, 5, dtype=torch.bool), whole=64)
    assert len(calls) == 20
    with torch.no_grad():  # a view within `whole` runs in one piece, as before blocks existed
        calls.clear()
        torch.testing.assert_close(net.forward_blocks(x, keep=keep), whole, rtol=0, atol=0)
    assert len(calls) == 1


@pytest.mark.parametrize("name, kw", [("tile_pool", {"pool": 8}), ("histology", {}), ("sts", {})])
def test_attention_grid_matches_the_net_output(name, kw) -> None:
    """The grid read from a net's tiling (no probe forward) is the shape the net outputs."""
    from ats_wsi.nets import build_attention_net
    from ats_wsi.slides.engine import attention_grid

    net = build_attention_net(name, **kw).eval()
    for h, w in [(301, 263), (64, 64), (97, 130)]:
        with torch.no_grad():
            expected = tuple(net(torch.zeros(1, 3, h, w)).shape[-2:])
        assert attention_grid(net, (3, h, w), "cpu") == expected
