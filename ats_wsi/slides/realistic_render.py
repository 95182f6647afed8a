"""Level-0 pixels of a realistic slide plan, and the slide's pyramidal TIFF.

Slides are tiled pyramidal TIFFs (JPEG tiles of 256 px, every 2x level, resolution tags
OpenSlide reads), written block by block through
:func:`~ats_wsi.io.synthetic.write_pyramidal_tiff`: no level is ever held whole in memory.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path

import numpy as np

from ats_wsi.io.synthetic import write_pyramidal_tiff
from ats_wsi.slides.realistic_config import CohortConfig
from ats_wsi.slides.realistic_plan import PLAN, Bank, Layer, Lesion, SlidePlan

__all__ = ["BLOCK", "STRIP", "render_region", "strip_noise", "write_slide"]

STRIP = 256  # rows rendered at once (the TIFF tile side)
BLOCK = 4096  # columns rendered at once (a multiple of the tile side)


def _upsample(plan_field: np.ndarray, y0: int, h: int, x0: int, w: int) -> np.ndarray:
    """Bilinear level-0 values of a plan-res field over rows ``y0 .. y0 + h`` and columns
    ``x0 .. x0 + w`` (pixel centres).

    The window is resized with one plan pixel of margin (edge-padded past the top and bottom;
    at the left and right edges the field's own border), so every window gives the values the
    whole field would: the resize scale is exactly ``PLAN``.
    """
    import cv2

    r0 = y0 // PLAN - 1
    r1 = (y0 + h) // PLAN + 2
    c0 = max(0, x0 // PLAN - 1)
    c1 = min(plan_field.shape[1], (x0 + w) // PLAN + 2)
    pad_top = max(0, -r0)
    rows = plan_field[max(0, r0) : min(plan_field.shape[0], r1), c0:c1]
    if pad_top or r1 > plan_field.shape[0]:
        rows = np.pad(rows, ((pad_top, max(0, r1 - plan_field.shape[0])), (0, 0)), mode="edge")
    big = cv2.resize(rows, ((c1 - c0) * PLAN, rows.shape[0] * PLAN), interpolation=cv2.INTER_LINEAR)
    off_y, off_x = y0 - r0 * PLAN, x0 - c0 * PLAN
    return big[off_y : off_y + h, off_x : off_x + w]


def _quilt(
    layer: Layer, bank: Bank, y0: int, h: int, x0: int, w: int
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted sum of the layer's stamps over the window, and the sum of weights."""
    acc = np.zeros((h, w, 3), np.float32)
    wsum = np.zeros((h, w), np.float32)
    s = bank.stamps.shape[1]
    hit = (
        layer.needed
        & (layer.y0 < y0 + h)
        & (layer.y0 + s > y0)
        & (layer.x0 < x0 + w)
        & (layer.x0 + s > x0)
    )
    for i in np.flatnonzero(hit):
        sy, sx = int(layer.y0[i]), int(layer.x0[i])
        a0, a1 = max(sy, y0), min(sy + s, y0 + h)
        b0, b1 = max(sx, x0), min(sx + s, x0 + w)
        e = int(layer.entry[i])
        wt = bank.weights[e, a0 - sy : a1 - sy, b0 - sx : b1 - sx]
        st = bank.stamps[e, a0 - sy : a1 - sy, b0 - sx : b1 - sx]
        acc[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += (wt[..., None] * st) * layer.gain[i]
        wsum[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] += wt
    return acc, wsum


def _lesion_alpha(lesion: Lesion, y0: int, h: int, x0: int, w: int) -> np.ndarray:
    yy = np.arange(y0, y0 + h, dtype=np.float32)[:, None] + 0.5 - lesion.cy
    xx = np.arange(x0, x0 + w, dtype=np.float32)[None, :] + 0.5 - lesion.cx
    r = lesion.radius_at(np.arctan2(yy, xx))
    return np.clip((r - np.hypot(yy, xx)) / lesion.edge + 0.5, 0, 1).astype(np.float32)


def strip_noise(plan: SlidePlan, y0: int, h: int) -> np.ndarray:
    """The glass noise of rows ``y0 .. y0 + h`` (full width, float32, drawn in one go per strip)."""
    rng = np.random.default_rng([*plan.seed, y0])
    return rng.standard_normal((h, plan.width, 1), dtype=np.float32)


def render_region(
    plan: SlidePlan,
    y0: int,
    h: int,
    x0: int = 0,
    w: int | None = None,
    noise: np.ndarray | None = None,
) -> np.ndarray:
    """Level-0 RGB uint8 of rows ``y0 .. y0 + h``, columns ``x0 .. x0 + w`` (default: the full
    width) of the slide. ``noise``: :func:`strip_noise` of the same rows, when already drawn."""
    w = plan.width - x0 if w is None else w
    alpha = np.clip(_upsample(plan.tissue_sd, y0, h, x0, w) * (PLAN / 6.0) + 0.5, 0, 1)
    skin = _upsample(plan.skin, y0, h, x0, w)
    normal = np.zeros((h, w, 3), np.float32)
    for layer, lw in zip(plan.layers, (skin, 1 - skin), strict=True):
        acc, wsum = _quilt(layer, plan.banks[layer.source], y0, h, x0, w)
        # Where no stamp reaches, acc is 0 too, so the floor on wsum only avoids 0 / 0.
        acc *= (lw / np.maximum(wsum, 1e-12))[..., None]
        normal += acc
    for lesion, layer in zip(plan.lesions, plan.tumour_layers, strict=True):
        ly0, lx0, ly1, lx1 = lesion.bbox
        a0, a1 = max(ly0, y0), min(ly1, y0 + h)
        b0, b1 = max(lx0, x0), min(lx1, x0 + w)
        if a1 <= a0 or b1 <= b0:
            continue
        acc, wsum = _quilt(layer, plan.banks[layer.source], a0, a1 - a0, b0, b1 - b0)
        la = _lesion_alpha(lesion, a0, a1 - a0, b0, b1 - b0)[..., None]
        tumour = acc / np.maximum(wsum, 1e-12)[..., None]
        win = normal[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0]
        win[:] = la * tumour + (1 - la) * win
    if noise is None:
        noise = strip_noise(plan, y0, h)
    glass = plan.glass + 1.2 * noise[:, x0 : x0 + w]
    a = alpha[..., None]
    normal -= glass
    normal *= a
    normal += glass
    np.rint(normal, out=normal)
    return np.clip(normal, 0, 255).astype(np.uint8)


def write_slide(plan: SlidePlan, path: str | PathLike[str], cfg: CohortConfig) -> Path:
    """Write the plan as a pyramidal TIFF block by block (``STRIP`` rows x ``BLOCK`` columns in
    memory, plus one strip of glass noise), so memory does not grow with the slide."""
    cache: dict[tuple[int, int], np.ndarray] = {}
    noise: dict[int, np.ndarray] = {}

    def tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        top, left = y - y % STRIP, x - x % BLOCK
        if (top, left) not in cache:
            rows = min(STRIP, plan.height - top)
            if top not in noise:
                noise.clear()
                noise[top] = strip_noise(plan, top, rows)
            cache.clear()
            cols = min(BLOCK, plan.width - left)
            cache[(top, left)] = render_region(plan, top, rows, left, cols, noise[top])
        return cache[(top, left)][y - top : y - top + h, x - left : x - left + w]

    return write_pyramidal_tiff(
        path,
        tile,
        cfg.mpp,
        shape=(plan.height, plan.width),
        tile=cfg.tile,
        compression=cfg.compression,
    )
