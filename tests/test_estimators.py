"""Exact-enumeration checks of every estimator.

For small K and N we list every ordered sample Q with its exact probability p(Q) and compare
``sum_Q p(Q) * (value, d/d features, d/d logits)`` with the true value and gradients of
``<g, sum_k softmax(l)_k f_k>``. Float64 throughout, so "exact" means agreement to 1e-10.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ats_wsi.attention import attention_distribution
from ats_wsi.estimators import expectation

DT = torch.float64


def _ordered_samples(k: int, n: int, replacement: bool) -> list[tuple[int, ...]]:
    if replacement:
        return list(itertools.product(range(k), repeat=n))
    return list(itertools.permutations(range(k), n))


def _sample_prob(a: torch.Tensor, q: tuple[int, ...], replacement: bool) -> torch.Tensor:
    """Probability (per batch row) of drawing the ordered sample q."""
    p = torch.ones(a.shape[0], dtype=a.dtype)
    left = torch.ones(a.shape[0], dtype=a.dtype)
    for k in q:
        p = p * a[:, k] / (1.0 if replacement else left)
        if not replacement:
            left = left - a[:, k]
    return p


def _problem(seed: int, b: int, k: int, d: int, peak: float):
    gen = torch.Generator().manual_seed(seed)
    logits = (peak * torch.randn(b, 1, 1, k, generator=gen, dtype=DT)).requires_grad_()
    feats = torch.randn(b, k, d, generator=gen, dtype=DT)
    feats = (feats / feats.norm(dim=-1, keepdim=True)).requires_grad_()
    g = torch.randn(b, d, generator=gen, dtype=DT)
    return logits, feats, g


def _exact_and_expected(
    mode: str,
    replacement: bool,
    *,
    seed=0,
    b=2,
    k=4,
    n=3,
    d=3,
    peak=1.0,
    mask=None,
    smoothing=0.0,
    baseline=None,
):
    logits, feats, g = _problem(seed, b, k, d, peak)
    probs = attention_distribution(logits, mask, smoothing)
    true_value = torch.einsum("bk,bkd->bd", probs, feats)
    true_gl, true_gf = torch.autograd.grad((g * true_value).sum(), (logits, feats))

    allowed = [i for i in range(k) if mask is None or bool(mask[0, 0, i])]
    value = torch.zeros_like(true_value)
    gl = torch.zeros_like(logits)
    gf = torch.zeros_like(feats)
    total = torch.zeros(b, dtype=DT)
    for q in _ordered_samples(len(allowed), n, replacement):
        idx = torch.tensor([allowed[i] for i in q]).expand(b, n)
        probs = attention_distribution(logits, mask, smoothing)
        p = _sample_prob(probs.detach(), tuple(idx[0].tolist()), replacement)
        sampled = feats.gather(1, idx.unsqueeze(-1).expand(b, n, d))
        est = expectation(probs, sampled, idx, mode, baseline)
        dl, df = torch.autograd.grad((g * est).sum(dim=1).mul(p).sum(), (logits, feats))
        value += p.unsqueeze(-1) * est.detach()
        gl += dl
        gf += df
        total += p
    torch.testing.assert_close(total, torch.ones(b, dtype=DT))  # the enumeration is complete
    return (value, gf, gl), (true_value.detach(), true_gf, true_gl)


UNBIASED = [("with_replacement", True), ("without_replacement", False)]


@pytest.mark.parametrize(("mode", "replacement"), UNBIASED)
@pytest.mark.parametrize(
    ("k", "n", "peak"), [(4, 1, 1.0), (4, 2, 1.0), (4, 3, 1.0), (5, 3, 4.0), (5, 4, 3.0)]
)
def test_estimator_exactly_unbiased(mode, replacement, k, n, peak):
    (value, gf, gl), (tv, tgf, tgl) = _exact_and_expected(mode, replacement, k=k, n=n, peak=peak)
    torch.testing.assert_close(value, tv, atol=1e-10, rtol=0)
    torch.testing.assert_close(gf, tgf, atol=1e-10, rtol=0)
    torch.testing.assert_close(gl, tgl, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("mode", "replacement"), UNBIASED)
def test_estimator_unbiased_with_mask_and_smoothing(mode, replacement):
    mask = torch.tensor([True, False, True, True, True]).view(1, 1, 5).expand(2, 1, 5)
    (value, gf, gl), (tv, tgf, tgl) = _exact_and_expected(
        mode, replacement, k=5, n=3, peak=2.0, mask=mask, smoothing=1e-2
    )
    torch.testing.assert_close(value, tv, atol=1e-10, rtol=0)
    torch.testing.assert_close(gf, tgf, atol=1e-10, rtol=0)
    torch.testing.assert_close(gl, tgl, atol=1e-10, rtol=0)
    assert torch.all(gl[..., 1] == 0)  # a masked cell gets no gradient


def test_reference_estimator_attention_gradient_is_biased():
    """The authors' attention gradient is off on peaked distributions (ATS_SPEC 1.2)."""
    (value, gf, gl), (tv, tgf, tgl) = _exact_and_expected(
        "without_replacement_reference", False, k=5, n=3, peak=3.0, seed=1
    )
    # Forward and feature gradient are unbiased ...
    torch.testing.assert_close(value, tv, atol=1e-10, rtol=0)
    torch.testing.assert_close(gf, tgf, atol=1e-10, rtol=0)
    # ... but the logit gradient is not: measure how far off it is.
    rel = ((gl - tgl).norm() / tgl.norm()).item()
    assert rel > 0.3, f"expected a clear bias, relative error was {rel:.3f}"


def test_pytorch_port_inclusive_cumsum_biases_feature_gradient():
    """Why the exclusive cumulative sum matters: an inclusive one biases the value itself."""
    logits, feats, _ = _problem(0, 1, 4, 2, 1.0)
    probs = attention_distribution(logits).detach()
    value = torch.zeros(1, 2, dtype=DT)
    for q in _ordered_samples(4, 2, False):
        idx = torch.tensor([q])
        a = probs.gather(1, idx)
        f = feats.detach()[:, list(q)]
        m_inclusive = 1 - torch.cumsum(a, 1)
        est = (
            torch.cumsum(a.unsqueeze(-1) * f, 1)
            - a.unsqueeze(-1) * f
            + m_inclusive.unsqueeze(-1) * f
        ).mean(1)
        value += _sample_prob(probs, q, False).unsqueeze(-1) * est
    true = probs @ feats.detach()[0]
    assert (value - true).abs().max() > 1e-3


def test_topk_estimator_is_weighted_mean():
    probs = torch.tensor([[0.1, 0.5, 0.4]])
    feats = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    idx = torch.tensor([[1, 2]])
    out = expectation(probs, feats, idx, "topk")
    torch.testing.assert_close(out, torch.tensor([[0.5 / 0.9, 0.4 / 0.9]]))


def test_unknown_estimator_and_shape_errors():
    probs = torch.full((1, 4), 0.25)
    with pytest.raises(ValueError, match="unknown estimator"):
        expectation(probs, torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), "nope")
    with pytest.raises(ValueError, match="do not match"):
        expectation(probs, torch.zeros(1, 3, 3), torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize(("mode", "replacement"), UNBIASED)
def test_estimator_unbiased_with_any_baseline(mode, replacement):
    """The control variate keeps exact unbiasedness whatever constant vector it is given."""
    c = torch.randn(2, 3, generator=torch.Generator().manual_seed(5), dtype=DT)
    (value, gf, gl), (tv, tgf, tgl) = _exact_and_expected(
        mode, replacement, k=5, n=3, peak=2.0, baseline=c
    )
    torch.testing.assert_close(value, tv, atol=1e-10, rtol=0)
    torch.testing.assert_close(gf, tgf, atol=1e-10, rtol=0)
    torch.testing.assert_close(gl, tgl, atol=1e-10, rtol=0)


@pytest.mark.parametrize("mode", ["with_replacement", "without_replacement"])
def test_baseline_reduces_logit_gradient_variance(mode):
    """With c = the mean feature, the exact variance of the logit gradient drops (enumerated)."""
    replacement = mode == "with_replacement"
    logits, feats, g = _problem(2, 1, 5, 3, 1.0)
    # A shared offset in every feature is what makes <g, estimate> far from zero in practice.
    feats = (feats.detach() + 2.0).requires_grad_()
    probs = attention_distribution(logits).detach()
    mean_feature = (probs.unsqueeze(-1) * feats.detach()).sum(1)

    def variance(baseline):
        first, second = torch.zeros_like(logits), torch.zeros_like(logits)
        for q in _ordered_samples(5, 2, replacement):
            idx = torch.tensor([q])
            p = _sample_prob(probs, q, replacement)
            est = expectation(
                attention_distribution(logits), feats[:, list(q)], idx, mode, baseline
            )
            (dl,) = torch.autograd.grad((g * est).sum(), (logits,))
            first += p * dl
            second += p * dl**2
        return (second - first**2).sum().item()

    plain, centred = variance(None), variance(mean_feature)
    assert centred < 0.5 * plain, (plain, centred)
