"""Device-side Megapixel MNIST: same placements -> the same pixels as the CPU generator.

Run on CPU: every comparison is exact (``torch.equal``), since the device renderer uses the
CPU generator's own resized pieces and the same float32 arithmetic.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST
from ats_wsi.datasets.megapixel_mnist_device import (
    DeviceLoader,
    DeviceMegapixelMNIST,
    PlacementPatchSource,
)
from ats_wsi.datasets.mnist import DigitPool
from ats_wsi.model import ATSModel
from ats_wsi.patches import PatchSource, TensorPatchSource


@pytest.fixture(scope="module")
def pool() -> DigitPool:
    # Textured "digits" (random grey levels in a blob) so that resampling and every pixel
    # value matter; 8 per class.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 8)
    yy, xx = np.mgrid[:28, :28]
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for i in range(len(labels)):
        cy, cx, r = rng.uniform(9, 19), rng.uniform(9, 19), rng.uniform(5, 10)
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        images[i][blob] = rng.integers(1, 256, blob.sum())
    return DigitPool(images, labels.astype(np.int64), "synthetic-textured")


def _dense(pool: DigitPool, order: str, **kw: object) -> MegapixelMNIST:
    """Small canvas with much noise: pieces overlap, so paste order is exercised."""
    args = dict(canvas_size=(150, 190), scale=0.2, n_noise=40, noise_order=order, seed=5)
    args.update(kw)
    return MegapixelMNIST(pool, 12, **args)


@pytest.mark.parametrize("order", ["after", "before"])
def test_canvases_and_low_view_match_cpu_generator(pool: DigitPool, order: str) -> None:
    ds = _dense(pool, order)
    dev = DeviceMegapixelMNIST(ds)
    idx = torch.arange(len(ds))
    low = dev.render_low(idx)[:, 0].numpy()
    high_u8 = dev.render_high(idx, "uint8")[:, 0].numpy()
    high_f = dev.render_high(idx, "float32")[:, 0].numpy()
    assert high_u8.dtype == np.uint8 and high_f.dtype == low.dtype == np.float32
    for i in range(len(ds)):
        np.testing.assert_array_equal(low[i], ds.render_low(i))
        np.testing.assert_array_equal(high_u8[i], ds.render_high_uint8(i))
        np.testing.assert_array_equal(high_f[i], ds.render_high(i))


def test_paste_order_is_reproduced(pool: DigitPool) -> None:
    # Not vacuous: with this much noise the two orders give different canvases, and the
    # device renderer follows each one.
    after, before = _dense(pool, "after"), _dense(pool, "before")
    a = DeviceMegapixelMNIST(after).render_high(range(12))
    b = DeviceMegapixelMNIST(before).render_high(range(12))
    assert not torch.equal(a, b)
    assert np.array_equal(a[3, 0].numpy(), after.render_high_uint8(3))


def _boxes(dev: DeviceMegapixelMNIST, idx: torch.Tensor, n: int, p: int) -> torch.Tensor:
    """Boxes near pieces (digits and noise), some reaching or lying outside the canvas."""
    g = torch.Generator().manual_seed(1)
    pos = dev.pos[idx]
    pick = torch.randint(0, pos.shape[1], (len(idx), n), generator=g)
    centre = pos.gather(1, pick[..., None].expand(-1, -1, 2)) + 14
    tl = centre - p // 2 + torch.randint(-p, p, (len(idx), n, 2), generator=g)
    tl[:, 0] = torch.tensor([-p - 3, -p - 3])  # wholly outside
    tl[:, 1] = torch.tensor([-5, dev.canvas_size[1] - p + 9])  # partly outside
    return tl


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("p", [50, 13])
def test_patches_equal_cuts_from_the_cpu_canvas(pool: DigitPool, dtype: str, p: int) -> None:
    ds = _dense(pool, "after")
    dev = DeviceMegapixelMNIST(ds)
    idx = torch.tensor([7, 0, 3, 11, 5])
    src = dev.patch_source(idx, p, dtype)
    assert isinstance(src, PatchSource) and src.shape == (150, 190) and src.patch_size == p
    tl = _boxes(dev, idx, 24, p)
    render = ds.render_high_uint8 if dtype == "uint8" else ds.render_high
    canvas = torch.from_numpy(np.stack([render(int(i)) for i in idx]))[:, None]
    expected = TensorPatchSource(canvas, p).extract(tl)
    got = src.extract(tl)
    assert got.dtype == torch.float32 and got.shape == (5, 24, 1, p, p)
    assert torch.equal(got, expected)
    assert float(got.sum()) > 0 and not bool(got[:, 0].any())  # content; empty outside


def test_ats_forward_same_with_either_source(pool: DigitPool) -> None:
    ds = _dense(pool, "after")
    dev = DeviceMegapixelMNIST(ds)
    idx = torch.arange(4)
    x_low = torch.from_numpy(np.stack([ds.render_low(i) for i in range(4)]))[:, None]
    x_high = torch.from_numpy(np.stack([ds.render_high_uint8(i) for i in range(4)]))[:, None]
    torch.manual_seed(0)
    model = ATSModel.from_config(
        {
            "attention_net": "mnist",
            "feature_net": {"name": "mnist", "width": 8},
            "num_classes": 10,
            "n_patches": 5,
            "patch_size": 20,
        }
    )
    a = model(x_low, x_high, generator=torch.Generator().manual_seed(3))
    b = model(
        dev.render_low(idx), dev.patch_source(idx, 20), generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(a.locations, b.locations)
    assert torch.equal(a.patches, b.patches) and float(a.patches.sum()) > 0
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)


@pytest.mark.parametrize("target", ["majority", "top", "multi"])
def test_labels_match(pool: DigitPool, target: str) -> None:
    ds = _dense(pool, "after", target=target)
    dev = DeviceMegapixelMNIST(ds)
    for i in range(len(ds)):
        y = ds[i][2]
        got = dev.labels[i]
        if target == "multi":
            assert torch.equal(got, y)
        else:
            assert int(got) == y


def test_loader_shuffles_reproducibly_and_covers_every_item(pool: DigitPool) -> None:
    dev = DeviceMegapixelMNIST(_dense(pool, "after"))
    runs = []
    for _ in range(2):
        loader = DeviceLoader(dev, 5, shuffle=True, generator=torch.Generator().manual_seed(4))
        runs.append([b for b in loader])
    assert len(loader) == 3 and [len(b[2]) for b in runs[0]] == [5, 5, 2]
    order = torch.cat([b[1].idx for b in runs[0]])
    assert sorted(order.tolist()) == list(range(12)) and order.tolist() != list(range(12))
    assert torch.equal(order, torch.cat([b[1].idx for b in runs[1]]))
    x_low, src, y = runs[0][0]
    assert x_low.shape == (5, 1, 30, 38) and isinstance(src, PlacementPatchSource)
    assert torch.equal(y, dev.labels[src.idx])
    low, high, _ = DeviceLoader(dev, 4, views="high").__iter__().__next__()
    assert low.numel() == 0 and high.shape == (4, 1, 150, 190) and high.dtype == torch.uint8
    low, high, _ = next(iter(DeviceLoader(dev, 4, views="low")))
    assert low.shape == (4, 1, 30, 38) and high.numel() == 0


def test_subset_and_errors(pool: DigitPool) -> None:
    ds = _dense(pool, "after")
    dev = DeviceMegapixelMNIST(ds, n_items=3)
    assert len(dev) == 3
    with pytest.raises(ValueError, match="n_items"):
        DeviceMegapixelMNIST(ds, n_items=13)
    with pytest.raises(ValueError, match="dtype"):
        dev.render_high([0], "float16")
    with pytest.raises(ValueError, match="top_left"):
        dev.patch_source([0, 1], 10).extract(torch.zeros(3, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="views"):
        dev.batch([0], views="canvas")
