"""Zoom-in sampling on a cell grid: regions of attention cells, then cells inside each region.

The two-level case of ATS_SPEC 1.5 in the form slides need. Level 0's attention net scores
every cell of the coarse view (the cells single-level ATS samples); a *region* is a block of
``size`` x ``size`` cells, one every ``stride`` cells (``stride < size``: regions overlap;
blocks at the bottom / right edge are clipped to the grid). A region's level-0 logit is the
log of its cells' summed attention mass, ``logsumexp`` over its tissue cells, so level 0
samples regions where the coarse map puts mass. Level 1 scores the cells of each sampled
region from a finer view of that region alone, and samples cells (tiles) inside it. The
estimate is ``E_{r~a_0} E_{c~a_1(r)} f_c``: per region the single-level estimator over its
cells, then the single-level estimator over the regions, which keeps value and gradients of
both levels exactly unbiased (every estimator is unbiased and linear in its features;
enumerated in ``tests/test_zoom.py``). A region with fewer allowed cells than ``n`` draws all
of them without replacement, an exact sum.

Everything here is pure tensors in cell units; :class:`~ats_wsi.model.ATSModel` maps cells to
pixels with :class:`~ats_wsi.mapping.GridMapping` and reads through its patch source.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ats_wsi.estimators import expectation
from ats_wsi.sampling import sample

__all__ = ["RegionGrid", "cell_mask", "draw_in_regions", "region_logits", "zoom_expectation"]


@dataclass(frozen=True)
class RegionGrid:
    """Regions as blocks of a (a_h, a_w) cell grid, row-major like the cells.

    Attributes:
        grid: (a_h, a_w) cells of level 0's attention map.
        size: region side in cells.
        stride: cells between region origins (``<= size``, so every cell lies in a region).
    """

    grid: tuple[int, int]
    size: int
    stride: int

    def __post_init__(self) -> None:
        if self.size < 1 or not 1 <= self.stride <= self.size:
            raise ValueError(
                f"region size {self.size} and stride {self.stride}: need 1 <= stride <= size"
            )
        object.__setattr__(self, "grid", (int(self.grid[0]), int(self.grid[1])))

    @property
    def shape(self) -> tuple[int, int]:
        """(r_h, r_w): regions per axis, enough to cover every cell."""
        return tuple(  # type: ignore[return-value]
            1 if a <= self.size else math.ceil((a - self.size) / self.stride) + 1 for a in self.grid
        )

    @property
    def num_regions(self) -> int:
        """M = r_h * r_w."""
        return self.shape[0] * self.shape[1]

    def origin(self, regions: Tensor) -> Tensor:
        """Flat region indices (...) -> their first cell (row, col) (..., 2), int64."""
        regions = torch.as_tensor(regions).long()
        width = self.shape[1]
        return torch.stack((regions // width, regions % width), dim=-1) * self.stride

    def members(self, regions: Tensor | None = None) -> Tensor:
        """(M', size * size) flat cell indices of each region (all when ``regions`` is None),
        row-major inside the region; -1 where the block reaches past the grid."""
        if regions is None:
            regions = torch.arange(self.num_regions)
        origin = self.origin(regions.reshape(-1))
        offs = torch.arange(self.size, device=origin.device)
        rows = origin[:, :1] + offs  # (M', size)
        cols = origin[:, 1:] + offs
        inside = (rows[:, :, None] < self.grid[0]) & (cols[:, None, :] < self.grid[1])
        flat = rows[:, :, None] * self.grid[1] + cols[:, None, :]
        return torch.where(inside, flat, torch.full_like(flat, -1)).flatten(1)


def _gather_cells(values: Tensor, members: Tensor, fill: float | bool) -> Tensor:
    """values (B, K) at members (M, S) -> (B, M, S); ``fill`` where a member is -1."""
    picked = values[:, members.clamp_min(0)]
    return picked.masked_fill(members < 0, fill)


def region_logits(
    cell_logits: Tensor, members: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Level-0 region logits and which regions may be sampled.

    Args:
        cell_logits: (B, K) level-0 logits of the cells.
        members: (M, S) cells of each region (-1: outside the grid).
        mask: optional bool (B, K) cells that may be sampled.

    Returns:
        (B, M) ``logsumexp`` of each region's allowed cell logits (so ``softmax`` of them is
        each region's share of the cells' attention mass), and the (B, M) bool mask of regions
        with at least one allowed cell.
    """
    allowed = members >= 0
    allowed = allowed.expand(cell_logits.shape[0], *members.shape)
    if mask is not None:
        allowed = allowed & _gather_cells(mask.reshape(cell_logits.shape), members, False)
    # A finite floor, not -inf: a region with no allowed cell must not give NaN gradients.
    floor = torch.finfo(cell_logits.dtype).min
    picked = _gather_cells(cell_logits, members, 0.0).masked_fill(~allowed, floor)
    return torch.logsumexp(picked, dim=-1), allowed.any(dim=-1)


def cell_mask(members: Tensor, mask: Tensor | None) -> Tensor:
    """(M, S) bool: the region's cells that lie on the grid and are allowed by the (1, K) mask."""
    inside = members >= 0
    if mask is None:
        return inside
    return inside & _gather_cells(mask.reshape(1, -1), members, False)[0]


def draw_in_regions(
    probs: Tensor, n: int, mode: str, generator: torch.Generator | None = None
) -> list[Tensor]:
    """``n`` cells per row of the (M, S) level-1 distributions, row by row (1-D index tensors).

    Samplers of distinct cells draw ``min(n, allowed cells)`` in a row: a region with fewer
    allowed cells than ``n`` gives all of them.
    """
    out = []
    for row in probs:
        k = n if mode == "with_replacement" else min(n, int((row > 0).sum()))
        out.append(sample(row[None], k, mode, generator)[0])
    return out


def zoom_expectation(
    region_probs: Tensor,
    regions: Tensor,
    cell_probs: Tensor,
    cells: list[Tensor],
    features: Tensor,
    mode: str,
    baseline: Tensor | None = None,
) -> Tensor:
    """The two-level estimate for one sample.

    Args:
        region_probs: (1, M) level-0 distribution over regions.
        regions: (1, N0) sampled regions in draw order.
        cell_probs: (N0, S) level-1 distribution inside each sampled region.
        cells: per sampled region, its drawn cells (1-D, positions inside the region).
        features: (sum of the draws, D) features of the drawn cells, region by region.
        mode: estimator name (the sampler's), used at both levels.
        baseline: optional (D,) control variate independent of the draws.

    Returns:
        (1, D).
    """
    if len(cells) != regions.shape[1] or cell_probs.shape[0] != regions.shape[1]:
        raise ValueError("need one row of cell_probs and one draw of cells per sampled region")
    parts = torch.split(features, [len(c) for c in cells])
    inner = [
        expectation(cell_probs[r : r + 1], f[None], c[None], mode, baseline)
        for r, (c, f) in enumerate(zip(cells, parts, strict=True))
    ]
    return expectation(region_probs, torch.cat(inner)[None], regions, mode, baseline)
