"""Megapixel MNIST (ATS_SPEC 2.1), generated lazily and deterministically.

Item ``i`` is drawn from ``numpy.random.default_rng([seed, i])``: the dataset keeps the digit
pool, 50 small noise patterns and a few per-class index arrays, never a canvas, so 5000
1500 x 1500 images cost nothing until they are read.

Geometry follows the authors' generator: digits and 28 x 28 noise patterns are pasted (not
blended) into a black canvas, so whatever is pasted later covers what was there.
``noise_order="after"`` (the authors) lets noise cover digits; ``"before"`` (the IPS variant)
keeps digits intact. The low-resolution view is composed from each piece rescaled with
anti-aliasing and pasted at the scaled position, as in the authors' code, instead of
downsampling the full canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ats_wsi.datasets.mnist import DigitPool

__all__ = ["MegapixelMNIST", "Placement", "make_noise_patterns", "TARGETS"]

TARGETS = ("majority", "max", "top", "multi")
_DIGIT = 28  # side of an MNIST digit and of a noise pattern


@dataclass(frozen=True)
class Placement:
    """Sparse description of one image (all coordinates are top-left (y, x) in canvas pixels).

    Attributes:
        target: the majority class.
        digit_indices: (n_digits,) indices into the digit pool; the first ``n_target`` are
            of class ``target``.
        digit_labels: (n_digits,) their classes.
        digit_positions: (n_digits, 2).
        noise_patterns: (n_noise,) which of the fixed patterns.
        noise_positions: (n_noise, 2).
        noise_intensity: (n_noise,) multiplier in [0.8, 1.0].
    """

    target: int
    digit_indices: np.ndarray
    digit_labels: np.ndarray
    digit_positions: np.ndarray
    noise_patterns: np.ndarray
    noise_positions: np.ndarray
    noise_intensity: np.ndarray


def make_noise_patterns(n: int = 50, seed: int = 0, size: int = _DIGIT) -> np.ndarray:
    """``n`` float32 (size, size) binary scribbles: two line segments through a corner.

    Each segment starts at a corner chosen per segment and runs across the box at a random
    angle (like the authors' patterns: lines of slope ``tan(U(0, 0.4 pi))``).
    """
    rng = np.random.default_rng([seed, 0x5C1B])
    out = np.zeros((n, size, size), np.float32)
    last = size - 0.51
    t = np.linspace(0.0, 1.0, 2 * size)
    for k in range(n):
        for _ in range(2):
            slope = np.tan(rng.uniform(0.0, 0.4 * np.pi))
            # Run along the longer axis so the segment reaches the box border.
            length = min(last, last / slope)
            rows = np.round(t * length).astype(int)
            cols = np.round(t * length * slope).astype(int)
            if rng.random() < 0.5:
                rows, cols = cols, rows
            if rng.random() < 0.5:
                rows = size - 1 - rows
            if rng.random() < 0.5:
                cols = size - 1 - cols
            out[k, rows, cols] = 1.0
    return out


def _resize(img: np.ndarray, side: int) -> np.ndarray:
    """Anti-aliased bilinear resize of a float image (Pillow widens the filter when shrinking)."""
    from PIL import Image

    return np.asarray(Image.fromarray(img.astype(np.float32)).resize((side, side), Image.BILINEAR))


def _paste(canvas: np.ndarray, piece: np.ndarray, y: int, x: int) -> None:
    """Overwrite ``canvas[y:y+h, x:x+w]`` with ``piece``, clipped to the canvas."""
    h, w = piece.shape
    y0, x0 = max(y, 0), max(x, 0)
    y1, x1 = min(y + h, canvas.shape[0]), min(x + w, canvas.shape[1])
    if y1 > y0 and x1 > x0:
        canvas[y0:y1, x0:x1] = piece[y0 - y : y1 - y, x0 - x : x1 - x]


class MegapixelMNIST(Dataset):
    """Lazily generated Megapixel MNIST.

    Args:
        pool: digits to draw from (a disjoint pool per split).
        n_images: dataset length.
        canvas_size: full-resolution side (int) or (height, width).
        scale: low-res / full-res size ratio (0.12: 1500 -> 180).
        n_digits, n_target: digits per image and how many of them are of the target class.
        n_noise: noise placements per image, drawn from ``n_patterns`` fixed patterns.
        noise_order: ``"after"`` (authors: noise may cover digits) or ``"before"`` (IPS).
        seed: item ``i`` is generated from ``(seed, i)``; use different seeds per split.
        pattern_seed: seed of the fixed noise patterns (shared by all splits by default).
        target: which label ``__getitem__`` returns: ``majority`` (the paper), ``max``,
            ``top`` or ``multi`` (a float (10,) presence vector), the IPS variant's tasks.
        high_dtype: ``"float32"`` (values in [0, 1]) or ``"uint8"`` (0..255, a quarter of the
            bytes to move; convert on the device).
        views: ``"both"``, ``"low"`` or ``"high"``; a view not asked for is returned as an
            empty tensor and never rendered (a low-res baseline does not pay for canvases).
    """

    def __init__(
        self,
        pool: DigitPool,
        n_images: int,
        canvas_size: int | tuple[int, int] = 1500,
        scale: float = 0.12,
        n_digits: int = 5,
        n_target: int = 3,
        n_noise: int = 50,
        n_patterns: int = 50,
        noise_order: str = "after",
        seed: int = 0,
        pattern_seed: int = 0,
        target: str = "majority",
        high_dtype: str = "float32",
        views: str = "both",
    ) -> None:
        h, w = (canvas_size, canvas_size) if isinstance(canvas_size, int) else canvas_size
        if noise_order not in ("after", "before"):
            raise ValueError(f"noise_order must be 'after' or 'before', got {noise_order!r}")
        if target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
        if high_dtype not in ("float32", "uint8"):
            raise ValueError(f"high_dtype must be 'float32' or 'uint8', got {high_dtype!r}")
        if not 0 < n_target <= n_digits or 2 * n_target <= n_digits:
            # The target must be a strict majority for the label to be well defined.
            raise ValueError(f"n_target={n_target} is not a strict majority of {n_digits}")
        if min(h, w) < 2 * _DIGIT or not 0 < scale <= 1:
            raise ValueError(f"canvas {h}x{w} or scale {scale} out of range")
        if n_images < 0 or n_noise < 0 or n_patterns < 1:
            raise ValueError("n_images and n_noise must be >= 0, n_patterns >= 1")
        self.pool = pool
        self.n_images = int(n_images)
        self.canvas_size = (int(h), int(w))
        self.scale = float(scale)
        self.low_size = (int(h * scale), int(w * scale))
        self.n_digits, self.n_target = int(n_digits), int(n_target)
        self.n_noise = int(n_noise)
        self.noise_order = noise_order
        self.seed, self.pattern_seed = int(seed), int(pattern_seed)
        self.target = target
        self.high_dtype = high_dtype
        if views not in ("both", "low", "high"):
            raise ValueError(f"views must be 'both', 'low' or 'high', got {views!r}")
        self.views = views
        self.patterns = make_noise_patterns(n_patterns, pattern_seed)
        self._low_side = max(1, round(_DIGIT * scale))
        self._low_patterns = np.stack([_resize(p, self._low_side) for p in self.patterns])
        labels = pool.labels
        self._by_class = [np.flatnonzero(labels == c) for c in range(10)]
        self._not_class = [np.flatnonzero(labels != c) for c in range(10)]
        self._classes = np.array([c for c in range(10) if len(self._by_class[c])])
        if len(self._classes) < 2:
            raise ValueError("the digit pool needs at least two classes")

    def __len__(self) -> int:
        return self.n_images

    @property
    def source(self) -> str:
        """Provenance string recorded with results."""
        return (
            f"megapixel-mnist(canvas={self.canvas_size}, scale={self.scale}, "
            f"noise={self.n_noise}, noise_order={self.noise_order}, seed={self.seed}; "
            f"digits={self.pool.source})"
        )

    def placement(self, i: int) -> Placement:
        """The sparse layout of item ``i`` (deterministic in ``(seed, i)``)."""
        if not 0 <= i < self.n_images:
            raise IndexError(f"item {i} outside [0, {self.n_images})")
        rng = np.random.default_rng([self.seed, i])
        target = int(rng.choice(self._classes))
        pos = rng.choice(self._by_class[target], self.n_target)
        neg = rng.choice(self._not_class[target], self.n_digits - self.n_target)
        idx = np.concatenate([pos, neg])
        h, w = self.canvas_size
        boxes = self._place_digits(rng)
        noise_pos = rng.integers(0, [h - _DIGIT + 1, w - _DIGIT + 1], size=(self.n_noise, 2))
        noise_pat = rng.integers(0, len(self.patterns), size=self.n_noise)
        noise_int = rng.uniform(0.8, 1.0, size=self.n_noise)
        return Placement(
            target=target,
            digit_indices=idx,
            digit_labels=self.pool.labels[idx],
            digit_positions=boxes,
            noise_patterns=noise_pat,
            noise_positions=noise_pos,
            noise_intensity=noise_int,
        )

    def _place_digits(self, rng: np.random.Generator) -> np.ndarray:
        """Non-overlapping digit boxes by rejection sampling.

        A sequential layout can jam (earlier boxes leave no room), so after too many
        rejections the whole layout is redrawn; only a canvas where that keeps failing raises.
        """
        h, w = self.canvas_size
        high = [h - _DIGIT + 1, w - _DIGIT + 1]
        for _restart in range(100):
            boxes: list[np.ndarray] = []
            for _attempt in range(100 * self.n_digits):
                p = rng.integers(0, high)
                if all(np.any(np.abs(p - q) >= _DIGIT) for q in boxes):
                    boxes.append(p)
                    if len(boxes) == self.n_digits:
                        return np.stack(boxes)
        raise RuntimeError(f"cannot place {self.n_digits} digits on a {h}x{w} canvas")

    def labels(self, i: int, p: Placement | None = None) -> dict[str, Any]:
        """All labels of item ``i``: majority, max (largest digit), top (top-most digit, ties
        to the left) and multi (int (10,) presence vector)."""
        p = self.placement(i) if p is None else p
        order = np.lexsort((p.digit_positions[:, 1], p.digit_positions[:, 0]))
        multi = np.zeros(10, np.int64)
        multi[p.digit_labels] = 1
        return {
            "majority": p.target,
            "max": int(p.digit_labels.max()),
            "top": int(p.digit_labels[order[0]]),
            "multi": multi,
        }

    def _pieces(self, p: Placement, low: bool) -> list[tuple[np.ndarray, int, int]]:
        digits = []
        for idx, (y, x) in zip(p.digit_indices, p.digit_positions, strict=True):
            img = self.pool.images[idx].astype(np.float32) / 255.0
            digits.append((_resize(img, self._low_side) if low else img, y, x))
        noise = []
        bank = self._low_patterns if low else self.patterns
        for k, (y, x), a in zip(
            p.noise_patterns, p.noise_positions, p.noise_intensity, strict=True
        ):
            noise.append((bank[k] * np.float32(a), y, x))
        return digits + noise if self.noise_order == "after" else noise + digits

    def render_high(self, i: int, p: Placement | None = None) -> np.ndarray:
        """Full-resolution float32 canvas of item ``i``, values in [0, 1]."""
        p = self.placement(i) if p is None else p
        high = np.zeros(self.canvas_size, np.float32)
        for piece, y, x in self._pieces(p, low=False):
            _paste(high, piece, int(y), int(x))
        return high

    def render_high_uint8(self, i: int, p: Placement | None = None) -> np.ndarray:
        """:meth:`render_high` quantised to 0..255, built in uint8 without a float canvas
        (a quarter of the memory traffic: this is the data loader's hot loop)."""
        p = self.placement(i) if p is None else p
        high = np.zeros(self.canvas_size, np.uint8)
        digits = [
            (self.pool.images[k], y, x)
            for k, (y, x) in zip(p.digit_indices, p.digit_positions, strict=True)
        ]
        noise = [
            (np.round(self.patterns[k] * (255.0 * a)).astype(np.uint8), y, x)
            for k, (y, x), a in zip(
                p.noise_patterns, p.noise_positions, p.noise_intensity, strict=True
            )
        ]
        for piece, y, x in digits + noise if self.noise_order == "after" else noise + digits:
            _paste(high, piece, int(y), int(x))
        return high

    def render_low(self, i: int, p: Placement | None = None) -> np.ndarray:
        """Low-resolution float32 view of item ``i``, composed from rescaled pieces."""
        p = self.placement(i) if p is None else p
        low = np.zeros(self.low_size, np.float32)
        for piece, y, x in self._pieces(p, low=True):
            _paste(low, piece, int(y * self.scale), int(x * self.scale))
        return np.clip(low, 0.0, 1.0, out=low)  # bilinear resampling can overshoot slightly

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``(x_low (1, h, w) float, x_high (1, H, W) float in [0, 1] (or uint8), label)``."""
        i = int(i)
        p = self.placement(i)
        empty = torch.zeros(0)
        x_low = empty
        if self.views != "high":
            x_low = torch.from_numpy(self.render_low(i, p))[None]
        x_high = empty
        if self.views != "low":
            if self.high_dtype == "uint8":
                high = self.render_high_uint8(i, p)
            else:
                high = self.render_high(i, p)
            x_high = torch.from_numpy(high)[None]
        y = self.labels(i, p)[self.target]
        if self.target == "multi":
            y = torch.from_numpy(y.astype(np.float32))
        return x_low, x_high, y
