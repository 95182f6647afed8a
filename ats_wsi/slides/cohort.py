"""A small synthetic-lesion cohort built from real H&E tissue (the demo of ATS_SPEC 2.3).

Each demo slide is a pyramidal TIFF (level 0 at 0.5 um/px, OpenSlide-readable mpp tags) whose
tissue is a mirrored mosaic of the real H&E image tiatoolbox ships, cut into an irregular blob
on a white background. Every slide, whatever its label, also holds one or two **hotspots**: discs
of paler, eosin-rich tissue that are obvious at low magnification (think of the subcapsular
sinus of a lymph node, where metastases start).

A positive ("tumor") slide carries one small **lesion** (a disc of about two patch sizes) inside
a hotspot: a lattice of dark dots, 2 um apart, added to the tissue. The perturbation sums to
exactly zero over every aligned 2 x 2 pixel block (and never clips), so every pyramid level from
level 1 (1 um/px) up is bit-identical to the lesion-free slide: at the attention resolution
(8-32 um/px) positive and negative slides cannot be told apart, while a 32 px patch at level 0
shows the lesion plainly. A model that only sees the low-resolution view is therefore at chance;
attention sampling has to learn to look at hotspots and read them at full resolution.
"""

from __future__ import annotations

import importlib.util
import json
import math
from dataclasses import asdict, dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ats_wsi.checkpoint import atomic_write_text
from ats_wsi.io.synthetic import write_pyramidal_tiff

__all__ = [
    "DEMO_CLASSES",
    "DemoCohortConfig",
    "DemoSlide",
    "lesion_perturbation",
    "make_demo_cohort",
    "render_demo_slide",
    "tissue_image",
]

DEMO_CLASSES = ("normal", "tumor")

# Per-channel amplitude direction of the lesion dots: darker in all channels, most in green
# (hematoxylin-dense nuclei look dark purple).
_LESION_COLOUR = np.array([0.75, 1.0, 0.55])
# Hotspot tissue: a pale pink (eosin) tint over the mosaic, visible at any magnification.
_HOTSPOT_TINT = np.array([236.0, 168.0, 204.0])
_HOTSPOT_MIX = 0.55
_BACKGROUND = 242  # glass is not pure white; a little noise keeps Otsu honest


def tissue_image() -> np.ndarray:
    """The real H&E tile tiatoolbox ships (1000 x 1000 RGB uint8), read as a plain file.

    ``importlib.resources.files("tiatoolbox")`` would import tiatoolbox (slow, and it changes
    torch global settings), so the package directory comes from ``find_spec`` instead, which
    locates the package without executing it.
    """
    spec = importlib.util.find_spec("tiatoolbox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tiatoolbox is not installed; its target_image.png is needed")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "target_image.png"
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@dataclass(frozen=True)
class DemoCohortConfig:
    """Size and content of the demo cohort (all sizes in level-0 pixels at ``mpp``)."""

    n_cases: int = 32
    slides_per_case: tuple[int, int] = (1, 2)
    positive_fraction: float = 0.5
    size: tuple[int, int] = (640, 832)
    mpp: float = 0.5
    tissue_fraction: float = 0.45
    hotspots: tuple[int, int] = (1, 2)
    hotspot_radius: tuple[int, int] = (56, 80)
    lesion_diameter: int = 64
    lesion_amplitude: int = 24
    lesion_site: str = "hotspot"  # "hotspot" or "tissue" (anywhere in tissue)
    tile: int = 128
    seed: int = 0

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> DemoCohortConfig:
        """Build from parsed YAML; lists become tuples, unknown keys are an error."""
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown demo cohort keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


@dataclass
class DemoSlide:
    """What :func:`render_demo_slide` drew; boxes are level-0 (x, y, w, h)."""

    image: np.ndarray
    tissue: np.ndarray
    hotspots: list[tuple[int, int, int]] = field(default_factory=list)  # (cx, cy, radius)
    lesion_box: tuple[int, int, int, int] | None = None


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1]: a coarse random grid resized bicubically."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    im = Image.fromarray(coarse, mode="F").resize((shape[1], shape[0]), Image.Resampling.BICUBIC)
    return np.asarray(im)


def _tissue_mask(rng: np.random.Generator, shape: tuple[int, int], fraction: float) -> np.ndarray:
    """An irregular blob: smooth noise biased towards the centre, thresholded at a quantile."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = h * rng.uniform(0.4, 0.6), w * rng.uniform(0.4, 0.6)
    radial = ((yy - cy) / (0.5 * h)) ** 2 + ((xx - cx) / (0.5 * w)) ** 2
    score = _smooth_field(rng, shape, 5) - 0.9 * radial
    return score > np.quantile(score, 1.0 - fraction)


def _mosaic(rng: np.random.Generator, source: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A randomly oriented, randomly offset mirrored mosaic of ``source`` of size ``shape``."""
    img = np.rot90(source, int(rng.integers(4)))
    if rng.random() < 0.5:
        img = img[:, ::-1]
    ih, iw = img.shape[:2]
    oy, ox = int(rng.integers(2 * ih)), int(rng.integers(2 * iw))

    def fold(start: int, n: int, size: int) -> np.ndarray:
        idx = (start + np.arange(n)) % (2 * size)
        return np.where(idx < size, idx, 2 * size - 1 - idx)

    return img[np.ix_(fold(oy, shape[0], ih), fold(ox, shape[1], iw))]


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.ogrid[0 : shape[0], 0 : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def lesion_perturbation(base: np.ndarray, where: np.ndarray, amplitude: int) -> np.ndarray:
    """Add the lesion's dot lattice to ``base`` (h, w, 3) uint8 where ``where`` (h, w) is set.

    Inside every aligned 2 x 2 block, the pixel nearest the centre of its 4 x 4 cell is darkened
    by ``3 d`` and the other three lightened by ``d`` (per channel, ``d`` capped so nothing
    clips): the block sum, hence every coarser pyramid level, is unchanged. ``where`` is applied
    per whole 2 x 2 block (a block is perturbed when its top-left pixel is set).
    """
    h, w = base.shape[0] // 2 * 2, base.shape[1] // 2 * 2
    out = base.copy()
    blocks = base[:h, :w].astype(np.int32).reshape(h // 2, 2, w // 2, 2, 3).transpose(0, 2, 1, 3, 4)
    # Dot position inside each block: the corner facing the centre of its 4 x 4 cell.
    by = np.arange(h // 2)[:, None] % 2  # 0: top half of the cell -> dot in the bottom row
    bx = np.arange(w // 2)[None, :] % 2
    dy, dx = 1 - by, 1 - bx  # (hb, 1), (1, wb)
    dy = np.broadcast_to(dy, (h // 2, w // 2))
    dx = np.broadcast_to(dx, (h // 2, w // 2))
    hb_i, wb_i = np.indices((h // 2, w // 2))
    dot = blocks[hb_i, wb_i, dy, dx]  # (hb, wb, 3)
    others_max = blocks.reshape(h // 2, w // 2, 4, 3).max(axis=2)
    wanted = np.rint(amplitude * _LESION_COLOUR).astype(np.int32)
    # Integer d keeps the block sum exactly zero; the caps keep every pixel inside [0, 255].
    d = np.minimum(np.minimum(wanted, dot // 3), 255 - others_max)
    d = np.maximum(d, 0) * where[:h:2, :w:2, None]
    pert = np.broadcast_to(d[:, :, None, None, :], blocks.shape).copy()
    pert[hb_i, wb_i, dy, dx] = -3 * d
    new = (blocks + pert).transpose(0, 2, 1, 3, 4).reshape(h, w, 3)
    out[:h, :w] = new.astype(np.uint8)
    return out


def render_demo_slide(
    rng: np.random.Generator,
    source: np.ndarray,
    cfg: DemoCohortConfig,
    positive: bool,
    lesion: bool | None = None,
) -> DemoSlide:
    """Draw one slide. ``lesion=False`` with the same rng state gives a positive slide's
    lesion-free twin (used to check that the lesion is invisible at low resolution)."""
    lesion = positive if lesion is None else lesion
    # Multiples of 32 keep every pyramid level an exact 2x reduction.
    h = int(rng.integers(cfg.size[0] // 32, cfg.size[1] // 32 + 1)) * 32
    w = int(rng.integers(cfg.size[0] // 32, cfg.size[1] // 32 + 1)) * 32
    tissue = _tissue_mask(rng, (h, w), cfg.tissue_fraction)
    texture = _mosaic(rng, source, (h, w)).astype(np.float32)
    glass = _BACKGROUND + rng.normal(0, 2.0, (h, w, 1)).astype(np.float32)
    image = np.where(tissue[..., None], texture, glass)

    # Hotspot centres come from the tissue's interior so the discs are mostly tissue.
    inner = np.argwhere(tissue)
    hotspots: list[tuple[int, int, int]] = []
    for _ in range(int(rng.integers(cfg.hotspots[0], cfg.hotspots[1] + 1))):
        r = int(rng.integers(cfg.hotspot_radius[0], cfg.hotspot_radius[1] + 1))
        far = inner[
            (inner[:, 0] > r) & (inner[:, 0] < h - r) & (inner[:, 1] > r) & (inner[:, 1] < w - r)
        ]
        cy, cx = far[int(rng.integers(len(far)))] if len(far) else inner[len(inner) // 2]
        hotspots.append((int(cx), int(cy), r))
        disc = _disc((h, w), cy, cx, r) & tissue
        image[disc] = (1 - _HOTSPOT_MIX) * image[disc] + _HOTSPOT_MIX * _HOTSPOT_TINT
    image8 = np.clip(np.rint(image), 0, 255).astype(np.uint8)

    # Always draw the lesion's position so a positive slide and its twin share the rng stream.
    half = cfg.lesion_diameter / 2
    if cfg.lesion_site == "hotspot":
        cx, cy, r = hotspots[int(rng.integers(len(hotspots)))]
        ang, rad = rng.uniform(0, 2 * math.pi), max(r - half, 0) * math.sqrt(rng.random())
        ly, lx = cy + rad * math.sin(ang), cx + rad * math.cos(ang)
    elif cfg.lesion_site == "tissue":
        ly, lx = (float(v) for v in inner[int(rng.integers(len(inner)))])
    else:
        raise ValueError(f"lesion_site must be 'hotspot' or 'tissue', got {cfg.lesion_site!r}")
    box = None
    if lesion:
        where = _disc((h, w), ly, lx, half) & tissue
        image8 = lesion_perturbation(image8, where, cfg.lesion_amplitude)
        ys, xs = np.nonzero(where)
        if len(ys):
            box = (
                int(xs.min()),
                int(ys.min()),
                int(xs.max() - xs.min() + 1),
                int(ys.max() - ys.min() + 1),
            )
    return DemoSlide(image=image8, tissue=tissue, hotspots=hotspots, lesion_box=box)


def _cohort_key(cfg: DemoCohortConfig) -> dict[str, Any]:
    return {"version": 1, **asdict(cfg)}


def make_demo_cohort(
    out_dir: str | PathLike[str],
    cfg: DemoCohortConfig | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Write the demo cohort under ``out_dir``; returns the manifest CSV's path.

    Layout: ``slides/<slide_id>.tif``, ``manifest.csv`` (``case_id, slide_id, label``: slides
    are found by ``slide_id`` in ``slides/``), ``lesions.csv`` (ground-truth lesion boxes) and
    ``cohort.json`` (the config). An existing cohort built from the same config is reused.
    """
    cfg = cfg or DemoCohortConfig()
    out = Path(out_dir)
    manifest = out / "manifest.csv"
    meta = out / "cohort.json"
    if not overwrite and manifest.exists() and meta.exists():
        if json.loads(meta.read_text()) == json.loads(json.dumps(_cohort_key(cfg))):
            return manifest
    # The manifest marks a complete cohort: drop an old one before any slide is rewritten, so a
    # run killed midway is rebuilt next time rather than reused half old, half new.
    manifest.unlink(missing_ok=True)
    slides_dir = out / "slides"
    slides_dir.mkdir(parents=True, exist_ok=True)
    source = tissue_image()
    rng = np.random.default_rng(cfg.seed)
    n_pos = round(cfg.n_cases * cfg.positive_fraction)
    # Label per case (a patient's slides share it) so case-grouped splits can stratify.
    case_labels = np.array([1] * n_pos + [0] * (cfg.n_cases - n_pos))
    rng.shuffle(case_labels)
    rows: list[str] = ["case_id,slide_id,label"]
    lesions: list[str] = ["slide_id,x,y,width,height"]
    for c, y in enumerate(case_labels):
        case_id = f"case-{c:03d}"
        n_slides = int(rng.integers(cfg.slides_per_case[0], cfg.slides_per_case[1] + 1))
        for s in range(n_slides):
            slide_id = f"{case_id}-s{s}"
            # One child seed per slide: a slide can be re-rendered alone (tests use its twin).
            slide_rng = np.random.default_rng([cfg.seed, c, s])
            slide = render_demo_slide(slide_rng, source, cfg, positive=bool(y))
            write_pyramidal_tiff(
                slides_dir / f"{slide_id}.tif", slide.image, cfg.mpp, tile=cfg.tile
            )
            rows.append(f"{case_id},{slide_id},{DEMO_CLASSES[y]}")
            if slide.lesion_box is not None:
                lesions.append(",".join(str(v) for v in (slide_id, *slide.lesion_box)))
    # Atomic (temp file + os.replace): other ranks and jobs read these files.
    atomic_write_text(out / "lesions.csv", "\n".join(lesions) + "\n")
    atomic_write_text(meta, json.dumps(_cohort_key(cfg), indent=1))
    # The manifest goes last: its presence marks a complete cohort.
    atomic_write_text(manifest, "\n".join(rows) + "\n")
    return manifest
