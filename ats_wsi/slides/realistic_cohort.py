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
OpenSlide reads) at 0.5 um/px, written strip by strip through
:func:`~ats_wsi.io.synthetic.write_pyramidal_tiff`: no level is ever held whole in memory.
A cohort is cached under ``<cache_dir>/realistic-v<version>-<hash of the config>``; each slide
is written atomically, so an interrupted build resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.io.synthetic import write_pyramidal_tiff

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
    "save_thumbnail",
    "tile_lesion_fraction",
    "write_slide",
]

GENERATOR_VERSION = 1
CLASSES = ("normal", "tumor")
NORMAL_SOURCES = ("cmu_skin", "kather_stroma")
TUMOUR_SOURCES = ("tcga_carcinoma", "tia_carcinoma", "kather_epithelium")
_PLAN = 16  # level-0 pixels per plan pixel (the plan holds the slide's smooth fields)
_STRIP = 256  # rows rendered at once (the TIFF tile side)


def default_source_dir() -> Path:
    """``$ATS_WSI_SLIDE_DATA``, else ``<repo>/../shared/data/slides``."""
    env = os.environ.get("ATS_WSI_SLIDE_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data" / "slides"


@dataclass(frozen=True)
class CohortConfig:
    """What the cohort holds (sizes in level-0 pixels at ``mpp``; lesion sizes in microns).

    Attributes:
        n_cases: patients; each has ``slides_per_case`` slides sharing its label.
        positive_fraction: fraction of positive patients (rounded).
        size: (min, max) side of a slide, rounded down to a multiple of ``tile``.
        tissue_fraction: (min, max) fraction of the slide covered by tissue.
        lesion_diameter_um: (min, max) of the log-uniform lesion diameter.
        lesions_per_positive: (min, max) lesions on a positive slide.
        skin_fraction: share of the tissue drawn from the skin image (the rest is stroma).
        attention_mpp: resolution quoted in the outlines' properties (lesion size in view px).
        compression: TIFF tile compression (``jpeg`` like scanners, or ``zlib``).
        workers: slides generated in parallel (processes).
    """

    n_cases: int = 36
    slides_per_case: tuple[int, int] = (1, 2)
    positive_fraction: float = 0.4
    size: tuple[int, int] = (8192, 9216)
    mpp: float = 0.5
    tissue_fraction: tuple[float, float] = (0.2, 0.35)
    lesion_diameter_um: tuple[float, float] = (60.0, 1000.0)
    lesions_per_positive: tuple[int, int] = (1, 3)
    skin_fraction: float = 0.65
    attention_mpp: float = 16.0
    tile: int = 256
    compression: str = "jpeg"
    seed: int = 0
    workers: int = 1

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> CohortConfig:
        """Build from parsed YAML; lists become tuples, unknown keys are an error."""
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown cohort keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})

    def key(self) -> dict[str, Any]:
        """What the cache is keyed by (``workers`` does not change the output)."""
        d = asdict(self)
        d.pop("workers")
        return {"version": GENERATOR_VERSION, **d}


# ----------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    """A real H&E image at ~0.5 um/px and the crop centres allowed in it."""

    name: str
    image: np.ndarray  # (h, w, 3) uint8
    stamp: int  # stamp side in pixels
    valid: np.ndarray  # (k, 2) allowed crop centres (y, x)


def _read_rgb(path: Path) -> np.ndarray:
    import tifffile
    from PIL import Image

    if path.suffix.lower() in (".tif", ".tiff", ".svs"):
        arr = tifffile.imread(path, key=0)
    else:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
    return np.ascontiguousarray(arr[..., :3])


def _tiatoolbox_target() -> Path:
    import importlib.util

    # find_spec locates the package without importing it (importing tiatoolbox is slow).
    spec = importlib.util.find_spec("tiatoolbox")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("tiatoolbox is not installed; its data/target_image.png is needed")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "target_image.png"


def _valid_centres(tissue: np.ndarray, half: int, min_fraction: float) -> np.ndarray:
    """Centres of ``2 half`` squares holding at least ``min_fraction`` tissue."""
    import cv2

    frac = cv2.boxFilter(tissue.astype(np.float32), -1, (2 * half + 1, 2 * half + 1))
    ok = frac >= min_fraction
    ok[:half] = ok[-half:] = False
    ok[:, :half] = ok[:, -half:] = False
    centres = np.argwhere(ok)
    if not len(centres):
        raise ValueError("no crop of the source is tissue enough")
    return centres[:: max(1, len(centres) // 20000)]


@lru_cache(maxsize=2)
def _load_sources_cached(source_dir: str) -> dict[str, Source]:
    import cv2

    d = Path(source_dir)
    out: dict[str, Source] = {}

    def add(name: str, image: np.ndarray, stamp: int, min_fraction: float) -> None:
        # Glass is bright and unsaturated; tissue is not (a fixed threshold suffices here).
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        tissue = (hsv[..., 1] > 25) & (hsv[..., 2] < 240)
        # Centres where a crop rotated by any angle (side stamp * sqrt 2) stays inside.
        half = min(int(math.ceil(stamp / math.sqrt(2))) + 1, min(image.shape[:2]) // 2 - 1)
        step = max(1, min(image.shape[:2]) // 500)
        small = tissue[::step, ::step]
        centres = _valid_centres(small, max(1, half // step), min_fraction) * step
        out[name] = Source(name, image, stamp, centres)

    cmu = _read_rgb(d / "CMU-1-Small-Region.svs")
    add("cmu_skin", cmu, 320, 0.8)
    add("kather_stroma", _read_rgb(d / "kather-tile-1.tif"), 150, 0.0)
    add("tcga_carcinoma", _read_rgb(d / "TCGA-HE-7130-01Z-00-DX1-thumbnail.png"), 320, 0.0)
    target = _read_rgb(_tiatoolbox_target())
    # Nuclei in the target image are about twice their size in the 0.5 um/px images.
    target = cv2.resize(target, (target.shape[1] // 2, target.shape[0] // 2), cv2.INTER_AREA)
    add("tia_carcinoma", target, 240, 0.7)
    add("kather_epithelium", _read_rgb(d / "kather-tile-2.tif"), 150, 0.0)
    return out


def load_sources(source_dir: str | PathLike[str] | None = None) -> dict[str, Source]:
    """The real images the cohort is quilted from, keyed by source name (cached per process)."""
    d = Path(source_dir) if source_dir is not None else default_source_dir()
    if not d.is_dir():
        raise FileNotFoundError(f"slide sources not found: {d} (set ATS_WSI_SLIDE_DATA)")
    return _load_sources_cached(str(d.resolve()))


# ----------------------------------------------------------------------------- plan


@dataclass
class Bank:
    """Rotated, jittered crops of one source and their blending weights."""

    stamps: np.ndarray  # (k, s, s, 3) float32
    weights: np.ndarray  # (k, s, s) float32, > 0


@dataclass
class Layer:
    """Stamps of one source placed on a jittered lattice (level-0 top-left corners)."""

    source: str
    y0: np.ndarray
    x0: np.ndarray
    entry: np.ndarray  # bank index
    gain: np.ndarray  # (n, 3) colour jitter
    needed: np.ndarray  # bool: footprint touches the pixels this layer draws


@dataclass
class Lesion:
    """A tumour blob: centre (level 0), Fourier radius, soft border width, tumour source."""

    cx: float
    cy: float
    radius: float
    harmonics: np.ndarray  # (k, 3): order, amplitude, phase
    edge: float
    source: str

    def radius_at(self, theta: np.ndarray) -> np.ndarray:
        """Radius (level-0 px) in direction ``theta`` (the 50 % contour of the blend)."""
        r = np.ones_like(theta)
        for k, a, phi in self.harmonics:
            r = r + a * np.cos(k * theta + phi)
        return self.radius * r

    def polygon(self, n: int = 256) -> list[tuple[float, float]]:
        """The outline as (x, y) level-0 vertices."""
        t = np.linspace(0, 2 * math.pi, n, endpoint=False)
        r = self.radius_at(t)
        return list(zip(self.cx + r * np.cos(t), self.cy + r * np.sin(t), strict=True))

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1) holding every pixel the lesion touches."""
        extent = self.radius * (1 + float(np.abs(self.harmonics[:, 1]).sum())) + 2 * self.edge
        return (
            int(self.cy - extent),
            int(self.cx - extent),
            int(math.ceil(self.cy + extent)),
            int(math.ceil(self.cx + extent)),
        )


@dataclass
class SlidePlan:
    """Everything a slide's pixels are computed from (small: no level-0 array)."""

    height: int
    width: int
    mpp: float
    tissue_sd: np.ndarray  # plan-res signed distance to the tissue outline (plan px)
    skin: np.ndarray  # plan-res weight of the skin layer in [0, 1]
    glass: np.ndarray  # (3,) background colour
    layers: list[Layer]
    banks: dict[str, Bank]
    lesions: list[Lesion] = field(default_factory=list)
    tumour_layers: list[Layer] = field(default_factory=list)
    seed: tuple[int, ...] = (0,)

    @property
    def tissue_fraction(self) -> float:
        """Fraction of the slide inside the tissue outline."""
        return float((self.tissue_sd > 0).mean())


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: float) -> np.ndarray:
    """Zero-mean, unit-std smooth noise with features about ``shape / cells`` wide."""
    import cv2

    gh = max(2, int(round(shape[0] / max(shape) * cells)) + 2)
    gw = max(2, int(round(shape[1] / max(shape) * cells)) + 2)
    coarse = rng.standard_normal((gh, gw)).astype(np.float32)
    f = cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)
    return (f - f.mean()) / (f.std() + 1e-6)


def _bank(rng: np.random.Generator, src: Source, n: int, gain: np.ndarray) -> Bank:
    """``n`` crops of ``src`` rotated by random angles, with noise-perturbed bump weights."""
    import cv2

    s = src.stamp
    big = int(math.ceil(s * math.sqrt(2))) + 4
    stamps = np.empty((n, s, s, 3), np.float32)
    weights = np.empty((n, s, s), np.float32)
    u = (np.arange(s, dtype=np.float32) + 0.5) / s
    bump = np.sin(np.pi * u)[:, None] * np.sin(np.pi * u)[None, :]
    for i in range(n):
        cy, cx = src.valid[int(rng.integers(len(src.valid)))]
        y0, x0 = int(cy) - big // 2, int(cx) - big // 2
        crop = _reflect_crop(src.image, y0, x0, big)
        rot = cv2.getRotationMatrix2D((big / 2, big / 2), float(rng.uniform(0, 360)), 1.0)
        turned = cv2.warpAffine(
            crop, rot, (big, big), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT
        )
        o = (big - s) // 2
        st = turned[o : o + s, o : o + s]
        if rng.random() < 0.5:
            st = st[:, ::-1]
        jitter = gain * rng.normal(1.0, 0.025, 3)
        stamps[i] = np.clip(st.astype(np.float32) * jitter, 0, 255)
        # Raising the bump to a power narrows the blend zones; the noise makes seams wander.
        weights[i] = bump**3 * np.exp(1.5 * _smooth_noise(rng, (s, s), 3)) + 1e-6
    return Bank(stamps, weights)


def _reflect_crop(image: np.ndarray, y0: int, x0: int, size: int) -> np.ndarray:
    h, w = image.shape[:2]

    def fold(start: int, n: int, m: int) -> np.ndarray:
        idx = (start + np.arange(n)) % (2 * m)
        return np.where(idx < m, idx, 2 * m - 1 - idx)

    return np.ascontiguousarray(image[np.ix_(fold(y0, size, h), fold(x0, size, w))])


def _layer(
    rng: np.random.Generator,
    source: str,
    stamp: int,
    n_entries: int,
    region: tuple[int, int, int, int],
    coverage: np.ndarray,
) -> Layer:
    """Stamps on a jittered lattice over ``region`` (y0, x0, y1, x1); ``coverage`` is the
    plan-res weight of this layer (stamps over zero weight are marked not needed)."""
    step = int(stamp * 0.55)
    ry0, rx0, ry1, rx1 = region
    ys = np.arange(ry0 - stamp // 2, ry1, step)
    xs = np.arange(rx0 - stamp // 2, rx1, step)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    yy = (yy + rng.integers(-step // 4, step // 4 + 1, yy.shape)).ravel()
    xx = (xx + rng.integers(-step // 4, step // 4 + 1, xx.shape)).ravel()
    n = len(yy)
    ph, pw = coverage.shape
    needed = np.zeros(n, bool)
    for i in range(n):
        a0, b0 = max(0, yy[i] // _PLAN), max(0, xx[i] // _PLAN)
        a1, b1 = min(ph, (yy[i] + stamp) // _PLAN + 1), min(pw, (xx[i] + stamp) // _PLAN + 1)
        needed[i] = a1 > a0 and b1 > b0 and bool((coverage[a0:a1, b0:b1] > 0).any())
    return Layer(
        source=source,
        y0=yy,
        x0=xx,
        entry=rng.integers(n_entries, size=n),
        gain=rng.normal(1.0, 0.02, (n, 3)).astype(np.float32),
        needed=needed,
    )


def plan_slide(
    cfg: CohortConfig, positive: bool, seed: Sequence[int], sources: dict[str, Source]
) -> SlidePlan:
    """Draw one slide's layout (outline, region types, stamps, lesions) from ``seed``."""
    from scipy import ndimage

    rng = np.random.default_rng(list(seed))
    t = cfg.tile
    height = int(rng.integers(cfg.size[0] // t, cfg.size[1] // t + 1)) * t
    width = int(rng.integers(cfg.size[0] // t, cfg.size[1] // t + 1)) * t
    ph, pw = height // _PLAN, width // _PLAN

    # Tissue: smooth noise at three scales minus a radial falloff, cut at the quantile that
    # gives the drawn tissue fraction (tears and fragments come out of the noise).
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    cy, cx = ph * rng.uniform(0.4, 0.6), pw * rng.uniform(0.4, 0.6)
    radial = ((yy - cy) / (0.55 * ph)) ** 2 + ((xx - cx) / (0.55 * pw)) ** 2
    score = (
        _smooth_noise(rng, (ph, pw), 3)
        + 0.45 * _smooth_noise(rng, (ph, pw), 10)
        + 0.12 * _smooth_noise(rng, (ph, pw), 40)
        - 2.2 * radial
    )
    fraction = float(rng.uniform(*cfg.tissue_fraction))
    thr = float(np.quantile(score, 1.0 - fraction))
    gy, gx = np.gradient(score)
    # First-order signed distance to the outline (plan px): smooth, so the outline is too.
    sd = (score - thr) / np.maximum(np.hypot(gy, gx), 1e-3)
    tissue_sd = np.clip(sd, -4, 4).astype(np.float32)
    inside = tissue_sd > 0
    skin_field = _smooth_noise(rng, (ph, pw), 4)
    skin_thr = float(np.quantile(skin_field[inside], 1.0 - cfg.skin_fraction))
    skin = np.clip((skin_field - skin_thr) / 0.3 + 0.5, 0, 1).astype(np.float32)

    slide_gain = rng.normal(1.0, 0.04, 3)
    glass = np.clip(rng.uniform(236, 246) + rng.normal(0, 1.5, 3), 0, 255).astype(np.float32)
    banks = {name: _bank(rng, sources[name], 40, slide_gain) for name in NORMAL_SOURCES}
    full = (0, 0, height, width)
    near = ndimage.binary_dilation(inside, iterations=2)
    layers = [
        _layer(rng, "cmu_skin", sources["cmu_skin"].stamp, 40, full, near * (skin > 0)),
        _layer(rng, "kather_stroma", sources["kather_stroma"].stamp, 40, full, near * (skin < 1)),
    ]

    lesions: list[Lesion] = []
    tumour_layers: list[Layer] = []
    if positive:
        depth = ndimage.distance_transform_edt(inside) * _PLAN  # level-0 px to the glass
        for _ in range(
            int(rng.integers(cfg.lesions_per_positive[0], cfg.lesions_per_positive[1] + 1))
        ):
            lo, hi = np.log(cfg.lesion_diameter_um[0]), np.log(cfg.lesion_diameter_um[1])
            radius = float(np.exp(rng.uniform(lo, hi))) / cfg.mpp / 2
            n_h = int(rng.integers(3, 7))
            orders = rng.choice(np.arange(2, 9), n_h, replace=False).astype(np.float64)
            amps = rng.uniform(0, 0.35, n_h) / np.sqrt(orders)
            amps *= min(1.0, 0.55 / amps.sum())  # keeps the radius positive
            harm = np.stack([orders, amps, rng.uniform(0, 2 * math.pi, n_h)], 1)
            extent = radius * (1 + amps.sum())
            # Centre deep enough in the tissue for the whole lesion (else the deepest point).
            ok = np.argwhere(depth >= extent + 64)
            if not len(ok):
                ok = np.argwhere(depth >= depth.max() * 0.9)
                radius = min(radius, float(depth.max()) / (1 + amps.sum()) * 0.8)
            py, px = ok[int(rng.integers(len(ok)))]
            src = str(rng.choice(TUMOUR_SOURCES, p=[0.4, 0.4, 0.2]))
            lesion = Lesion(
                cx=(px + rng.random()) * _PLAN,
                cy=(py + rng.random()) * _PLAN,
                radius=radius,
                harmonics=harm,
                edge=float(np.clip(0.12 * radius, 6, 40)),
                source=src,
            )
            lesions.append(lesion)
            if src not in banks:
                banks[src] = _bank(rng, sources[src], 24, slide_gain)
            y0, x0, y1, x1 = lesion.bbox
            cover = np.zeros((ph, pw), np.float32)
            cover[max(0, y0 // _PLAN) : y1 // _PLAN + 1, max(0, x0 // _PLAN) : x1 // _PLAN + 1] = 1
            tumour_layers.append(_layer(rng, src, sources[src].stamp, 24, (y0, x0, y1, x1), cover))
    return SlidePlan(
        height=height,
        width=width,
        mpp=cfg.mpp,
        tissue_sd=tissue_sd,
        skin=skin,
        glass=glass,
        layers=layers,
        banks=banks,
        lesions=lesions,
        tumour_layers=tumour_layers,
        seed=tuple(int(s) for s in seed),
    )


# ----------------------------------------------------------------------------- render


def _upsample(plan_field: np.ndarray, y0: int, h: int, width: int) -> np.ndarray:
    """Bilinear level-0 values of a plan-res field for rows ``y0 .. y0 + h`` (pixel centres)."""
    import cv2

    r0 = y0 // _PLAN - 1
    r1 = (y0 + h) // _PLAN + 2
    pad_top = max(0, -r0)
    rows = plan_field[max(0, r0) : min(plan_field.shape[0], r1)]
    if pad_top or r1 > plan_field.shape[0]:
        rows = np.pad(rows, ((pad_top, max(0, r1 - plan_field.shape[0])), (0, 0)), mode="edge")
    big = cv2.resize(rows, (width, rows.shape[0] * _PLAN), interpolation=cv2.INTER_LINEAR)
    off = y0 - r0 * _PLAN
    return big[off : off + h]


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


def render_region(plan: SlidePlan, y0: int, h: int) -> np.ndarray:
    """Level-0 RGB uint8 rows ``y0 .. y0 + h`` of the slide (full width)."""
    w = plan.width
    alpha = np.clip(_upsample(plan.tissue_sd, y0, h, w) * (_PLAN / 6.0) + 0.5, 0, 1)
    skin = _upsample(plan.skin, y0, h, w)
    normal = np.zeros((h, w, 3), np.float32)
    for layer, lw in zip(plan.layers, (skin, 1 - skin), strict=True):
        acc, wsum = _quilt(layer, plan.banks[layer.source], y0, h, 0, w)
        # Where no stamp reaches, acc is 0 too, so the floor on wsum only avoids 0 / 0.
        acc *= (lw / np.maximum(wsum, 1e-12))[..., None]
        normal += acc
    for lesion, layer in zip(plan.lesions, plan.tumour_layers, strict=True):
        ly0, lx0, ly1, lx1 = lesion.bbox
        a0, a1 = max(ly0, y0), min(ly1, y0 + h)
        b0, b1 = max(lx0, 0), min(lx1, w)
        if a1 <= a0 or b1 <= b0:
            continue
        acc, wsum = _quilt(layer, plan.banks[layer.source], a0, a1 - a0, b0, b1 - b0)
        la = _lesion_alpha(lesion, a0, a1 - a0, b0, b1 - b0)[..., None]
        tumour = acc / np.maximum(wsum, 1e-12)[..., None]
        win = normal[a0 - y0 : a1 - y0, b0:b1]
        win[:] = la * tumour + (1 - la) * win
    rng = np.random.default_rng([*plan.seed, y0])
    glass = plan.glass + 1.2 * rng.standard_normal((h, w, 1), dtype=np.float32)
    a = alpha[..., None]
    normal -= glass
    normal *= a
    normal += glass
    np.rint(normal, out=normal)
    return np.clip(normal, 0, 255).astype(np.uint8)


def write_slide(plan: SlidePlan, path: str | PathLike[str], cfg: CohortConfig) -> Path:
    """Write the plan as a pyramidal TIFF strip by strip (one strip of rows in memory)."""
    cache: dict[int, np.ndarray] = {}

    def tile(y: int, x: int, h: int, w: int) -> np.ndarray:
        top = y - y % _STRIP
        if top not in cache:
            cache.clear()
            cache[top] = render_region(plan, top, min(_STRIP, plan.height - top))
        return cache[top][y - top : y - top + h, x : x + w]

    return write_pyramidal_tiff(
        path,
        tile,
        cfg.mpp,
        shape=(plan.height, plan.width),
        tile=cfg.tile,
        compression=cfg.compression,
    )


# ----------------------------------------------------------------------------- outlines


def _geojson(plan: SlidePlan, cfg: CohortConfig) -> dict[str, Any]:
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


# ----------------------------------------------------------------------------- cohort


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
    geo.write_text(json.dumps(_geojson(plan, cfg)))
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
