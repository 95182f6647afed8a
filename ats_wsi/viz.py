"""Figures: where the attention looked and what the feature net saw.

matplotlib is imported lazily (with the Agg backend) so that importing this module, and the
training code that uses it, never needs a display or pays matplotlib's import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["save_attention_figure"]


def _np(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    return np.asarray(x)


def _as_image(x: np.ndarray) -> tuple[np.ndarray, str | None]:
    """(C, h, w) or (h, w) -> something ``imshow`` draws, and a colormap for grey images."""
    if x.ndim == 3:
        if x.shape[0] == 1:
            x = x[0]
        else:
            x = np.moveaxis(x[:3], 0, -1)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255.0
    return np.clip(x, 0.0, 1.0), ("gray" if x.ndim == 2 else None)


def save_attention_figure(
    path: str | Path,
    x_low: Any,
    attention: Any,
    locations: Any,
    patch_size: int,
    high_size: Sequence[int],
    patches: Any | None = None,
    title: str | None = None,
    max_patches: int = 10,
    regions: Any | None = None,
) -> Path:
    """Save a PNG: low-res view, attention heatmap with the sampled boxes, patch gallery.

    Args:
        path: output file (parent folders are created).
        x_low: (C, h, w) or (h, w) low-resolution view of one sample.
        attention: (a_h, a_w) attention probabilities of that sample.
        locations: (N, 2) top-left (y, x) of the sampled patches in full-resolution pixels.
        patch_size: patch side in full-resolution pixels.
        high_size: (H, W) of the full-resolution image (to scale boxes to the low-res view).
        patches: optional (N, C, p, p) patches, drawn in sampling order below.
        title: figure title (e.g. label and prediction).
        max_patches: at most this many gallery panels.
        regions: optional (R, 4) zoom-in regions as top-left (y, x) and (h, w) in
            full-resolution pixels, outlined (dashed) on the attention panel.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    low, cmap = _as_image(_np(x_low))
    att = _np(attention)
    locs = _np(locations).reshape(-1, 2)
    h, w = low.shape[:2]
    sy, sx = h / float(high_size[0]), w / float(high_size[1])
    gallery = [] if patches is None else [_as_image(p) for p in _np(patches)[:max_patches]]
    # At least 4 columns so the two top panels are 2 columns (4 in) wide and their titles fit.
    ncols = max(4, len(gallery))
    fig = plt.figure(figsize=(2.0 * ncols, 4.0 + (2.2 if gallery else 0.0)), dpi=100)
    grid = fig.add_gridspec(2 if gallery else 1, ncols, height_ratios=[2, 1] if gallery else [1])
    half = ncols // 2
    ax_low = fig.add_subplot(grid[0, :half])
    ax_att = fig.add_subplot(grid[0, half:])
    ax_low.imshow(low, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    ax_low.set_title("low-resolution view")
    ax_att.imshow(low, cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
    # The attention map may be smaller than the view (pooling, 'valid' convs): stretch it
    # over the view; cell-accurate placement is what the boxes show.
    ax_att.imshow(att, cmap="inferno", alpha=0.6, extent=(-0.5, w - 0.5, h - 0.5, -0.5))
    boxes = np.zeros((0, 4)) if regions is None else _np(regions).reshape(-1, 4)
    for i, (y, x, bh, bw) in enumerate(boxes):
        ax_att.add_patch(
            Rectangle(
                (x * sx - 0.5, y * sy - 0.5),
                bw * sx,
                bh * sy,
                fill=False,
                edgecolor="lime",
                linestyle="--",
                linewidth=1.2,
            )
        )
        ax_att.text(x * sx, (y + bh) * sy, f"R{i}", color="lime", fontsize=6, va="top")
    for i, (y, x) in enumerate(locs):
        ax_att.add_patch(
            Rectangle(
                (x * sx - 0.5, y * sy - 0.5),
                patch_size * sx,
                patch_size * sy,
                fill=False,
                edgecolor="cyan",
                linewidth=1.0,
            )
        )
        ax_att.text(x * sx, y * sy, str(i), color="cyan", fontsize=6, va="bottom")
    regions_text = f", {len(boxes)} regions" if len(boxes) else ""
    ax_att.set_title(f"attention (max {att.max():.2g}) + {len(locs)} patches{regions_text}")
    for ax in (ax_low, ax_att):
        ax.set_xticks([])
        ax.set_yticks([])
    for i, (img, pcmap) in enumerate(gallery):
        ax = fig.add_subplot(grid[1, i])
        ax.imshow(img, cmap=pcmap, vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(f"patch {i}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
    plt.close(fig)
    return path
