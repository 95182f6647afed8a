"""Lesion outlines of a realistic slide: GeoJSON out, shapely geometry and tile coverage in,
and PNG thumbnails with the outlines drawn.

The outlines (the 50 % contour of a lesion's blend) are in level-0 pixels.
"""

from __future__ import annotations

import json
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.slides.realistic_config import CohortConfig
from ats_wsi.slides.realistic_plan import SlidePlan

__all__ = ["lesion_geojson", "lesion_geometry", "save_thumbnail", "tile_lesion_fraction"]


def lesion_geojson(plan: SlidePlan, cfg: CohortConfig) -> dict[str, Any]:
    """The plan's lesion outlines as a GeoJSON FeatureCollection (level-0 px)."""
    feats = []
    for i, lesion in enumerate(plan.lesions):
        ring = [[round(x, 1), round(y, 1)] for x, y in lesion.polygon()]
        ring.append(ring[0])
        d_um = 2 * lesion.radius * cfg.mpp
        feats.append(
            {
                "type": "Feature",
                "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {
                    "objectType": "annotation",
                    "name": f"tumour {i}",
                    "classification": {"name": "Tumor", "color": [200, 0, 0]},
                    "diameter_um": round(d_um, 1),
                    "diameter_attention_px": round(d_um / cfg.attention_mpp, 2),
                    "source": lesion.source,
                },
            }
        )
    return {"type": "FeatureCollection", "features": feats}


def lesion_geometry(geojson: str | PathLike[str] | dict[str, Any]) -> Any:
    """The union of a GeoJSON's polygons as a shapely geometry (empty for none)."""
    from shapely.geometry import shape
    from shapely.ops import unary_union

    data = geojson if isinstance(geojson, dict) else json.loads(Path(geojson).read_text())
    return unary_union([shape(f["geometry"]).buffer(0) for f in data["features"]])


def tile_lesion_fraction(geometry: Any, top_left_xy: np.ndarray, size: int) -> np.ndarray:
    """Fraction of each ``size`` box (level-0 top-left (x, y)) covered by ``geometry``."""
    import shapely
    from shapely.geometry import box

    xy = np.asarray(top_left_xy, dtype=np.float64).reshape(-1, 2)
    if geometry.is_empty or not len(xy):
        return np.zeros(len(xy))
    boxes = [box(x, y, x + size, y + size) for x, y in xy]
    return shapely.area(shapely.intersection(boxes, geometry)) / float(size * size)



def save_thumbnail(
    slide: str | PathLike[str],
    out_png: str | PathLike[str],
    geojson: str | PathLike[str] | None = None,
    max_side: int = 512,
) -> Path:
    """A PNG thumbnail of ``slide`` with its lesion outlines (if any) drawn in green."""
    import openslide
    from PIL import ImageDraw

    with openslide.OpenSlide(str(slide)) as s:
        w, h = s.dimensions
        thumb = s.get_thumbnail((max_side, max_side)).convert("RGB")
    if geojson is not None:
        scale = thumb.size[0] / w
        draw = ImageDraw.Draw(thumb)
        data = json.loads(Path(geojson).read_text())
        for f in data["features"]:
            ring = [(x * scale, y * scale) for x, y in f["geometry"]["coordinates"][0]]
            draw.line(ring, fill=(0, 170, 0), width=2)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    thumb.save(out)
    return out
