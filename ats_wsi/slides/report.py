"""What a person reads after a prediction run: attention heatmaps over the slide, a QuPath layer,
a pyramidal overlay, and a per-run ``summary.html``.

Attention cells are placed in level-0 pixels with the model's own geometry (ATS_SPEC 1.4, as
:class:`~ats_wsi.mapping.GridMapping`): the grid covers the low-resolution view less
``receptive_field / 2`` view pixels on each side.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.checkpoint import atomic_write_text

__all__ = [
    "HEATMAP_LONGEST_SIDE",
    "cell_edges",
    "display_mpp",
    "save_attention_heatmap",
    "save_attention_overlay",
    "save_attention_tiles_geojson",
    "write_summary_html",
]

HEATMAP_LONGEST_SIDE = 1500
"""Longest side in pixels of the slide image in a heatmap."""
HEATMAP_TITLE_PX = 34
HEATMAP_MARGIN_PX = 10


def cell_edges(
    attention_shape: tuple[int, int],
    view_shape: tuple[int, int],
    dimensions: tuple[int, int],
    receptive_field: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Level-0 edges of the attention cells: (x edges (a_w + 1,), y edges (a_h + 1,)).

    Args:
        attention_shape: (a_h, a_w) of the map.
        view_shape: (h, w) of the low-resolution view the map was computed on.
        dimensions: level-0 (width, height).
        receptive_field: view pixels the attention net loses, both sides together.
    """
    edges = []
    for cells, low, high in zip(attention_shape[::-1], view_shape[::-1], dimensions, strict=True):
        scale = high / low
        step = (low - receptive_field) * scale / cells
        edges.append(receptive_field / 2 * scale + np.arange(cells + 1) * step)
    return edges[0], edges[1]


def display_mpp(
    dimensions: tuple[int, int], mpp: tuple[float, float], longest: int = HEATMAP_LONGEST_SIDE
) -> float:
    """The mpp at which the whole slide is ``longest`` pixels on its longest side."""
    extent = max(dimensions[0] * mpp[0], dimensions[1] * mpp[1])
    return extent / longest


def _cell_index(edges: np.ndarray, n_out: int, extent: int) -> np.ndarray:
    """For each of ``n_out`` display pixels over ``extent`` level-0 pixels, its cell or -1."""
    centres = (np.arange(n_out) + 0.5) * extent / n_out
    index = np.searchsorted(edges, centres, side="right") - 1
    index[(centres < edges[0]) | (centres >= edges[-1])] = -1
    return index


def _colour_cells(
    attention: np.ndarray,
    mask: np.ndarray | None,
    edges: tuple[np.ndarray, np.ndarray],
    size: tuple[int, int],
    dimensions: tuple[int, int],
    cmap: str,
    vmax: float,
    alpha: float = 1.0,
) -> tuple[np.ndarray, np.ndarray]:
    """The cells at display size (w, h): (h, w, 3) uint8 colours and (h, w) float32 opacity.

    Opacity grows with attention (``alpha`` at the maximum, a quarter of it near zero) so
    that the few attended cells stand out and the tissue stays visible elsewhere; cells off
    the tissue or outside the grid have opacity 0.
    """
    import matplotlib

    rel = np.clip(np.asarray(attention, dtype=np.float64) / vmax, 0, 1)
    # Colour the (a_h, a_w) grid once, then index it: cheap at any display size. The extra
    # last row and column are the transparent "outside the grid" cell (index -1).
    colours = np.zeros((rel.shape[0] + 1, rel.shape[1] + 1, 3), np.uint8)
    colours[:-1, :-1] = np.rint(matplotlib.colormaps[cmap](rel)[..., :3] * 255)
    opacity = np.zeros((rel.shape[0] + 1, rel.shape[1] + 1), np.float32)
    opacity[:-1, :-1] = alpha * (0.25 + 0.75 * np.sqrt(rel))
    if mask is not None:
        opacity[:-1, :-1] *= np.asarray(mask, dtype=bool)
    cols = _cell_index(edges[0], size[0], dimensions[0])
    rows = _cell_index(edges[1], size[1], dimensions[1])
    index = np.ix_(rows, cols)
    return colours[index], opacity[index]


def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def save_attention_heatmap(
    path: str | os.PathLike[str],
    image: np.ndarray,
    attention: np.ndarray,
    mask: np.ndarray | None,
    edges: tuple[np.ndarray, np.ndarray],
    dimensions: tuple[int, int],
    *,
    locations_xy: np.ndarray | None = None,
    patch_size: int = 0,
    title: str = "",
    alpha: float = 0.6,
    cmap: str = "turbo",
    max_labels: int = 16,
    regions_xywh: np.ndarray | None = None,
) -> Path:
    """The attention map over a slide image, with a colour bar and the sampled boxes, as PNG.

    Drawn with Pillow (a fraction of matplotlib's time per slide): the slide image at one PNG
    pixel per image pixel, below a title, with the colour bar on its right.

    Args:
        path: output PNG.
        image: (h, w, 3) uint8 of the whole slide (e.g. ``reader.thumbnail(display_mpp(...))``).
        attention: (a_h, a_w) probabilities; cells outside ``mask`` are not coloured.
        edges: level-0 cell edges from :func:`cell_edges`.
        dimensions: level-0 (width, height).
        locations_xy: (N, 2) level-0 top-left of the sampled patches, in draw order.
        patch_size: their side in level-0 pixels.
        title: text above the image.
        regions_xywh: (R, 4) level-0 (x, y, w, h) zoom-in regions, outlined under the boxes.
    """
    import matplotlib
    from PIL import Image, ImageDraw

    h, w = image.shape[:2]
    att = np.asarray(attention, dtype=np.float64)
    shown = att[np.asarray(mask, dtype=bool)] if mask is not None and mask.any() else att
    vmax = float(shown.max()) if shown.size and shown.max() > 0 else 1.0
    colours, opacity = _colour_cells(att, mask, edges, (w, h), dimensions, cmap, vmax, alpha)
    a = opacity[..., None]
    blend = np.rint(image[..., :3] * (1 - a) + colours * a).astype(np.uint8)

    top, left, bar_w, right = HEATMAP_TITLE_PX, HEATMAP_MARGIN_PX, 22, 120
    canvas = Image.new("RGB", (left + w + right, top + h + HEATMAP_MARGIN_PX), "white")
    canvas.paste(Image.fromarray(blend), (left, top))
    draw = ImageDraw.Draw(canvas)
    font = _font(16)
    if title:
        draw.text((left, 8), title, fill="black", font=font)
    sx, sy = w / dimensions[0], h / dimensions[1]
    for x, y, rw, rh in np.asarray([] if regions_xywh is None else regions_xywh).reshape(-1, 4):
        # Clipped to the image: an edge region's box may reach past the slide.
        x1, y1 = min(left + (x + rw) * sx, left + w), min(top + (y + rh) * sy, top + h)
        box = (max(left + x * sx, left), max(top + y * sy, top), x1, y1)
        draw.rectangle(box, outline="black", width=5)
        draw.rectangle(box, outline=(0, 200, 255), width=3)
    if locations_xy is not None and patch_size > 0:
        for rank, (x, y) in enumerate(np.asarray(locations_xy).reshape(-1, 2)):
            x0, y0 = left + x * sx, top + y * sy
            x1, y1 = x0 + max(patch_size * sx, 3), y0 + max(patch_size * sy, 3)
            # White inside black: visible over tissue, glass and every colour of the map.
            draw.rectangle((x0 - 1, y0 - 1, x1 + 1, y1 + 1), outline="black", width=4)
            draw.rectangle((x0, y0, x1, y1), outline="white", width=2)
            if rank < max_labels:
                draw.text(
                    (x0, y0 - 4),
                    str(rank + 1),
                    fill="white",
                    font=_font(13),
                    anchor="lb",
                    stroke_width=2,
                    stroke_fill="black",
                )
    # Colour bar: top = the map's maximum, labelled in attention probability.
    bar_h = max(int(h * 0.7), 60)
    bx, by = left + w + 24, top + (h - bar_h) // 2
    ramp = matplotlib.colormaps[cmap](np.linspace(1, 0, bar_h))[:, :3]
    bar = np.repeat(np.rint(ramp * 255).astype(np.uint8)[:, None], bar_w, axis=1)
    canvas.paste(Image.fromarray(bar), (bx, by))
    draw.rectangle((bx - 1, by - 1, bx + bar_w, by + bar_h), outline="black")
    small = _font(12)
    for k in range(5):
        value, y = vmax * k / 4, by + bar_h - 1 - round((bar_h - 1) * k / 4)
        draw.line((bx + bar_w, y, bx + bar_w + 4, y), fill="black")
        draw.text((bx + bar_w + 7, y), f"{value:.2g}", fill="black", font=small, anchor="lm")
    draw.text((bx - 4, by - 8), "attention", fill="black", font=small, anchor="lb")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, compress_level=3)  # zlib 3: near level 6's size, much faster
    return path


def save_attention_tiles_geojson(
    path: str | os.PathLike[str],
    attention: np.ndarray,
    mask: np.ndarray | None,
    edges: tuple[np.ndarray, np.ndarray],
    name: str = "ATS attention",
) -> Path:
    """Attention cells as QuPath tiles: a GeoJSON FeatureCollection in level-0 pixels.

    Every tissue cell (every cell without a mask) is a Polygon with ``objectType: "tile"`` and
    QuPath's ``measurements`` map (since QuPath 0.4): ``attention`` (the cell's probability),
    ``attention_rel`` (over the map's maximum), ``row``, ``col``. QuPath imports it with
    File > Import objects from file; measurement maps colour the tiles.
    """
    att = np.asarray(attention, dtype=np.float64)
    keep = np.ones(att.shape, bool) if mask is None else np.asarray(mask, dtype=bool)
    top = float(att[keep].max()) if keep.any() and att[keep].max() > 0 else 1.0
    xs, ys = edges
    features = []
    for r, c in zip(*np.nonzero(keep), strict=True):
        x0, x1, y0, y1 = float(xs[c]), float(xs[c + 1]), float(ys[r]), float(ys[r + 1])
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        features.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "tile",
                    "name": f"{name} {r},{c}",
                    "measurements": {
                        "attention": float(att[r, c]),
                        "attention_rel": float(att[r, c] / top),
                        "row": int(r),
                        "col": int(c),
                    },
                },
            }
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    return path


def save_attention_overlay(
    path: str | os.PathLike[str],
    attention: np.ndarray,
    mask: np.ndarray | None,
    edges: tuple[np.ndarray, np.ndarray],
    dimensions: tuple[int, int],
    level0_mpp: tuple[float, float],
    *,
    longest: int = 2048,
    cmap: str = "turbo",
    chunk: int = 512,
) -> Path:
    """The colour-mapped attention as an OME-Zarr pyramid aligned with the slide.

    The overlay covers the whole slide at an mpp making its longest side ``longest`` pixels;
    its NGFF scale is in micrometres, so viewers that overlay images in physical units
    (napari, OME-Zarr viewers) place it over the slide. Cells off the tissue are white.
    """
    from ats_wsi.io.convert import write_ome_zarr
    from ats_wsi.io.images import ArrayReader

    mpp = display_mpp(dimensions, level0_mpp, longest)
    size = tuple(max(1, round(d * m / mpp)) for d, m in zip(dimensions, level0_mpp, strict=True))
    att = np.asarray(attention, dtype=np.float64)
    shown = att[np.asarray(mask, dtype=bool)] if mask is not None and mask.any() else att
    vmax = float(shown.max()) if shown.size and shown.max() > 0 else 1.0
    colours, opacity = _colour_cells(att, mask, edges, size, dimensions, cmap, vmax)
    # Full colour on tissue cells (opacity is for the viewer to set), white elsewhere.
    image = np.where(opacity[..., None] > 0, colours, np.uint8(255))
    scale = (dimensions[0] * level0_mpp[0] / size[0], dimensions[1] * level0_mpp[1] / size[1])
    reader = ArrayReader(image, mpp=scale, path=Path(path).name)
    return write_ome_zarr(reader, path, chunk=chunk, overwrite=True, max_workers=1)


def write_summary_html(
    path: str | os.PathLike[str],
    rows: Iterable[Mapping[str, Any]],
    classes: Sequence[str],
    title: str = "ATS predictions",
) -> Path:
    """One HTML page listing each slide: heatmap thumbnail, prediction, resolution, error.

    Thumbnails link to ``heatmaps/<slide_id>.png`` next to the page when it exists.
    """
    out = Path(path)
    rows = list(rows)
    n_err = sum(1 for r in rows if r.get("error"))
    lines = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
        "th{background:#f0f0f0}.err{color:#b00020;max-width:40em}img{max-width:240px}</style>",
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{len(rows)} slides, {n_err} with errors. Classes: "
        f"{html.escape(', '.join(classes))}.</p>",
        "<table><tr><th>heatmap</th><th>slide</th><th>prediction</th><th>label</th>"
        "<th>probabilities</th><th>mpp (source)</th><th>time (s)</th><th>error</th></tr>",
    ]
    for r in rows:
        sid = str(r.get("slide_id", ""))
        heatmap = out.parent / "heatmaps" / f"{sid}.png"
        thumb = ""
        if heatmap.exists():
            href = html.escape(f"heatmaps/{sid}.png", quote=True)
            thumb = f"<a href='{href}'><img src='{href}' alt='{html.escape(sid)}'></a>"
        probs = []
        for i, name in enumerate(classes):
            value = r.get(f"p_{i}", "")
            if value not in ("", None):
                probs.append(f"{html.escape(name)}: {float(value):.3f}")
        mpp = r.get("mpp", "")
        mpp_text = f"{float(mpp):.4g} ({html.escape(str(r.get('mpp_source', '')))})" if mpp else ""
        runtime = r.get("runtime_s", "")
        runtime_text = f"{float(runtime):.2f}" if runtime not in ("", None) else ""
        lines.append(
            "<tr>"
            f"<td>{thumb}</td><td>{html.escape(sid)}</td>"
            f"<td>{html.escape(str(r.get('pred_label', '')))}</td>"
            f"<td>{html.escape(str(r.get('label', '')))}</td>"
            f"<td>{'<br>'.join(probs)}</td><td>{mpp_text}</td><td>{runtime_text}</td>"
            f"<td class='err'>{html.escape(str(r.get('error', '')))}</td>"
            "</tr>"
        )
    lines.append("</table></body></html>")
    out.parent.mkdir(parents=True, exist_ok=True)
    # Several jobs may write it: a temp file of its own each, so readers never see half a page.
    atomic_write_text(out, "\n".join(lines))
    return out
