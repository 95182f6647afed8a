"""Zoom-in sampling on a cell grid (:mod:`ats_wsi.zoom`): region geometry, and the two-level
estimator checked by exact enumeration on slide-shaped cases.

Every ordered draw of regions is enumerated and, for each drawn region independently, every
ordered draw of cells inside it; the probability-weighted value and gradients (of the level-0
cell logits, the level-1 logits and the features) must equal those of
``sum_r a0_r sum_c a1_{r,c} f_c`` to float64 precision.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ats_wsi.attention import attention_distribution
from ats_wsi.zoom import RegionGrid, cell_mask, draw_in_regions, region_logits, zoom_expectation

DT = torch.float64


def test_region_grid_covers_every_cell_and_clips_at_the_border():
    g = RegionGrid((3, 5), size=2, stride=2)
    assert g.shape == (2, 3)
    m = g.members()
    assert m.shape == (6, 4)
    # The last column / row of regions reaches past the grid: those members are -1.
    assert m[2].tolist() == [4, -1, 9, -1]
    assert m[5].tolist() == [14, -1, -1, -1]
    covered = set(m[m >= 0].tolist())
    assert covered == set(range(15))


def test_overlapping_regions_share_cells():
    g = RegionGrid((3, 3), size=2, stride=1)
    assert g.shape == (2, 2)
    assert g.members().tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]
    with pytest.raises(ValueError, match="stride"):
        RegionGrid((3, 3), size=2, stride=3)  # would leave cells in no region


def test_region_logits_are_the_log_mass_of_their_allowed_cells():
    g = RegionGrid((2, 4), size=2, stride=2)
    logits = torch.randn(1, 8, dtype=DT)
    mask = torch.ones(1, 8, dtype=torch.bool)
    mask[0, [2, 3, 6, 7]] = False  # the right region has no tissue
    rl, allowed = region_logits(logits, g.members(), mask)
    assert allowed.tolist() == [[True, False]]
    region = attention_distribution(rl[:, None], allowed)
    cells = attention_distribution(logits.view(1, 2, 4), mask.view(1, 2, 4))
    torch.testing.assert_close(region[0, 0], cells[0].sum())
    assert torch.isfinite(rl).all()  # a floor, not -inf: no NaN gradient


def _orders(allowed: list[int], n: int, replacement: bool):
    if replacement:
        return list(itertools.product(allowed, repeat=n))
    return list(itertools.permutations(allowed, min(n, len(allowed))))


def _prob(a: torch.Tensor, q, replacement: bool) -> torch.Tensor:
    p, left = torch.ones((), dtype=DT), torch.ones((), dtype=DT)
    for k in q:
        p = p * a[k] / (1.0 if replacement else left)
        left = left - (0 if replacement else a[k])
    return p


CASES = {
    # 3x3 cells, 2x2 regions every 2 cells: the border regions hold 2 and 1 cells; the mask
    # leaves a region partly outside tissue and one with a single tissue cell (< n1 = 2).
    "border_partial_tissue": ((3, 3), 2, 2, [1, 1, 0, 1, 1, 1, 0, 0, 1]),
    # 2x3 cells, 2x2 regions every cell: the two regions share cells 1 and 4.
    "overlapping": ((2, 3), 2, 1, [1, 1, 1, 1, 1, 0]),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    ("mode", "replacement", "with_baseline"),
    [
        ("without_replacement", False, False),
        ("without_replacement", False, True),
        ("with_replacement", True, True),
    ],
)
def test_two_level_slide_estimator_exactly_unbiased(case, mode, replacement, with_baseline):
    grid, size, stride, tissue = CASES[case]
    n0, n1, d = 2, 2, 2
    gen = torch.Generator().manual_seed(5)
    rg = RegionGrid(grid, size, stride)
    members = rg.members()
    k, s = grid[0] * grid[1], members.shape[1]
    mask = torch.tensor(tissue, dtype=torch.bool)[None]
    l0 = (1.5 * torch.randn(1, k, generator=gen, dtype=DT)).requires_grad_()
    l1 = (1.5 * torch.randn(rg.num_regions, s, generator=gen, dtype=DT)).requires_grad_()
    feats = torch.randn(k, d, generator=gen, dtype=DT).requires_grad_()
    g = torch.randn(1, d, generator=gen, dtype=DT)
    c = 2 * torch.randn(d, generator=gen, dtype=DT) if with_baseline else None

    rl, rmask = region_logits(l0, members, mask)
    a0 = attention_distribution(rl[:, None], rmask, 0.05)  # (1, M)
    inside = cell_mask(members, mask)
    # Regions without tissue are never drawn; any mask keeps their (unused) rows defined.
    a1 = attention_distribution(l1[:, None], (inside | ~rmask[0, :, None])[:, None], 0.05)
    cell_f = feats[members.clamp_min(0)]  # (M, S, D)
    true = (a0[0, :, None] * torch.einsum("rs,rsd->rd", a1, cell_f)).sum(0, keepdim=True)
    true_grads = torch.autograd.grad((g * true).sum(), (l0, l1, feats), retain_graph=True)

    value = torch.zeros(1, d, dtype=DT)
    grads = [torch.zeros_like(t) for t in (l0, l1, feats)]
    allowed_regions = torch.nonzero(rmask[0]).flatten().tolist()
    assert any(int(inside[r].sum()) < n1 for r in allowed_regions) or case == "overlapping"
    a0d, a1d = a0.detach()[0], a1.detach()
    for q0 in _orders(allowed_regions, n0, replacement):
        p0 = _prob(a0d, q0, replacement)
        inner = [_orders(torch.nonzero(inside[r]).flatten().tolist(), n1, replacement) for r in q0]
        for q1 in itertools.product(*inner):
            draws = list(zip(q0, q1, strict=True))
            p = p0 * torch.prod(torch.stack([_prob(a1d[r], q, replacement) for r, q in draws]))
            regions = torch.tensor([q0])
            cells = [torch.tensor(q) for q in q1]
            f = torch.cat([feats[members[r, torch.tensor(q)]] for r, q in draws])
            est = zoom_expectation(a0, regions, a1[list(q0)], cells, f, mode, c)
            value += p * est.detach()
            for acc, gr in zip(
                grads,
                torch.autograd.grad((g * est).sum(), (l0, l1, feats), retain_graph=True),
                strict=True,
            ):
                acc += p * gr
    torch.testing.assert_close(value, true.detach(), rtol=1e-9, atol=1e-12)
    for got, want in zip(grads, true_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-11)


def test_draw_in_regions_takes_every_cell_of_a_small_region():
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.1, 0.2, 0.3, 0.4]])
    drawn = draw_in_regions(probs, 3, "without_replacement", torch.Generator().manual_seed(0))
    assert sorted(drawn[0].tolist()) == [0, 1] and len(set(drawn[1].tolist())) == 3
    top = draw_in_regions(probs, 2, "topk")
    assert sorted(top[0].tolist()) == [0, 1] and top[1].tolist() == [3, 2]


def test_seeded_region_draws_follow_their_distribution():
    """Fixed seed, 20,000 draws of one cell in a region: frequencies within 0.015 of a1."""
    probs = torch.tensor([[0.1, 0.2, 0.3, 0.4]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(20000):
        counts[draw_in_regions(probs, 1, "without_replacement", gen)[0]] += 1
    assert torch.allclose(counts / 20000, probs[0], atol=0.015)
