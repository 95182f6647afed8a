"""Training from TRIDENT / CLAM feature h5 files (``data.features_dir``; slides.md).

A feature h5 holds ``features`` (N, D) and ``coords`` (N, 2) level-0 top-left (x, y) tiles
(:mod:`ats_wsi.slides.interop` describes both layouts). :func:`h5_feature_cache` checks each
training / validation slide's file against the configured encoder (dimension; name where the
file records one) and tiles (level-0 side from the slide's mpp and ``slides.patch_size`` /
``patch_mpp``), and returns an :class:`H5FeatureCache`: a :class:`FeatureCache` that answers
the model's lookups (:meth:`SlidePatchSource.box_keys` keys) from the h5 tile containing the
centre of the box the model asks for, reading those feature rows lazily. Boxes without a tile
are misses, read and encoded as before. With a ``tile_pool`` attention net whose cells are the
tiles, every sampled tissue cell is a tile: no reads, no encoder forwards.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ats_wsi.encoders.cache import FeatureCache, FeatureKey
from ats_wsi.slides.interop import PatchFileError, _level0_size, _plain

__all__ = ["FeaturesH5Error", "H5FeatureCache", "SlideFeatures", "h5_feature_cache"]

# TRIDENT's encoder names (normalised) that differ from the preset of the same weights.
_TRIDENT_ALIASES = {"univ1": "uni", "univ2": "uni2h", "resnet50": "resnet50trunc"}


class FeaturesH5Error(PatchFileError):
    """A feature h5 that does not fit the config (encoder, tiles, slide); names the file."""


def _norm(name: str) -> str:
    """Lower-case alphanumerics, TRIDENT's names mapped to the presets': ``uni_v1`` -> uni."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return _TRIDENT_ALIASES.get(key, key)


@dataclass
class SlideFeatures:
    """The tiles of one slide's feature h5, indexed for box lookups (features stay on disk)."""

    file: Path
    slide: str  # the key's slide: str(reader.path), as SlidePatchSource.box_keys gives it
    size: int  # level-0 box side the model asks for on this slide
    tile: float  # level-0 side of the h5 tiles
    coords: np.ndarray  # (N, 2) int64 (x, y)
    batch_axis: bool  # features stored as (1, N, D)
    buckets: dict[tuple[int, int], list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for i, (bx, by) in enumerate(np.floor_divide(self.coords, self.tile).astype(np.int64)):
            self.buckets.setdefault((int(bx), int(by)), []).append(i)

    def row(self, x: int, y: int) -> int | None:
        """The tile containing the centre of the box at (x, y) (the nearest centre if tiles
        overlap), or None."""
        cx, cy = x + self.size / 2, y + self.size / 2
        bx, by = int(cx // self.tile), int(cy // self.tile)
        best, dist = None, np.inf
        for key in ((bx, by), (bx - 1, by), (bx, by - 1), (bx - 1, by - 1)):
            for i in self.buckets.get(key, ()):
                tx, ty = self.coords[i]
                if tx <= cx < tx + self.tile and ty <= cy < ty + self.tile:
                    d = abs(tx + self.tile / 2 - cx) + abs(ty + self.tile / 2 - cy)
                    if d < dist:
                        best, dist = i, d
        return best

    def read(self, rows: list[int]) -> Tensor:
        """float32 (len(rows), D) features of ``rows`` (read from the file now)."""
        import h5py

        order = sorted(set(rows))
        with h5py.File(self.file, "r") as f:
            dset = f["features"]
            data = dset[0, order] if self.batch_axis else dset[order]
        pos = {r: i for i, r in enumerate(order)}
        return torch.from_numpy(np.asarray(data, np.float32)[[pos[r] for r in rows]])


class H5FeatureCache(FeatureCache):
    """A :class:`FeatureCache` backed by feature h5 files: lookups the memory (and disk) tiers
    miss are answered from the slide's h5 (``h5_hits``); what no tile covers stays a miss."""

    def __init__(
        self,
        slides: dict[str, SlideFeatures],
        encoder_id: str,
        patch_mpp: float,
        max_bytes: int = 1 << 30,
        path: Any = None,
    ) -> None:
        super().__init__(max_bytes=max_bytes, path=path)
        self.slides = slides
        self.encoder_id = encoder_id
        self.patch_mpp = round(float(patch_mpp), 6)
        self.h5_hits = 0
        self.summary: dict[str, Any] = {}  # h5_feature_cache's: folder, slides, tiles, skipped

    def get_many(
        self, keys: Sequence[FeatureKey]
    ) -> tuple[dict[FeatureKey, Tensor], list[FeatureKey]]:
        """As :meth:`FeatureCache.get_many`, then the h5 tiles for what is left."""
        hits, rest = super().get_many(keys)
        wanted: dict[str, list[tuple[FeatureKey, int]]] = {}
        for k in rest:
            sf = self.slides.get(k.slide)
            ok = sf is not None and k.encoder_id == self.encoder_id and k.size == sf.size
            row = sf.row(k.x, k.y) if ok and k.mpp == self.patch_mpp else None
            if row is not None:
                wanted.setdefault(k.slide, []).append((k, row))
        for slide, pairs in wanted.items():
            try:
                feats = self.slides[slide].read([r for _, r in pairs])
            except (OSError, KeyError, ValueError) as e:  # damaged after it was checked
                warnings.warn(f"{self.slides[slide].file}: unreadable features ({e}); "
                              "its slide reads and encodes its tiles", stacklevel=2)
                del self.slides[slide]
                continue
            for (k, _), v in zip(pairs, feats, strict=True):
                v = v.clone()  # its own storage: the memory tier counts bytes per row
                self._remember(k, v)
                hits[k] = v
            self.hits += len(pairs)
            self.misses -= len(pairs)
            self.h5_hits += len(pairs)
        return hits, [k for k in rest if k not in hits]


def encoder_names(net: Any, spec: Any) -> set[str]:
    """Normalised names the configured encoder goes by: preset, arch, ``encoder_id`` label."""
    names = {str(net.encoder_id).split(":")[0].split("@")[0].removeprefix("torchvision-")}
    if isinstance(spec, dict):
        names |= {str(spec[k]) for k in ("preset", "arch") if spec.get(k)}
    return {_norm(n) for n in names if n}


def _file_encoder(f: Any, file: Path) -> str | None:
    """The encoder a file records: ``features`` attribute ``encoder`` (TRIDENT), else the
    ``features_<encoder>`` folder it sits in."""
    name = _plain(f["features"].attrs.get("encoder", "")) if "features" in f else ""
    if isinstance(name, str) and name and name != "None":
        return name
    parent = file.parent.name
    return parent.removeprefix("features_") if parent.startswith("features_") else None


def find_features_h5(folder: Path, slide_id: str, slide_path: str) -> Path | None:
    """``<slide_id>.h5`` (or ``<slide file stem>.h5``) in ``folder``."""
    for name in dict.fromkeys((slide_id, Path(slide_path).stem)):
        if (folder / f"{name}.h5").is_file():
            return folder / f"{name}.h5"
    return None


def features_folder(features_dir: str | Path, names: set[str]) -> Path:
    """The folder holding the h5s: ``features_dir`` itself, its ``h5_files/`` (CLAM), or its
    one ``features_<encoder>/`` (TRIDENT; the configured encoder's when there are several)."""
    base = Path(features_dir)
    if not base.is_dir():
        raise FeaturesH5Error(f"{base}: data.features_dir is not a folder")
    if any(base.glob("*.h5")):
        return base
    if (base / "h5_files").is_dir():
        return base / "h5_files"
    subs = sorted(p for p in base.glob("features_*") if p.is_dir())
    match = [p for p in subs if _norm(p.name.removeprefix("features_")) in names]
    if len(subs) == 1 or len(match) == 1:
        return subs[0] if len(subs) == 1 else match[0]
    found = ", ".join(p.name for p in subs) or "no .h5, h5_files/ or features_*/"
    raise FeaturesH5Error(f"{base}: no feature h5 folder for the configured encoder ({found})")


def _check(f: Any, file: Path, ctx: dict[str, Any]) -> tuple[np.ndarray, float, bool]:
    """Validate one open file against the config and slide; (coords, tile side, batch axis)."""
    for name in ("features", "coords"):
        if name not in f:
            raise PatchFileError(f"{file}: no {name!r} dataset (found: {', '.join(f.keys())})")
    shape = f["features"].shape
    batch_axis = len(shape) == 3 and shape[0] == 1
    shape = shape[1:] if batch_axis else shape
    coords = np.asarray(f["coords"][:])
    if len(shape) != 2 or coords.ndim != 2 or coords.shape[1:] != (2,) or len(coords) != shape[0]:
        raise PatchFileError(f"{file}: 'features' {shape} does not match 'coords' {coords.shape}")
    if shape[1] != ctx["out_dim"]:
        raise FeaturesH5Error(f"{file}: features of dimension {shape[1]}, but model.feature_net "
                              f"({ctx['label']}) gives {ctx['out_dim']}")
    enc = _file_encoder(f, file)
    if enc is not None and _norm(enc) not in ctx["names"]:
        raise FeaturesH5Error(f"{file}: features of encoder {enc!r}, but model.feature_net is "
                              f"{ctx['label']!r}")
    if shape[0]:  # a file cut short fails here, not in the middle of an epoch
        f["features"][(0, -1) if batch_axis else -1]
    attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
    tile, layout = _level0_size(attrs, file)
    size = ctx["size"]
    if tile is not None and abs(tile - size) > max(1.0, 0.02 * size):
        raise FeaturesH5Error(
            f"{file}: tiles of {tile:g} level-0 px, but slides.patch_size {ctx['patch_px']} px "
            f"at patch_mpp {ctx['patch_mpp']:g} um/px is {size} level-0 px on this slide "
            f"({ctx['mpp0']:g} um/px)")
    if layout == "trident" and int(attrs.get("patch_size", ctx["patch_px"])) != ctx["patch_px"]:
        raise FeaturesH5Error(f"{file}: tiles of {attrs['patch_size']} px at the target "
                              f"magnification, but slides.patch_size is {ctx['patch_px']}")
    tile = float(size if tile is None else tile)
    width, height = ctx["dimensions"]
    out = (coords[:, 0] <= -tile) | (coords[:, 0] >= width)
    out |= (coords[:, 1] <= -tile) | (coords[:, 1] >= height)
    if out.any():
        raise FeaturesH5Error(f"{file}: {int(out.sum())} of {len(coords)} tiles lie outside the "
                              f"slide's {width}x{height} level-0 px (another slide or level?)")
    return coords.astype(np.int64), tile, batch_axis


def _slide_features(file: Path, path: str, settings: Any, ctx: dict[str, Any]) -> SlideFeatures:
    import h5py

    from ats_wsi.slides.engine import opened

    with opened(path, settings) as reader:  # metadata only: mpp, dimensions, the key's path
        mpp0 = float(reader.mpp[0])
        size = max(1, round(settings.patch_size * settings.patch_mpp / mpp0))
        ctx = {**ctx, "size": size, "mpp0": mpp0, "dimensions": reader.dimensions}
        slide = str(reader.path)
    try:
        with h5py.File(file, "r") as f:
            coords, tile, batch_axis = _check(f, file, ctx)
    except OSError as e:
        raise PatchFileError(f"{file}: not a readable HDF5 file ({e})") from e
    return SlideFeatures(file, slide, size, tile, coords, batch_axis)


def h5_feature_cache(
    features_dir: str | Path,
    records: Sequence[Any],
    settings: Any,
    model: Any,
    spec: Any = None,
    max_bytes: int = 1 << 30,
    path: Any = None,
) -> H5FeatureCache:
    """The cache over ``records``' feature h5s (``slide_id``, ``path``); its ``summary``
    gives the folder, the slides and tiles found and the slides skipped (with the reason).

    A config mismatch (encoder dimension or name, tile size, coords outside the slide) raises
    :class:`FeaturesH5Error`; a missing, truncated or malformed file warns (naming it) and
    its slide reads and encodes its tiles. ``spec`` is ``model.feature_net`` of the config.
    """
    from ats_wsi.encoders.protocol import PatchEncoder

    net = getattr(getattr(model, "module", model), "feature_net", None)
    if not (isinstance(net, PatchEncoder) and net.fully_frozen):
        raise FeaturesH5Error(
            f"data.features_dir {features_dir}: model.feature_net must be a fully frozen "
            f"pretrained encoder (freeze: true), got {type(net).__name__}")
    names = encoder_names(net, spec)
    label = str(net.encoder_id).split(":")[0]
    folder = features_folder(features_dir, names)
    ctx = {"out_dim": int(net.out_dim), "names": names, "label": label,
           "patch_px": int(settings.patch_size), "patch_mpp": float(settings.patch_mpp)}
    slides: dict[str, SlideFeatures] = {}
    skipped: dict[str, str] = {}
    for rec in records:
        file = find_features_h5(folder, rec.slide_id, rec.path)
        try:
            if file is None:
                raise PatchFileError(f"{folder / (rec.slide_id + '.h5')}: no such feature file")
            sf = _slide_features(file, rec.path, settings, ctx)
        except FeaturesH5Error:
            raise
        except PatchFileError as e:
            skipped[rec.slide_id] = str(e)
            warnings.warn(f"{e}; slide {rec.slide_id} reads and encodes its tiles", stacklevel=2)
            continue
        slides[sf.slide] = sf
    cache = H5FeatureCache(slides, net.encoder_id, settings.patch_mpp, max_bytes, path)
    cache.summary = {"dir": str(folder), "slides": len(slides),
                     "tiles": int(sum(len(s.coords) for s in slides.values())),
                     "skipped": skipped}
    return cache
