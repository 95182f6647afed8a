"""GridMapping against offsets computed by hand from ATS_SPEC 1.4."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ats_wsi.mapping import GridMapping


def test_same_padding_square_grid() -> None:
    # s = 10, step = 10: cell i is centred at 10 i + 5, a 10-px box starts at 10 i.
    m = GridMapping(low_size=(4, 4), high_size=(40, 40), attention_size=(4, 4), patch_size=10)
    idx = torch.tensor([[0, 5, 15], [3, 12, 6]])
    expected = torch.tensor([[[0, 0], [10, 10], [30, 30]], [[0, 30], [30, 0], [10, 20]]])
    out = m.top_left(idx)
    assert out.dtype == torch.int64
    assert torch.equal(out, expected)


def test_receptive_field_and_non_square() -> None:
    # y: s = 100/20 = 5, step = (20-4)*5/4 = 20, centre = 2*5 + 20 r + 10 = 20 + 20 r
    # x: s = 60/30 = 2,  step = (30-4)*2/13 = 4, centre = 2*2 + 4 c + 2 = 6 + 4 c
    # P = 8 -> top-left = (16 + 20 r, 2 + 4 c)
    m = GridMapping((20, 30), (100, 60), (4, 13), receptive_field=4, patch_size=8)
    idx = torch.tensor([[0, 2 * 13 + 5, 3 * 13 + 12]])
    assert torch.equal(m.top_left(idx), torch.tensor([[[16, 2], [56, 22], [76, 50]]]))
    assert torch.allclose(
        m.centre(idx),
        torch.tensor([[[20.0, 6.0], [60.0, 26.0], [80.0, 54.0]]], dtype=torch.float64),
    )


def test_boxes_partly_outside_are_not_clipped() -> None:
    # Same grid with P = 30: top-left = (20 + 20 r - 15, 6 + 4 c - 15) = (5 + 20 r, -9 + 4 c).
    m = GridMapping((20, 30), (100, 60), (4, 13), receptive_field=4, patch_size=30)
    idx = torch.tensor([[0, 3 * 13 + 12]])
    assert torch.equal(m.top_left(idx), torch.tensor([[[5, -9], [65, 39]]]))


def test_speed_limits_geometry() -> None:
    # ATS_SPEC 2.2: 288x384 low-res of 960x1280, 35x47 cells after max-pool 8, rf 9, P 100.
    # y: s = 10/3, step = 279 s / 35 = 26.5714..., centre_0 = 4.5 s + step/2 = 28.2857...
    # x: step = 375 s / 47 = 26.5957..., centre_0 = 28.2979...
    m = GridMapping((288, 384), (960, 1280), (35, 47), receptive_field=9, patch_size=100)
    first, last = 0, 35 * 47 - 1
    # round(28.2857 - 50) = -22; round(28.2857 + 34 * 26.5714 - 50) = round(881.71) = 882
    # round(28.2979 - 50) = -22; round(28.2979 + 46 * 26.5957 - 50) = round(1201.70) = 1202
    out = m.top_left(torch.tensor([[first, last]]))
    assert torch.equal(out, torch.tensor([[[-22, -22], [882, 1202]]]))


def test_rounding_is_half_to_even() -> None:
    # s = 3, step = 3, centre = 1.5 + 3 i, P = 2 -> 0.5, 3.5, 6.5 -> 0, 4, 6 (torch.round).
    m = GridMapping((3, 3), (9, 9), (3, 3), patch_size=2)
    out = m.top_left(torch.tensor([[0, 4, 8]]))
    assert torch.equal(out[..., 0], torch.tensor([[0, 4, 6]]))


def test_patch_is_centred_on_cell_centre() -> None:
    m = GridMapping((45, 60), (1500, 2000), (45, 60), patch_size=50)
    idx = torch.arange(m.num_cells).view(3, -1)
    centre = m.centre(idx)
    off = m.top_left(idx).double() + 25 - centre
    assert off.abs().max() <= 0.5
    assert m.top_left(idx).shape == (3, idx.shape[1], 2)


def test_validation() -> None:
    m = GridMapping(torch.Size([8, 8]), (16, 16), (8, 8), patch_size=4)
    assert m.low_size == (8, 8) and isinstance(m.low_size, tuple)
    with pytest.raises(IndexError):
        m.top_left(torch.tensor([[64]]))
    with pytest.raises(IndexError):
        m.top_left(torch.tensor([[-1]]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.patch_size = 3  # type: ignore[misc]
    with pytest.raises(ValueError):
        GridMapping((8, 8), (16, 16), (8, 8), receptive_field=8, patch_size=4)
    with pytest.raises(ValueError):
        GridMapping((8, 8), (16, 16), (8, 8), patch_size=0)
