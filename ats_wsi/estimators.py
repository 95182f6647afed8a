"""Monte-Carlo estimators of ``E_{k~a}[f_k]`` with unbiased gradients.

Each estimator takes the full attention distribution ``probs`` (B, K), the features of the
sampled cells ``features`` (B, N, D) and their ``indices`` (B, N) in draw order, and returns
(B, D). Gradients flow to ``features`` and to ``probs`` (and from there, through the softmax,
to the attention logits).

Which estimator to use (verified by exact enumeration in ``tests/test_estimators.py``):

* ``with_replacement``: forward and both gradients exactly unbiased (score-function identity).
* ``without_replacement`` (the default, and the paper's sampling scheme): forward and feature
  gradient as in the reference; the attention gradient is the exact score-function gradient of
  the ordered sample, restricted to each draw's prefix and with a per-draw baseline, so it is
  exactly unbiased for the gradient with respect to the attention logits.
* ``without_replacement_reference``: the authors' attention gradient, kept for comparison only.
  It is biased (ATS_SPEC 1.2); the tests measure the bias rather than hide it.
* ``topk``: deterministic inference, ``sum a_i f_i / sum a_i`` over the top-k cells; it is not
  an unbiased estimator and is meant for prediction, not training.

Control variate: the score-function part of the attention gradient is noisy when
``<g, estimate>`` is far from zero (g the upstream gradient). ``with_replacement`` and
``without_replacement`` accept ``baseline`` (B, D), a vector ``c`` that must not depend on the
current draws (for example a running mean of past estimates, as :class:`ats_wsi.model.ATSModel`
keeps). Draw t's score is then centred on ``<g, S_t + m_t c>`` instead of ``<g, S_t>``; this
leaves the estimator exactly unbiased for any such ``c`` (checked by enumeration) and removes
most of the noise when ``c`` is close to the mean feature.

The attention gradients are exact for ``probs`` that lie on the simplex (as every output of
:func:`ats_wsi.attention.attention_distribution` does): they may differ from the gradient of an
arbitrary off-simplex extension by a multiple of the all-ones vector, which the softmax Jacobian
removes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

__all__ = ["ESTIMATORS", "expectation", "register_estimator"]

Estimator = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(name: str) -> Callable[[Estimator], Estimator]:
    """Register an estimator under ``name`` (usually the name of the sampler it pairs with)."""

    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return wrap


def _exclusive_cumsum(x: Tensor, dim: int = 1) -> Tensor:
    return torch.cumsum(x, dim=dim) - x


def _reverse_exclusive_cumsum(x: Tensor, dim: int = 1) -> Tensor:
    """``out_j = sum_{t > j} x_t``."""
    return torch.flip(_exclusive_cumsum(torch.flip(x, (dim,)), dim), (dim,))


def _draw_weights(n: int, ref: Tensor) -> tuple[Tensor, Tensor]:
    """Uniform draw weights ``w_i = 1/N`` and ``W_i = sum_{i' > i} w_i'``, shaped (1, N)."""
    w = torch.full((1, n), 1.0 / n, dtype=ref.dtype, device=ref.device)
    return w, _reverse_exclusive_cumsum(w)


def _ordered_forward(a: Tensor, features: Tensor) -> tuple[Tensor, Tensor]:
    """Per-draw estimates ``F_i = sum_{j<i} a_j f_j + m_i f_i`` averaged; returns (out, m)."""
    m = 1.0 - _exclusive_cumsum(a)
    f_prefix = _exclusive_cumsum(a.unsqueeze(-1) * features)
    per_draw = f_prefix + m.unsqueeze(-1) * features
    return per_draw.mean(dim=1), m


def _baseline_dot(baseline: Tensor, grad_out: Tensor) -> Tensor:
    """``<g, c>`` per sample as (B, 1); ``c`` is treated as a constant."""
    return (baseline.detach().expand_as(grad_out) * grad_out).sum(dim=1, keepdim=True)


class _WithReplacement(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, probs: Tensor, features: Tensor, indices: Tensor, baseline: Tensor
    ) -> Tensor:
        ctx.save_for_backward(probs, features, indices, baseline)
        return features.mean(dim=1)

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None]:
        probs, features, indices, baseline = ctx.saved_tensors
        n = features.shape[1]
        a = probs.gather(1, indices)
        g_dot_f = torch.einsum("bnd,bd->bn", features, grad_out)
        # score function: d/da_k sum_k a_k f_k = E_{k~a}[f_k e_k / a_k]; the constant baseline
        # has zero mean under the score (up to the all-ones direction the softmax removes).
        centred = g_dot_f - _baseline_dot(baseline, grad_out)
        grad_probs = torch.zeros_like(probs).scatter_add_(1, indices, centred / (n * a))
        grad_features = grad_out.unsqueeze(1).expand_as(features) / n
        return grad_probs, grad_features, None, None


class _WithoutReplacement(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: FunctionCtx, probs: Tensor, features: Tensor, indices: Tensor, baseline: Tensor
    ) -> Tensor:
        ctx.save_for_backward(probs, features, indices, baseline)
        return _ordered_forward(probs.gather(1, indices), features)[0]

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor, None, None]:
        probs, features, indices, baseline = ctx.saved_tensors
        a = probs.gather(1, indices)
        n = a.shape[1]
        w, w_after = _draw_weights(n, a)
        m = 1.0 - _exclusive_cumsum(a)
        g_dot_f = torch.einsum("bnd,bd->bn", features, grad_out)  # G_i
        prefix = _exclusive_cumsum(a * g_dot_f)  # S_i = <g, sum_{j<i} a_j f_j>
        phi = prefix + m * g_dot_f  # <g, F_i>

        # The estimate is linear in the features, so this is the exact derivative.
        grad_features = (w * m + a * w_after).unsqueeze(-1) * grad_out.unsqueeze(1)

        # Pathwise part: dF_i/da_j = f_j - f_i for j < i.
        path = g_dot_f * w_after - _reverse_exclusive_cumsum(w * g_dot_f)
        # Score part. F_i depends only on draws 0..i, so only their conditionals
        # p(k_t | k_<t) = a_t / m_t enter; S_t + m_t <g, c> (fixed given k_<t) is a valid
        # baseline for the draw-t factor. R_t = sum_{i>=t} w_i (Phi_i - S_t - m_t <g, c>).
        centre = prefix + m * _baseline_dot(baseline, grad_out)
        r = _reverse_exclusive_cumsum(w * phi) + w * phi - centre * (w_after + w)
        # d log(a_t / m_t) / da_j = [j == t] / a_t + [j < t] / m_t
        score = r / a + _reverse_exclusive_cumsum(r / m)
        grad_probs = torch.zeros_like(probs).scatter_add_(1, indices, path + score)
        return grad_probs, grad_features, None, None


class _WithoutReplacementReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx: FunctionCtx, probs: Tensor, features: Tensor, indices: Tensor) -> Tensor:
        ctx.save_for_backward(probs, features, indices)
        return _ordered_forward(probs.gather(1, indices), features)[0]

    @staticmethod
    def backward(ctx: FunctionCtx, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        probs, features, indices = ctx.saved_tensors
        a = probs.gather(1, indices)
        n = a.shape[1]
        w, w_after = _draw_weights(n, a)
        m = 1.0 - _exclusive_cumsum(a)
        g_dot_f = torch.einsum("bnd,bd->bn", features, grad_out)
        phi = _exclusive_cumsum(a * g_dot_f) + m * g_dot_f
        grad_features = (w * m + a * w_after).unsqueeze(-1) * grad_out.unsqueeze(1)
        draw = torch.arange(n, dtype=a.dtype, device=a.device).unsqueeze(0)
        # ATS_SPEC 1.2: w_i <g, F_i m_i / a_i + sum_{j<i} f_j - i f_i>
        ref = w * (phi * m / a + _exclusive_cumsum(g_dot_f) - draw * g_dot_f)
        grad_probs = torch.zeros_like(probs).scatter_add_(1, indices, ref)
        return grad_probs, grad_features, None


def _baseline_or_zeros(features: Tensor, baseline: Tensor | None) -> Tensor:
    if baseline is None:
        return features.new_zeros(features.shape[0], features.shape[2])
    return baseline.detach().to(features.dtype).expand(features.shape[0], features.shape[2])


@register_estimator("with_replacement")
def expectation_with_replacement(
    probs: Tensor, features: Tensor, indices: Tensor, baseline: Tensor | None = None
) -> Tensor:
    """Mean of the sampled features; exactly unbiased value and gradients."""
    return _WithReplacement.apply(probs, features, indices, _baseline_or_zeros(features, baseline))


@register_estimator("without_replacement")
def expectation_without_replacement(
    probs: Tensor, features: Tensor, indices: Tensor, baseline: Tensor | None = None
) -> Tensor:
    """Ordered without-replacement estimator; exactly unbiased value and gradients."""
    c = _baseline_or_zeros(features, baseline)
    return _WithoutReplacement.apply(probs, features, indices, c)


@register_estimator("without_replacement_reference")
def expectation_without_replacement_reference(
    probs: Tensor, features: Tensor, indices: Tensor, baseline: Tensor | None = None
) -> Tensor:
    """The authors' estimator: unbiased value and feature gradient, BIASED attention gradient.

    ``baseline`` is ignored (the reference has none).
    """
    return _WithoutReplacementReference.apply(probs, features, indices)


@register_estimator("topk")
def expectation_topk(
    probs: Tensor, features: Tensor, indices: Tensor, baseline: Tensor | None = None
) -> Tensor:
    """Attention-weighted mean over the drawn cells (deterministic inference; biased)."""
    a = probs.gather(1, indices)
    return (a.unsqueeze(-1) * features).sum(dim=1) / a.sum(dim=1, keepdim=True)


def expectation(
    probs: Tensor,
    features: Tensor,
    indices: Tensor,
    mode: str = "without_replacement",
    baseline: Tensor | None = None,
) -> Tensor:
    """Estimate ``E_{k~probs}[f_k]`` (B, D) from sampled ``features`` (B, N, D) at ``indices``.

    ``baseline`` (B, D) or (D,): optional control variate, independent of the current draws.
    """
    try:
        fn = ESTIMATORS[mode]
    except KeyError:
        raise ValueError(f"unknown estimator {mode!r}; available: {sorted(ESTIMATORS)}") from None
    if features.shape[:2] != indices.shape:
        raise ValueError(
            f"features {tuple(features.shape)} do not match indices {tuple(indices.shape)}"
        )
    return fn(probs, features, indices, baseline)
