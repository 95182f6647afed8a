"""A CAMELYON-like cohort: realistic synthetic whole slides quilted from real H&E images.

What is real and what is synthetic:

* **Real**: every tissue pixel comes from a real H&E image. Normal tissue from the non-tumour
  images of ``shared/data/slides`` (the skin of ``CMU-1-Small-Region.svs``, its glass left out,
  and the smooth-muscle / stroma Kather tile ``kather-tile-1.tif``); tumour from the real
  carcinoma images (the TCGA image, tiatoolbox's ``target_image.png`` resampled x0.5 to about
  0.5 um/px by nuclear size, and the epithelium Kather tile ``kather-tile-2.tif``).
* **Synthetic**: the arrangement. Each slide is quilted from crops of those images ("stamps"):
  random position, random rotation (any angle, then a random flip), small colour jitter per
  stamp and a stain jitter per slide, blended with soft, noise-perturbed weights so that seams
  are irregular. The tissue outline is a thresholded smooth noise field (20-50 % of the
  slide), the region type (skin vs stroma) another smooth field. Positive slides hold 1-3
  tumour lesions: irregular lobulated blobs (Fourier-perturbed radius) of diameters drawn
  log-uniformly over a range that spans lesions far below one attention cell and lesions
  tens of cells wide, blended into the tissue over a soft border. The outlines (the 50 %
  contour of the blend) are saved as GeoJSON in level-0 pixels.

Slides are tiled pyramidal TIFFs (JPEG tiles of 256 px, every 2x level, resolution tags
OpenSlide reads) at 0.5 um/px, written block by block through
:func:`~ats_wsi.io.synthetic.write_pyramidal_tiff`: no level is ever held whole in memory.
A cohort is cached under ``<cache_dir>/realistic-v<version>-<hash of the config>``; each slide
is written atomically, so an interrupted build resumes where it stopped.

Modules: :mod:`~ats_wsi.slides.realistic_config` (the config, version, classes),
:mod:`~ats_wsi.slides.realistic_sources` (the real images), :mod:`~ats_wsi.slides.realistic_plan`
(tissue and lesion geometry), :mod:`~ats_wsi.slides.realistic_render` (pixels and the TIFF
writer), :mod:`~ats_wsi.slides.realistic_outlines` (GeoJSON, lesion coverage, thumbnails); this
module plans and caches the cohort and re-exports the public names of the others.
"""

from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.slides.realistic_config import CLASSES, GENERATOR_VERSION, CohortConfig
from ats_wsi.slides.realistic_outlines import (
    lesion_geojson,
    lesion_geometry,
    save_thumbnail,
    tile_lesion_fraction,
)

# Bank, Layer and Source are not in __all__ but stay importable from here.
from ats_wsi.slides.realistic_plan import Bank as Bank
from ats_wsi.slides.realistic_plan import Layer as Layer
from ats_wsi.slides.realistic_plan import Lesion, SlidePlan, plan_slide
from ats_wsi.slides.realistic_render import render_region, strip_noise, write_slide
from ats_wsi.slides.realistic_sources import (
    NORMAL_SOURCES,
    TUMOUR_SOURCES,
    default_source_dir,
    load_sources,
)
from ats_wsi.slides.realistic_sources import Source as Source

__all__ = [
    "CLASSES",
    "GENERATOR_VERSION",
    "NORMAL_SOURCES",
    "TUMOUR_SOURCES",
    "Cohort",
    "CohortConfig",
    "Lesion",
    "SlidePlan",
    "default_source_dir",
    "lesion_geometry",
    "load_sources",
    "make_cohort",
    "plan_slide",
    "render_region",
    "strip_noise",
    "save_thumbnail",
    "tile_lesion_fraction",
    "write_slide",
]


@dataclass
class Cohort:
    """A built cohort: its folder, manifest and per-slide ground truth."""

    root: Path
    manifest: Path
    slides: list[dict[str, Any]]

    def slide_path(self, slide_id: str) -> Path:
        """The slide's TIFF."""
        return self.root / "slides" / f"{slide_id}.tif"

    def lesion_path(self, slide_id: str) -> Path:
        """The slide's lesion outlines (GeoJSON; empty collection on negatives)."""
        return self.root / "lesions" / f"{slide_id}.geojson"


def _cohort_dir(cache_dir: Path, cfg: CohortConfig) -> Path:
    digest = hashlib.sha1(json.dumps(cfg.key(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir / f"realistic-v{GENERATOR_VERSION}-{digest}"


def _build_one(job: tuple[CohortConfig, str, bool, tuple[int, ...], str, str]) -> dict[str, Any]:
    cfg, slide_id, positive, seed, root, source_dir = job
    out = Path(root)
    tif = out / "slides" / f"{slide_id}.tif"
    geo = out / "lesions" / f"{slide_id}.geojson"
    meta = out / "lesions" / f"{slide_id}.json"
    if tif.exists() and geo.exists() and meta.exists():
        return json.loads(meta.read_text())
    plan = plan_slide(cfg, positive, seed, load_sources(source_dir))
    tmp = tif.with_suffix(".tmp.tif")
    write_slide(plan, tmp, cfg)
    os.replace(tmp, tif)
    geo.write_text(json.dumps(lesion_geojson(plan, cfg)))
    info = {
        "slide_id": slide_id,
        "width": plan.width,
        "height": plan.height,
        "tissue_fraction": round(plan.tissue_fraction, 4),
        "n_lesions": len(plan.lesions),
        "lesion_diameters_um": [round(2 * les.radius * cfg.mpp, 1) for les in plan.lesions],
        "bytes": tif.stat().st_size,
    }
    meta.write_text(json.dumps(info))
    return info


def make_cohort(
    cache_dir: str | PathLike[str],
    cfg: CohortConfig | None = None,
    *,
    source_dir: str | PathLike[str] | None = None,
    progress: bool = False,
) -> Cohort:
    """Build (or reuse) the cohort of ``cfg`` under ``cache_dir``; returns its description.

    Layout of ``<cache_dir>/realistic-v<version>-<hash>/``: ``slides/<slide_id>.tif``,
    ``lesions/<slide_id>.geojson`` (outlines) and ``.json`` (size, tissue, lesion diameters),
    ``manifest.csv`` (``case_id, slide_id, label``; written last: it marks a complete cohort)
    and ``cohort.json`` (the config and the per-slide facts).
    """
    cfg = cfg or CohortConfig()
    root = _cohort_dir(Path(cache_dir), cfg)
    manifest = root / "manifest.csv"
    meta = root / "cohort.json"
    if manifest.exists() and meta.exists():
        return Cohort(root, manifest, json.loads(meta.read_text())["slides"])
    (root / "slides").mkdir(parents=True, exist_ok=True)
    (root / "lesions").mkdir(parents=True, exist_ok=True)
    src = str(Path(source_dir) if source_dir is not None else default_source_dir())
    load_sources(src)  # fail early, before any process starts
    rng = np.random.default_rng([cfg.seed, 7])
    n_pos = round(cfg.n_cases * cfg.positive_fraction)
    labels = np.array([1] * n_pos + [0] * (cfg.n_cases - n_pos))
    rng.shuffle(labels)
    jobs, rows = [], []
    for c, y in enumerate(labels):
        n_slides = int(rng.integers(cfg.slides_per_case[0], cfg.slides_per_case[1] + 1))
        for s in range(n_slides):
            slide_id = f"case-{c:03d}-s{s}"
            jobs.append((cfg, slide_id, bool(y), (cfg.seed, c, s), str(root), src))
            rows.append((f"case-{c:03d}", slide_id, CLASSES[int(y)]))
    if cfg.workers > 1:
        with ProcessPoolExecutor(cfg.workers) as pool:
            infos = list(pool.map(_build_one, jobs))
    else:
        infos = []
        for k, job in enumerate(jobs):
            infos.append(_build_one(job))
            if progress:
                print(f"cohort: slide {k + 1}/{len(jobs)} {job[1]}", flush=True)
    slides = [
        {"case_id": c, "label": lab, **info} for (c, _, lab), info in zip(rows, infos, strict=True)
    ]
    meta.write_text(json.dumps({"config": cfg.key(), "slides": slides}, indent=1))
    manifest.write_text(
        "case_id,slide_id,label\n" + "".join(f"{c},{s},{lab}\n" for c, s, lab in rows)
    )
    return Cohort(root, manifest, slides)
