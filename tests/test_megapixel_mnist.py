"""Megapixel MNIST generator: labels, layout, noise order, determinism, laziness."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST, make_noise_patterns
from ats_wsi.datasets.mnist import DigitPool


@pytest.fixture(scope="module")
def pool() -> DigitPool:
    # Synthetic "digits": a filled square whose brightness encodes the class, so a digit's
    # pixels can be recognised on the canvas.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 6)
    images = np.zeros((len(labels), 28, 28), np.uint8)
    for i, c in enumerate(labels):
        images[i, 4:24, 4:24] = 100 + 15 * c + rng.integers(0, 3)
    return DigitPool(images, labels.astype(np.int64), "synthetic")


def test_default_geometry(pool: DigitPool) -> None:
    ds = MegapixelMNIST(pool, 3)
    x_low, x_high, y = ds[0]
    assert x_low.shape == (1, 180, 180) and x_high.shape == (1, 1500, 1500)
    assert x_low.dtype == x_high.dtype == torch.float32
    assert 0.0 <= float(x_high.min()) and float(x_high.max()) <= 1.0
    assert 0.0 <= float(x_low.min()) and float(x_low.max()) <= 1.0
    assert isinstance(y, int) and 0 <= y < 10


def test_label_rule_and_layout(pool: DigitPool) -> None:
    ds = MegapixelMNIST(pool, 40, canvas_size=200, n_noise=5, seed=3)
    for i in range(len(ds)):
        p = ds.placement(i)
        assert (p.digit_labels == p.target).sum() == 3
        assert (p.digit_labels != p.target).sum() == 2
        np.testing.assert_array_equal(pool.labels[p.digit_indices], p.digit_labels)
        assert ds[i][2] == p.target
        pos = p.digit_positions
        assert pos.min() >= 0 and pos.max() <= 200 - 28
        for a in range(5):
            for b in range(a + 1, 5):
                assert np.any(np.abs(pos[a] - pos[b]) >= 28), f"item {i}: boxes {a},{b} overlap"


def test_targets_are_roughly_uniform(pool: DigitPool) -> None:
    ds = MegapixelMNIST(pool, 500, canvas_size=100, n_noise=0)
    counts = np.bincount([ds.placement(i).target for i in range(len(ds))], minlength=10)
    assert counts.min() > 25  # expected 50 each


def test_extra_labels(pool: DigitPool) -> None:
    ds = MegapixelMNIST(pool, 30, canvas_size=150, n_noise=0, seed=1)
    for i in range(len(ds)):
        p = ds.placement(i)
        lab = ds.labels(i)
        assert lab["majority"] == p.target
        assert lab["max"] == p.digit_labels.max()
        top = np.lexsort((p.digit_positions[:, 1], p.digit_positions[:, 0]))[0]
        assert lab["top"] == p.digit_labels[top]
        assert lab["multi"].tolist() == [int(c in p.digit_labels) for c in range(10)]
    top_ds = MegapixelMNIST(pool, 30, canvas_size=150, n_noise=0, seed=1, target="top")
    assert top_ds[4][2] == ds.labels(4)["top"]
    multi = MegapixelMNIST(pool, 30, canvas_size=150, n_noise=0, seed=1, target="multi")[4][2]
    assert multi.dtype == torch.float32 and multi.sum() >= 2


def test_digits_are_pasted_at_their_positions(pool: DigitPool) -> None:
    ds = MegapixelMNIST(pool, 5, canvas_size=300, n_noise=0)
    p = ds.placement(2)
    low, high = ds.render_low(2), ds.render_high(2)
    for idx, (y, x) in zip(p.digit_indices, p.digit_positions, strict=True):
        np.testing.assert_allclose(high[y : y + 28, x : x + 28], pool.images[idx] / 255.0)
        ly, lx = int(y * ds.scale), int(x * ds.scale)
        assert low[ly : ly + 3, lx : lx + 3].sum() > 0  # rescaled digit at the scaled position
    assert high.sum() == pytest.approx(sum(pool.images[i].sum() / 255.0 for i in p.digit_indices))


def test_noise_order_is_observable(pool: DigitPool) -> None:
    # Many noise placements on a small canvas: noise boxes certainly hit digit boxes.
    kw = dict(n_images=4, canvas_size=160, n_noise=80, seed=5)
    after = MegapixelMNIST(pool, noise_order="after", **kw)
    before = MegapixelMNIST(pool, noise_order="before", **kw)
    for i in range(4):
        p = after.placement(i)
        h_after, h_before = after.render_high(i), before.render_high(i)
        # IPS variant: every digit intact.
        for idx, (y, x) in zip(p.digit_indices, p.digit_positions, strict=True):
            np.testing.assert_allclose(h_before[y : y + 28, x : x + 28], pool.images[idx] / 255)
        # Authors: the last noise pattern is on top of everything.
        k, (y, x), a = p.noise_patterns[-1], p.noise_positions[-1], p.noise_intensity[-1]
        np.testing.assert_allclose(
            h_after[y : y + 28, x : x + 28], after.patterns[k] * a, rtol=1e-6
        )
        assert not np.array_equal(h_after, h_before)
        assert not np.array_equal(after.render_low(i), before.render_low(i))


def test_noise_patterns() -> None:
    pats = make_noise_patterns(50, seed=0)
    assert pats.shape == (50, 28, 28) and set(np.unique(pats)) == {0.0, 1.0}
    assert (pats.sum(axis=(1, 2)) >= 28).all()  # two segments across the box
    # every pattern touches a corner (its lines start there)
    corners = pats[:, [0, 0, -1, -1], [0, -1, 0, -1]]
    assert (corners.max(axis=1) == 1).all()
    np.testing.assert_array_equal(pats, make_noise_patterns(50, seed=0))
    assert not np.array_equal(pats, make_noise_patterns(50, seed=1))


def test_noise_intensity_range(pool: DigitPool) -> None:
    ds = MegapixelMNIST(pool, 20, canvas_size=200, n_noise=10)
    vals = np.concatenate([ds.placement(i).noise_intensity for i in range(20)])
    assert vals.min() >= 0.8 and vals.max() <= 1.0


def test_deterministic_per_seed_and_order_free(pool: DigitPool) -> None:
    a = MegapixelMNIST(pool, 10, canvas_size=200, n_noise=10, seed=7)
    b = MegapixelMNIST(pool, 10, canvas_size=200, n_noise=10, seed=7)
    c = MegapixelMNIST(pool, 10, canvas_size=200, n_noise=10, seed=8)
    late = b[6]  # read out of order first
    _ = b[0]
    for x, y in zip(a[6], late, strict=True):
        assert torch.equal(torch.as_tensor(x), torch.as_tensor(y))
    assert not torch.equal(a[6][1], c[6][1])


def test_dataset_is_lazy(pool: DigitPool) -> None:
    small = len(pickle.dumps(MegapixelMNIST(pool, 10)))
    huge = len(pickle.dumps(MegapixelMNIST(pool, 1_000_000)))
    assert abs(huge - small) < 64  # nothing per item is stored (only n_images grows)
    assert small < pool.images.nbytes + 500_000


def test_uint8_and_views(pool: DigitPool) -> None:
    f = MegapixelMNIST(pool, 2, canvas_size=120, n_noise=3)
    u = MegapixelMNIST(pool, 2, canvas_size=120, n_noise=3, high_dtype="uint8")
    assert u[1][1].dtype == torch.uint8
    torch.testing.assert_close(u[1][1].float() / 255, f[1][1], atol=0.5 / 255, rtol=0)
    low_only = MegapixelMNIST(pool, 2, canvas_size=120, n_noise=3, views="low")[1]
    assert low_only[1].numel() == 0 and torch.equal(low_only[0], f[1][0])


def test_bad_arguments(pool: DigitPool) -> None:
    with pytest.raises(ValueError, match="noise_order"):
        MegapixelMNIST(pool, 1, noise_order="middle")
    with pytest.raises(ValueError, match="majority"):
        MegapixelMNIST(pool, 1, n_digits=4, n_target=2)
    with pytest.raises(RuntimeError, match="cannot place"):
        MegapixelMNIST(pool, 1, canvas_size=60, n_noise=0).placement(0)
    with pytest.raises(IndexError):
        MegapixelMNIST(pool, 1).placement(1)
