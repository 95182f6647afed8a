"""Speed limits (ATS_SPEC 2.2): the Swedish Traffic Signs loader and an offline stand-in.

Real data: ``<root>/Set1`` (train) and ``<root>/Set2`` (test), each with ``annotations.txt``
and the 1280 x 960 images it names. Each annotation line is
``<file>:<sign>;<sign>;...`` with signs ``VISIBILITY, x_max, y_max, x_min, y_min, TYPE, NAME``.
Labelling (the authors' rules): no signs -> EMPTY; otherwise keep the 50/70/80 signs (none
left: drop the image), sort by visibility (VISIBLE, BLURRED, SIDE_ROAD, OCCLUDED) then by
larger area; the first must be VISIBLE (else drop) and gives the label. Entries starting with
``MISC_SIGNS`` are skipped before that, so an image with only such entries is EMPTY, as in
the authors' code.

Stand-in: :class:`SpeedLimitsStandIn` draws 1280 x 960 street-like scenes with clutter and
distractor signs, and (for classes 50/70/80) one small red-ringed sign with the number in thin
strokes: 18-30 px wide at full resolution, 5-9 px at the 0.3 low-res view, where the 1 px
strokes (0.3 px there) blur together. Item ``i`` is drawn from ``(seed, i)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "CLASSES",
    "STSFormatError",
    "Sign",
    "SpeedLimits",
    "SpeedLimitsStandIn",
    "label_for",
    "load_speed_limits",
    "parse_annotations",
]

CLASSES = ("EMPTY", "50_SIGN", "70_SIGN", "80_SIGN")
LIMITS = CLASSES[1:]
VISIBILITIES = ("VISIBLE", "BLURRED", "SIDE_ROAD", "OCCLUDED")
IMAGE_SIZE = (960, 1280)  # (height, width)


class STSFormatError(ValueError):
    """A malformed annotation line; the message names the file and the line number."""


@dataclass(frozen=True)
class Sign:
    """One annotated sign (pixel coordinates of the full image)."""

    visibility: str
    x_max: float
    y_max: float
    x_min: float
    y_min: float
    type: str
    name: str

    @property
    def area(self) -> float:
        return (self.x_max - self.x_min) * (self.y_max - self.y_min)


def _tolerant_float(text: str) -> float:
    """Parse a float, dropping trailing junk (the STS files contain values like ``"12.0l"``)."""
    t = text.strip()
    while t:
        try:
            return float(t)
        except ValueError:
            t = t[:-1]
    raise ValueError(f"not a number: {text!r}")


def parse_annotations(path: str | Path) -> list[tuple[str, list[Sign]]]:
    """``(file name, signs)`` per non-blank line of an STS ``annotations.txt``.

    Raises:
        STSFormatError: a line without ``:``, a sign without 7 fields, an unknown visibility
            or a coordinate that is not a number (message: ``path:line: ...``).
    """
    path = Path(path)
    out: list[tuple[str, list[Sign]]] = []
    for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        where = f"{path}:{lineno}"
        if ":" not in line:
            raise STSFormatError(f"{where}: expected '<file>:<signs>', got {line[:80]!r}")
        name, rest = line.split(":", 1)
        name = name.strip()
        if not name:
            raise STSFormatError(f"{where}: empty file name")
        signs = []
        for entry in rest.split(";"):
            entry = entry.strip()
            if not entry or entry.startswith("MISC_SIGNS"):
                continue
            parts = [p.strip() for p in entry.split(",")]
            if len(parts) != 7:
                raise STSFormatError(
                    f"{where}: a sign needs 7 comma-separated fields "
                    f"(VISIBILITY, x_max, y_max, x_min, y_min, TYPE, NAME), got {entry!r}"
                )
            if parts[0] not in VISIBILITIES:
                raise STSFormatError(f"{where}: unknown visibility {parts[0]!r}")
            try:
                coords = [_tolerant_float(p) for p in parts[1:5]]
            except ValueError as exc:
                raise STSFormatError(f"{where}: {exc}") from None
            signs.append(Sign(parts[0], *coords, parts[5], parts[6]))
        out.append((name, signs))
    return out


def label_for(signs: list[Sign]) -> int | None:
    """Class index of an image from its signs, or None when the image is dropped."""
    if not signs:
        return 0
    limits = [s for s in signs if s.name in LIMITS]
    if not limits:
        return None
    # Stable sort: among equal (visibility, area) the annotation order decides, as in the
    # authors' sorted().
    limits.sort(key=lambda s: (VISIBILITIES.index(s.visibility), -s.area))
    if limits[0].visibility != "VISIBLE":
        return None
    return CLASSES.index(limits[0].name)


def load_speed_limits(root: str | Path, split: str = "train") -> list[tuple[Path, int]]:
    """``(image path, label)`` of the speed-limits subset of STS ``Set1`` (train) or ``Set2``.

    Raises:
        FileNotFoundError: no annotations file, or an image it keeps is missing.
        STSFormatError: a malformed annotation line.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = Path(root) / ("Set1" if split == "train" else "Set2")
    ann = folder / "annotations.txt"
    if not ann.is_file():
        raise FileNotFoundError(f"no STS annotations at {ann}")
    items = []
    for name, signs in parse_annotations(ann):
        label = label_for(signs)
        if label is None:
            continue
        img = folder / name
        if not img.is_file():
            raise FileNotFoundError(f"{ann}: image {name} not found in {folder}")
        items.append((img, label))
    return items


class SpeedLimits(Dataset):
    """The real speed-limits images: ``(x_high uint8 (3, 960, 1280), label)``."""

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root)
        self.split = split
        self.items = load_speed_limits(root, split)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.items]

    @property
    def source(self) -> str:
        return f"sts:{self.root.resolve()}/{'Set1' if self.split == 'train' else 'Set2'}"

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"))
        if arr.shape[:2] != IMAGE_SIZE:
            raise ValueError(
                f"{path}: expected {IMAGE_SIZE[1]}x{IMAGE_SIZE[0]}, got "
                f"{arr.shape[1]}x{arr.shape[0]}"
            )
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), label


# ----------------------------------------------------------------------------- stand-in

# Seven-segment digits: segments as ((x0, y0), (x1, y1)) in a unit box (x right, y down).
_SEG = {
    "a": ((0, 0), (1, 0)),
    "b": ((1, 0), (1, 0.5)),
    "c": ((1, 0.5), (1, 1)),
    "d": ((0, 1), (1, 1)),
    "e": ((0, 0.5), (0, 1)),
    "f": ((0, 0), (0, 0.5)),
    "g": ((0, 0.5), (1, 0.5)),
}
_DIGITS = {"0": "abcdef", "5": "afgcd", "7": "abc", "8": "abcdefg"}


@dataclass(frozen=True)
class SceneLayout:
    """Where the speed sign of a stand-in image is (None for EMPTY): centre (y, x), diameter."""

    label: int
    sign_centre: tuple[int, int] | None
    sign_diameter: int | None


class SpeedLimitsStandIn(Dataset):
    """Deterministic offline stand-in with the geometry of the speed-limits task.

    Args:
        n_images: dataset length.
        seed: item ``i`` is drawn from ``(seed, i)``; use different seeds per split.
        class_probs: probabilities of EMPTY, 50, 70, 80.
        sign_diameter: (min, max) full-resolution diameter of the speed sign in pixels.
        n_clutter: random boxes / ellipses per scene (buildings, cars, trees).
        n_distractors: (min, max) other signs (no number) per scene.
        image_size: (height, width) of the scenes; clutter sizes scale with the height, sign
            sizes do not (so a sign is as readable in a smaller scene).
    """

    def __init__(
        self,
        n_images: int,
        seed: int = 0,
        class_probs: tuple[float, float, float, float] = (0.25, 0.25, 0.25, 0.25),
        sign_diameter: tuple[int, int] = (18, 30),
        n_clutter: int = 40,
        n_distractors: tuple[int, int] = (1, 4),
        image_size: tuple[int, int] = IMAGE_SIZE,
    ) -> None:
        p = np.asarray(class_probs, dtype=np.float64)
        if p.shape != (4,) or (p < 0).any() or not np.isclose(p.sum(), 1.0):
            raise ValueError(f"class_probs must be 4 probabilities summing to 1, got {class_probs}")
        self.n_images = int(n_images)
        self.seed = int(seed)
        self.class_probs = p
        self.sign_diameter = (int(sign_diameter[0]), int(sign_diameter[1]))
        self.n_clutter = int(n_clutter)
        self.n_distractors = (int(n_distractors[0]), int(n_distractors[1]))
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if min(self.image_size) < 4 * self.sign_diameter[1]:
            raise ValueError(
                f"image_size {image_size} too small for signs up to {self.sign_diameter[1]} px"
            )

    def __len__(self) -> int:
        return self.n_images

    @property
    def source(self) -> str:
        return (
            f"speed-limits-stand-in(seed={self.seed}, probs={self.class_probs.tolist()}, "
            f"sign_diameter={self.sign_diameter}, image_size={self.image_size}, "
            f"n_clutter={self.n_clutter})"
        )

    def label(self, i: int) -> int:
        """Class of item ``i`` without rendering it."""
        return self.layout(i).label

    @property
    def labels(self) -> list[int]:
        return [self.label(i) for i in range(len(self))]

    def _rng(self, i: int) -> np.random.Generator:
        if not 0 <= i < self.n_images:
            raise IndexError(f"item {i} outside [0, {self.n_images})")
        return np.random.default_rng([self.seed, i])

    def layout(self, i: int) -> SceneLayout:
        """Label and sign placement of item ``i`` (the first draws of its generator)."""
        rng = self._rng(i)
        return self._layout(rng)

    def _layout(self, rng: np.random.Generator) -> SceneLayout:
        h, w = self.image_size
        label = int(rng.choice(4, p=self.class_probs))
        d = int(rng.integers(self.sign_diameter[0], self.sign_diameter[1] + 1))
        cy = int(rng.integers(int(0.25 * h), int(0.6 * h)))
        cx = int(rng.integers(d, w - d))
        if label == 0:
            return SceneLayout(0, None, None)
        return SceneLayout(label, (cy, cx), d)

    def render(self, i: int, label: int | None = None) -> np.ndarray:
        """uint8 (height, width, 3) scene of item ``i``; ``label`` overrides only the number
        on the sign (same scene otherwise), which the tests use to compare classes."""
        from PIL import Image, ImageDraw

        rng = self._rng(i)
        lay = self._layout(rng)
        if label is not None and lay.label != 0 and label != 0:
            lay = SceneLayout(label, lay.sign_centre, lay.sign_diameter)
        h, w = self.image_size
        k = h / IMAGE_SIZE[0]  # clutter scale
        horizon = int(rng.integers(int(0.35 * h), int(0.6 * h)))
        sky = rng.uniform(150, 230, 3)
        road = rng.uniform(70, 130, 3)
        # Build rows once and broadcast: a float canvas of the whole scene costs 10x more.
        ramp = np.linspace(0.85, 1.1, horizon)[:, None]
        rows = np.concatenate([sky[None, :] * ramp, np.repeat(road[None, :], h - horizon, 0)])
        rows = np.clip(rows, 0, 255).astype(np.uint8)
        im = Image.fromarray(np.ascontiguousarray(np.broadcast_to(rows[:, None, :], (h, w, 3))))
        draw = ImageDraw.Draw(im)
        for _ in range(self.n_clutter):
            x0, y0 = int(rng.integers(0, w)), int(rng.integers(int(0.1 * h), h))
            bw, bh = int(k * rng.integers(10, 260)), int(k * rng.integers(10, 220))
            color = tuple(int(c) for c in rng.integers(0, 256, 3))
            box = (x0, y0 - bh, x0 + bw, y0)
            if rng.random() < 0.5:
                draw.rectangle(box, fill=color)
            else:
                draw.ellipse(box, fill=color)
        n_dis = int(rng.integers(self.n_distractors[0], self.n_distractors[1] + 1))
        for _ in range(n_dis):
            dd = int(rng.integers(self.sign_diameter[0], self.sign_diameter[1] + 1))
            cy, cx = int(rng.integers(int(0.2 * h), int(0.7 * h))), int(rng.integers(dd, w - dd))
            self._distractor(draw, rng, cy, cx, dd)
        if lay.sign_centre is not None:
            self._speed_sign(draw, lay, rng)
        return np.asarray(im)

    @staticmethod
    def _pole(draw: object, cy: int, cx: int, d: int) -> None:
        draw.rectangle((cx - 2, cy + d // 2, cx + 2, cy + 4 * d), fill=(110, 110, 110))

    def _distractor(self, draw: object, rng: np.random.Generator, cy: int, cx: int, d: int):
        r = d // 2
        self._pole(draw, cy, cx, d)
        kind = int(rng.integers(0, 3))
        if kind == 0:  # blue mandatory sign
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(30, 70, 190))
        elif kind == 1:  # red warning triangle
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=(200, 20, 20))
            q = max(2, r // 3)
            draw.polygon(
                [(cx, cy - r + 2 * q), (cx - r + 2 * q, cy + r - q), (cx + r - 2 * q, cy + r - q)],
                fill=(240, 240, 240),
            )
        else:  # red ring with a bar: looks like a speed sign from afar, carries no number
            ring = max(2, d // 7)
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 20, 20))
            draw.ellipse(
                (cx - r + ring, cy - r + ring, cx + r - ring, cy + r - ring), fill=(240, 240, 240)
            )
            draw.line((cx - r // 2, cy, cx + r // 2, cy), fill=(20, 20, 20), width=2)

    def _speed_sign(self, draw: object, lay: SceneLayout, rng: np.random.Generator) -> None:
        cy, cx = lay.sign_centre  # type: ignore[misc]
        d = int(lay.sign_diameter)  # type: ignore[arg-type]
        r = d // 2
        ring = max(2, d // 7)
        self._pole(draw, cy, cx, d)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(200, 20, 20))
        draw.ellipse(
            (cx - r + ring, cy - r + ring, cx + r - ring, cy + r - ring), fill=(240, 240, 240)
        )
        text = {1: "50", 2: "70", 3: "80"}[lay.label]
        # Random ink darkness: the amount of ink differs between numbers (a 7 has fewer
        # strokes), and at low resolution that total would otherwise give the class away.
        ink = int(rng.integers(0, 140))
        dh = max(6, int(0.5 * d))  # digit height
        dw = max(3, int(0.26 * d))  # digit width
        gap = max(2, d // 10)
        x = cx - (2 * dw + gap) // 2
        y = cy - dh // 2
        for ch in text:
            for seg in _DIGITS[ch]:
                (u0, v0), (u1, v1) = _SEG[seg]
                seg_xy = (x + u0 * dw, y + v0 * dh, x + u1 * dw, y + v1 * dh)
                draw.line(seg_xy, fill=(ink, ink, ink), width=1)
            x += dw + gap

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """``(x_high uint8 (3, height, width), label)``."""
        arr = self.render(int(i))
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.label(int(i))
