"""A realistic slide's plan: tissue outline, region types, stamp layers and tumour lesions.

The plan holds the slide's smooth fields at ``1 / PLAN`` of level 0 and the stamp lattices;
:mod:`ats_wsi.slides.realistic_render` computes level-0 pixels from it. Every random draw
comes from one generator seeded by the slide, in a fixed order (the cohort's bytes depend on it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ats_wsi.slides.realistic_config import CohortConfig
from ats_wsi.slides.realistic_sources import NORMAL_SOURCES, TUMOUR_SOURCES, Source

__all__ = ["PLAN", "Bank", "Layer", "Lesion", "SlidePlan", "plan_slide"]

PLAN = 16  # level-0 pixels per plan pixel (the plan holds the slide's smooth fields)


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
        a0, b0 = max(0, yy[i] // PLAN), max(0, xx[i] // PLAN)
        a1, b1 = min(ph, (yy[i] + stamp) // PLAN + 1), min(pw, (xx[i] + stamp) // PLAN + 1)
        needed[i] = a1 > a0 and b1 > b0 and bool((coverage[a0:a1, b0:b1] > 0).any())
    return Layer(
        source=source,
        y0=yy,
        x0=xx,
        entry=rng.integers(n_entries, size=n),
        gain=rng.normal(1.0, 0.02, (n, 3)).astype(np.float32),
        needed=needed,
    )



def _tissue_fields(
    rng: np.random.Generator, cfg: CohortConfig, ph: int, pw: int
) -> tuple[np.ndarray, np.ndarray]:
    """Plan-res signed distance to the tissue outline and the skin weight in [0, 1]."""
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
    return tissue_sd, skin


def _draw_lesion(rng: np.random.Generator, cfg: CohortConfig, depth: np.ndarray) -> Lesion:
    """One lesion placed where the tissue is deep enough (``depth``: level-0 px to glass)."""
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
    return Lesion(
        cx=(px + rng.random()) * PLAN,
        cy=(py + rng.random()) * PLAN,
        radius=radius,
        harmonics=harm,
        edge=float(np.clip(0.12 * radius, 6, 40)),
        source=src,
    )


def _lesion_layer(
    rng: np.random.Generator, lesion: Lesion, stamp: int, plan_shape: tuple[int, int]
) -> Layer:
    """The tumour stamps over the lesion's bounding box."""
    y0, x0, y1, x1 = lesion.bbox
    cover = np.zeros(plan_shape, np.float32)
    cover[max(0, y0 // PLAN) : y1 // PLAN + 1, max(0, x0 // PLAN) : x1 // PLAN + 1] = 1
    return _layer(rng, lesion.source, stamp, 24, (y0, x0, y1, x1), cover)


def plan_slide(
    cfg: CohortConfig, positive: bool, seed: Sequence[int], sources: dict[str, Source]
) -> SlidePlan:
    """Draw one slide's layout (outline, region types, stamps, lesions) from ``seed``."""
    from scipy import ndimage

    rng = np.random.default_rng(list(seed))
    t = cfg.tile
    height = int(rng.integers(cfg.size[0] // t, cfg.size[1] // t + 1)) * t
    width = int(rng.integers(cfg.size[0] // t, cfg.size[1] // t + 1)) * t
    ph, pw = height // PLAN, width // PLAN
    tissue_sd, skin = _tissue_fields(rng, cfg, ph, pw)
    inside = tissue_sd > 0

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
        depth = ndimage.distance_transform_edt(inside) * PLAN  # level-0 px to the glass
        for _ in range(
            int(rng.integers(cfg.lesions_per_positive[0], cfg.lesions_per_positive[1] + 1))
        ):
            lesion = _draw_lesion(rng, cfg, depth)
            lesions.append(lesion)
            src = lesion.source
            if src not in banks:
                banks[src] = _bank(rng, sources[src], 24, slide_gain)
            tumour_layers.append(_lesion_layer(rng, lesion, sources[src].stamp, (ph, pw)))
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
