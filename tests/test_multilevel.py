"""Exact enumeration of the two-level nested estimator.

Outer: K1 regions, N1 drawn; inner: in each drawn region, K2 cells, N2 drawn. We enumerate every
outer ordered sample and, for each drawn region independently, every inner ordered sample, and
compare the probability-weighted value and gradients with those of
``sum_r a1_r sum_k a2_{r,k} f_{r,k}``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ats_wsi.attention import attention_distribution
from ats_wsi.multilevel import nested_expectation

DT = torch.float64


def _orders(k: int, n: int, replacement: bool):
    if replacement:
        return list(itertools.product(range(k), repeat=n))
    return list(itertools.permutations(range(k), n))


def _prob(a: torch.Tensor, q, replacement: bool) -> torch.Tensor:
    p, left = torch.ones((), dtype=DT), torch.ones((), dtype=DT)
    for k in q:
        p = p * a[k] / (1.0 if replacement else left)
        left = left - (0 if replacement else a[k])
    return p


@pytest.mark.parametrize(
    ("modes", "replacement"),
    [
        (("without_replacement", "without_replacement"), (False, False)),
        (("with_replacement", "without_replacement"), (True, False)),
        (("without_replacement", "with_replacement"), (False, True)),
    ],
)
@pytest.mark.parametrize("with_baseline", [False, True])
def test_two_level_estimator_exactly_unbiased(modes, replacement, with_baseline):
    k1, n1, k2, n2, d = 3, 2, 3, 2, 2
    gen = torch.Generator().manual_seed(3)
    l1 = (2 * torch.randn(1, 1, 1, k1, generator=gen, dtype=DT)).requires_grad_()
    l2 = (2 * torch.randn(k1, 1, 1, k2, generator=gen, dtype=DT)).requires_grad_()
    feats = torch.randn(k1, k2, d, generator=gen, dtype=DT).requires_grad_()
    g = torch.randn(1, d, generator=gen, dtype=DT)
    # Any vector that does not depend on the draws keeps every level exactly unbiased.
    c = 3 * torch.randn(d, generator=gen, dtype=DT) if with_baseline else None

    a1 = attention_distribution(l1)  # (1, K1)
    a2 = attention_distribution(l2)  # (K1, K2)
    true = (a1[0].unsqueeze(-1) * torch.einsum("rk,rkd->rd", a2, feats)).sum(0, keepdim=True)
    true_grads = torch.autograd.grad((g * true).sum(), (l1, l2, feats))

    value = torch.zeros(1, d, dtype=DT)
    grads = [torch.zeros_like(t) for t in (l1, l2, feats)]
    total = torch.zeros((), dtype=DT)
    for q1 in _orders(k1, n1, replacement[0]):
        for inner in itertools.product(_orders(k2, n2, replacement[1]), repeat=n1):
            a1 = attention_distribution(l1)
            a2 = attention_distribution(l2)
            p = _prob(a1[0].detach(), q1, replacement[0])
            for r, q2 in zip(q1, inner, strict=True):
                p = p * _prob(a2[r].detach(), q2, replacement[1])
            idx1 = torch.tensor([q1])
            probs2 = a2[list(q1)]  # (N1, K2): one inner distribution per drawn region
            idx2 = torch.tensor(inner)
            f = feats[torch.tensor(q1).unsqueeze(1), idx2]  # (N1, N2, D)
            est = nested_expectation([a1, probs2], f, [idx1, idx2], modes, c)
            dg = torch.autograd.grad(p * (g * est).sum(), (l1, l2, feats))
            value += p * est.detach()
            total += p
            for acc, d_ in zip(grads, dg, strict=True):
                acc += d_
    torch.testing.assert_close(total, torch.ones((), dtype=DT))
    torch.testing.assert_close(value, true.detach(), atol=1e-10, rtol=0)
    for got, want in zip(grads, true_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_nested_expectation_validates_levels():
    with pytest.raises(ValueError, match="one entry per level"):
        nested_expectation([torch.ones(1, 2) / 2], torch.zeros(1, 1, 3), [], "with_replacement")


def _two_level_model(seed: int = 0):
    from ats_wsi.multilevel import MultiLevelATSModel
    from ats_wsi.nets import build_attention_net, build_feature_net

    torch.manual_seed(seed)
    nets = [build_attention_net("mnist", in_channels=1) for _ in range(2)]
    feat = build_feature_net("mnist", in_channels=1, width=8)
    return MultiLevelATSModel(nets, feat, num_classes=3, n_samples=[2, 3])


def _pyramid(b: int = 2):
    """The same image at three resolutions: 64 (attention), 256 (regions), 512 (patches)."""
    torch.manual_seed(1)
    high = torch.rand(b, 1, 512, 512, dtype=torch.float32)
    mid = torch.nn.functional.avg_pool2d(high, 2)
    low = torch.nn.functional.avg_pool2d(high, 8)
    return low, mid, high


def test_multilevel_model_nests_boxes_and_trains_both_levels():
    from ats_wsi.patches import TensorPatchSource

    model = _two_level_model()
    low, mid, high = _pyramid()
    sources = [TensorPatchSource(mid, 64), TensorPatchSource(high, 32)]
    out = model(low, sources, generator=torch.Generator().manual_seed(0))

    assert out.logits.shape == (2, 3)
    assert out.indices[0].shape == (2, 2) and out.indices[1].shape == (4, 3)
    assert out.patches.shape == (12, 1, 32, 32)
    # every level-1 patch centre lies inside its parent region (mapped to the 512 frame)
    parent = out.locations[0].reshape(4, 1, 2) * 2
    centre = out.locations[1] + 16
    assert torch.all(centre >= parent) and torch.all(centre < parent + 128)
    # the patches are the high-res pixels at the reported locations
    from ats_wsi.patches import extract_patches

    expected = extract_patches(high, out.locations[1].reshape(2, 6, 2), 32).reshape(12, 1, 32, 32)
    torch.testing.assert_close(out.patches, expected)

    out.logits.sum().backward()
    for net in model.attention_nets:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is not None for p in model.feature_net.parameters())


def test_multilevel_model_topk_is_deterministic_and_mask_respected():
    from ats_wsi.patches import TensorPatchSource

    model = _two_level_model().eval()
    low, mid, high = _pyramid(1)
    sources = [TensorPatchSource(mid, 64), TensorPatchSource(high, 32)]
    mask = torch.zeros(1, 64, 64, dtype=torch.bool)
    mask[:, :8, :8] = True
    with torch.no_grad():
        a = model(low, sources, mask, sampler="topk")
        b = model(low, sources, mask, sampler="topk")
    assert torch.equal(a.logits, b.logits)
    rows, cols = a.indices[0] // 64, a.indices[0] % 64
    assert torch.all(rows < 8) and torch.all(cols < 8)
