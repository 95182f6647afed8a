"""Fixed-seed statistics of the samplers, with stated tolerances.

With M draws, a frequency's standard error is at most sqrt(0.25 / M); the tolerances below are
about 5 standard errors, so a correct sampler fails with negligible probability and the seed
is fixed anyway.
"""

from __future__ import annotations

import pytest
import torch

from ats_wsi.attention import (
    attention_distribution,
    entropy_regulariser,
    score_distillation,
    tile_scores,
)
from ats_wsi.sampling import SAMPLERS, sample

PROBS = torch.tensor([[0.5, 0.25, 0.15, 0.1, 0.0]], dtype=torch.float64)
M = 40_000
TOL = 5 * (0.25 / M) ** 0.5  # 0.0125


def _draws(mode: str, n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return sample(PROBS.expand(M, -1), n, mode, gen)


def test_with_replacement_frequencies_match_probs():
    idx = _draws("with_replacement", 3)
    freq = torch.bincount(idx.flatten(), minlength=5).double() / idx.numel()
    torch.testing.assert_close(freq, PROBS[0], atol=TOL, rtol=0)
    # draws within a row are independent: P(first == second) = sum a_k^2
    same = (idx[:, 0] == idx[:, 1]).double().mean()
    assert abs(same - (PROBS**2).sum()) < TOL


def test_without_replacement_is_sequential_sampling():
    idx = _draws("without_replacement", 2)
    assert torch.all(idx[:, 0] != idx[:, 1])
    a = PROBS[0]
    first = torch.bincount(idx[:, 0], minlength=5).double() / M
    torch.testing.assert_close(first, a, atol=TOL, rtol=0)
    # ordered pair (i, j): a_i * a_j / (1 - a_i)
    for i, j in [(0, 1), (1, 0), (2, 3), (3, 0)]:
        observed = ((idx[:, 0] == i) & (idx[:, 1] == j)).double().mean()
        expected = a[i] * a[j] / (1 - a[i])
        assert abs(observed - expected) < TOL, (i, j, observed, expected)


def test_zero_probability_cells_never_drawn():
    for mode in SAMPLERS:
        assert not torch.any(_draws(mode, 4) == 4), mode


def test_topk_is_deterministic_and_sorted():
    idx = sample(PROBS, 3, "topk")
    assert idx.tolist() == [[0, 1, 2]]


def test_seeded_generator_is_deterministic():
    for mode in ("with_replacement", "without_replacement"):
        a = sample(PROBS.expand(8, -1), 3, mode, torch.Generator().manual_seed(7))
        b = sample(PROBS.expand(8, -1), 3, mode, torch.Generator().manual_seed(7))
        c = sample(PROBS.expand(8, -1), 3, mode, torch.Generator().manual_seed(8))
        assert torch.equal(a, b)
        assert not torch.equal(a, c)


def test_too_many_distinct_draws_and_unknown_sampler():
    with pytest.raises(ValueError, match="only 4 allowed"):
        sample(PROBS, 5, "without_replacement")
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(PROBS, 1, "gibbs")


def test_attention_distribution_mask_and_smoothing():
    logits = torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]])
    mask = torch.tensor([[[True, False], [True, True]]])
    probs = attention_distribution(logits, mask, smoothing=0.1)
    assert probs.shape == (1, 4)
    assert probs[0, 1] == 0
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(1))
    plain = torch.softmax(torch.tensor([0.0, 2.0, 3.0]), 0)
    torch.testing.assert_close(probs[0, [0, 2, 3]], 0.9 * plain + 0.1 / 3)
    with pytest.raises(ValueError, match="no allowed cell"):
        attention_distribution(logits, torch.zeros(1, 2, 2, dtype=torch.bool))


def test_entropy_regulariser_value():
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    expected = 2 * 0.5 * torch.log(torch.tensor(0.5 + 1e-6)) + torch.log(torch.tensor(1 + 1e-6))
    torch.testing.assert_close(entropy_regulariser(probs), expected / 2)


def test_tile_scores_are_the_margin_over_class_zero():
    logits = torch.tensor([[[0.0, 2.0], [1.0, -1.0]], [[0.5, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(tile_scores(logits), torch.tensor([[2.0, -2.0], [-0.5, 0.0]]))
    three = torch.tensor([[1.0, 0.0, 3.0]])
    torch.testing.assert_close(tile_scores(three), torch.tensor([2.0]))


def test_score_distillation_value_and_minimum():
    """Cross-entropy of softmax(beta z) against the attention renormalised over the drawn
    cells; minimal (zero gradient) when the two agree, and it ignores the cells not drawn."""
    scores = torch.tensor([[1.0, 3.0, 2.0]])
    z = (scores - scores.mean()) / (scores.std() + 1e-6)
    target = torch.softmax(2.0 * z, 1)
    indices = torch.tensor([[4, 0, 2]])
    # Attention on the drawn cells proportional to the target, the rest of the mass elsewhere.
    logits = torch.zeros(1, 6, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        logits[0, indices[0]] = torch.log(target[0].double()) + 1.0
    probs = torch.softmax(logits, 1)
    loss = score_distillation(probs, indices, scores.double())
    entropy = -(target * torch.log(target)).sum()
    torch.testing.assert_close(loss.float(), entropy, atol=1e-5, rtol=0)
    loss.backward()
    assert logits.grad.abs().max() < 1e-6
    # Attention piled on a cell that is not the best-scored one raises the loss.
    worse = torch.softmax(torch.tensor([[0.0, 0, 3.0, 0, 0, 0]]), 1)
    assert score_distillation(worse, torch.tensor([[4, 0, 2]]), scores) > entropy + 0.5
    assert score_distillation(probs, indices[:, :1], scores[:, :1]) == 0  # one cell: nothing
