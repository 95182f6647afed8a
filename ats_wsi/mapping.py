"""From an attention cell to the full-resolution patch around it (ATS_SPEC 1.4).

Per axis, with low-res size ``L``, high-res size ``H``, ``A`` attention cells, receptive
field ``rf`` (low-res pixels not covered by the attention map) and patch size ``P``::

    s    = H / L
    step = (L - rf) * s / A
    top-left of cell i = round(rf/2 * s + i * step + step/2 - P/2)

so a patch is centred on the centre of its cell. ``round`` is half-to-even (``torch.round``,
like the reference's ``K.round``). Nothing here clips to the image: boxes partly outside are
valid and the patch source fills the missing pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["GridMapping"]


def _pair(v: int | tuple[int, int] | torch.Size) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    t = tuple(int(a) for a in v)
    if len(t) != 2:
        raise ValueError(f"expected a (height, width) pair, got {v!r}")
    return (t[0], t[1])


@dataclass(frozen=True)
class GridMapping:
    """Geometry of one attention map over a low-res view of a full-resolution frame.

    Attributes:
        low_size: (h, w) of the low-resolution view ``L``.
        high_size: (H, W) of the full-resolution frame, in the patch source's pixel units.
        attention_size: (a_h, a_w) cells of the attention map ``A``.
        receptive_field: low-res pixels lost by 'valid' convolutions, both sides combined.
        patch_size: side ``P`` of the extracted box, in high-res pixel units.
    """

    low_size: tuple[int, int]
    high_size: tuple[int, int]
    attention_size: tuple[int, int]
    receptive_field: int = 0
    # Keyword-only so it may follow the defaulted receptive_field without a default itself.
    patch_size: int = field(kw_only=True)

    def __post_init__(self) -> None:
        # Accept torch.Size / ints from callers, store plain tuples so the dataclass hashes.
        for name in ("low_size", "high_size", "attention_size"):
            object.__setattr__(self, name, _pair(getattr(self, name)))
        if min(self.low_size + self.high_size + self.attention_size) <= 0:
            raise ValueError(f"sizes must be positive: {self}")
        if self.receptive_field < 0 or self.receptive_field >= min(self.low_size):
            raise ValueError(f"receptive_field {self.receptive_field} >= low-res size {self}")
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")

    @property
    def num_cells(self) -> int:
        """K = a_h * a_w."""
        return self.attention_size[0] * self.attention_size[1]

    def _params(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """Per-axis (offset, step) in high-res pixels as float64 (2,) tensors."""
        low = torch.tensor(self.low_size, dtype=torch.float64, device=device)
        high = torch.tensor(self.high_size, dtype=torch.float64, device=device)
        cells = torch.tensor(self.attention_size, dtype=torch.float64, device=device)
        scale = high / low
        step = (low - self.receptive_field) * scale / cells
        offset = self.receptive_field / 2 * scale + step / 2
        return offset, step

    def cell_yx(self, indices: Tensor) -> Tensor:
        """Flat row-major cell indices (...) -> integer (row, col) pairs (..., 2)."""
        indices = torch.as_tensor(indices).long()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_cells):
            raise IndexError(f"cell index outside [0, {self.num_cells})")
        width = self.attention_size[1]
        return torch.stack((indices // width, indices % width), dim=-1)

    def centre(self, indices: Tensor) -> Tensor:
        """Cell centres (..., 2) as float64 (y, x) in high-res pixel coordinates.

        Pixel ``j`` covers ``[j, j + 1)``, so the centre of a 1-cell, 1-pixel map is 0.5.
        """
        offset, step = self._params(torch.as_tensor(indices).device)
        return offset + self.cell_yx(indices).to(torch.float64) * step

    def top_left(self, indices: Tensor) -> Tensor:
        """Top-left (y, x) int64 (..., 2) of the ``patch_size`` box centred on each cell."""
        return torch.round(self.centre(indices) - self.patch_size / 2).long()

    def block_boxes(self, origin: Tensor, cells: int) -> tuple[Tensor, tuple[int, int]]:
        """The boxes covering ``cells`` x ``cells`` blocks of cells whose first cell is
        ``origin`` (..., 2) (row, col): int64 top-left (y, x) (..., 2) and one (h, w) size,
        in high-res pixels. A cell spans ``step`` pixels around its centre."""
        offset, step = self._params(torch.as_tensor(origin).device)
        start = offset - step / 2 + torch.as_tensor(origin).to(torch.float64) * step
        size = (cells * step).round().long().tolist()
        return torch.round(start).long(), (int(size[0]), int(size[1]))
