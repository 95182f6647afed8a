"""Feature cache for frozen encoders: :class:`FeatureKey` (slide, level-0 box, mpp, encoder)
and :class:`FeatureCache` (an LRU in memory bounded in bytes, optionally backed by zarr)."""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = ["FeatureCache", "FeatureKey"]


@dataclass(frozen=True)
class FeatureKey:
    """One cached patch feature: slide, level-0 box (x, y, size), patch mpp, encoder."""

    slide: str
    x: int
    y: int
    size: int
    mpp: float
    encoder_id: str

    @classmethod
    def of(
        cls, slide: str | os.PathLike[str], x: int, y: int, size: int, mpp: float, encoder_id: str
    ) -> FeatureKey:
        """Normalised key (path -> str, ints, mpp rounded to 1e-6)."""
        return cls(os.fspath(slide), int(x), int(y), int(size), round(float(mpp), 6), encoder_id)


@dataclass
class _DiskGroup:
    feats: Any
    boxes: Any
    index: dict[tuple[int, int, int], int] = field(default_factory=dict)


class FeatureCache:
    """Features of frozen encoders by :class:`FeatureKey`: an LRU in memory bounded in bytes,
    optionally backed by a zarr store on disk.

    ``get_many(keys)`` returns ``(hits, missing)``; ``put_many(keys, feats)`` stores rows;
    ``fetch(keys, compute)`` does both around a compute callback. Memory holds CPU tensors and
    counts their bytes; eviction is least recently used. The disk store (``path``) keeps every
    feature ever put (one zarr group per encoder, slide and mpp: ``feats`` (n, D) and ``boxes``
    (n, 3)), survives restarts and refills memory on a hit. One writer process at a time.
    Only cache fully frozen encoders (``PatchEncoder.fully_frozen``): their features never change.
    """

    def __init__(
        self, max_bytes: int = 1 << 30, path: str | os.PathLike[str] | None = None
    ) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must be >= 0")
        self.max_bytes = int(max_bytes)
        self.path = Path(path) if path is not None else None
        self._mem: OrderedDict[FeatureKey, Tensor] = OrderedDict()
        self._bytes = 0
        self._groups: dict[tuple[str, str, float], _DiskGroup] = {}
        self._root: Any = None
        self.hits = 0
        self.misses = 0
        self.disk_hits = 0

    # -- stats
    @property
    def hit_rate(self) -> float:
        """hits / (hits + misses); 0.0 before any lookup."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def nbytes(self) -> int:
        """Bytes of the feature tensors held in memory."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._mem)

    def __contains__(self, key: object) -> bool:
        return key in self._mem

    def reset_stats(self) -> None:
        """Zero the hit / miss counters."""
        self.hits = self.misses = self.disk_hits = 0

    def clear(self) -> None:
        """Empty the memory tier (the disk store is kept)."""
        self._mem.clear()
        self._bytes = 0

    # -- memory tier
    def _remember(self, key: FeatureKey, feat: Tensor) -> None:
        size = feat.numel() * feat.element_size()
        if size > self.max_bytes:
            return
        old = self._mem.pop(key, None)
        if old is not None:
            self._bytes -= old.numel() * old.element_size()
        self._mem[key] = feat
        self._bytes += size
        while self._bytes > self.max_bytes:
            _, ev = self._mem.popitem(last=False)
            self._bytes -= ev.numel() * ev.element_size()

    # -- disk tier
    def _group(self, key: FeatureKey, dim: int | None) -> _DiskGroup | None:
        gk = (key.encoder_id, key.slide, key.mpp)
        if gk in self._groups:
            return self._groups[gk]
        import zarr

        if self._root is None:
            assert self.path is not None
            self._root = zarr.open_group(str(self.path), mode="a")
        name = hashlib.sha256(json.dumps(list(gk)).encode()).hexdigest()[:24]
        if name in self._root:
            g = self._root[name]
            grp = _DiskGroup(g["feats"], g["boxes"])
            boxes = grp.boxes[:]
            grp.index = {(int(b[0]), int(b[1]), int(b[2])): i for i, b in enumerate(boxes)}
        elif dim is None:
            return None
        else:
            g = self._root.create_group(name)
            g.attrs.update({"encoder_id": key.encoder_id, "slide": key.slide, "mpp": key.mpp})
            feats = g.create_array("feats", shape=(0, dim), chunks=(1024, dim), dtype="float32")
            boxes = g.create_array("boxes", shape=(0, 3), chunks=(4096, 3), dtype="int64")
            grp = _DiskGroup(feats, boxes)
        self._groups[gk] = grp
        return grp

    def _disk_get(self, keys: list[FeatureKey]) -> dict[FeatureKey, Tensor]:
        found: dict[FeatureKey, Tensor] = {}
        by_group: dict[tuple[str, str, float], list[tuple[int, FeatureKey]]] = {}
        for k in keys:
            grp = self._group(k, None)
            if grp is None:
                continue
            row = grp.index.get((k.x, k.y, k.size))
            if row is not None:
                by_group.setdefault((k.encoder_id, k.slide, k.mpp), []).append((row, k))
        for gk, rows in by_group.items():
            rows.sort()
            data = self._groups[gk].feats.oindex[[r for r, _ in rows], :]
            for (_, k), v in zip(rows, torch.from_numpy(data), strict=True):
                found[k] = v.clone()
        return found

    def _disk_put(self, keys: list[FeatureKey], feats: Tensor) -> None:
        by_group: dict[tuple[str, str, float], list[int]] = {}
        for i, k in enumerate(keys):
            by_group.setdefault((k.encoder_id, k.slide, k.mpp), []).append(i)
        arr = feats.detach().to("cpu", torch.float32).numpy()
        for idx in by_group.values():
            grp = self._group(keys[idx[0]], arr.shape[1])
            assert grp is not None
            new = [i for i in idx if (keys[i].x, keys[i].y, keys[i].size) not in grp.index]
            new = list({(keys[i].x, keys[i].y, keys[i].size): i for i in new}.values())
            if not new:
                continue
            start = grp.feats.shape[0]
            stop = start + len(new)
            grp.feats.resize((stop, arr.shape[1]))
            grp.boxes.resize((stop, 3))
            grp.feats[start:stop] = arr[new]
            grp.boxes[start:stop] = [[keys[i].x, keys[i].y, keys[i].size] for i in new]
            for r, i in enumerate(new, start):
                grp.index[(keys[i].x, keys[i].y, keys[i].size)] = r

    # -- API
    def get_many(
        self, keys: Sequence[FeatureKey]
    ) -> tuple[dict[FeatureKey, Tensor], list[FeatureKey]]:
        """Cached features of ``keys``: ``(hits by key, missing keys in input order)``."""
        hits: dict[FeatureKey, Tensor] = {}
        rest: list[FeatureKey] = []
        for k in keys:
            v = self._mem.get(k)
            if v is None:
                rest.append(k)
            else:
                self._mem.move_to_end(k)
                hits[k] = v
        if rest and self.path is not None:
            found = self._disk_get(rest)
            for k, v in found.items():
                self._remember(k, v)
                hits[k] = v
            self.disk_hits += len(found)
            rest = [k for k in rest if k not in found]
        self.hits += len(keys) - len(rest)
        self.misses += len(rest)
        return hits, rest

    def put_many(self, keys: Sequence[FeatureKey], feats: Tensor) -> None:
        """Store ``feats[i]`` (a (len(keys), D) tensor) under ``keys[i]`` (detached CPU copies)."""
        if feats.dim() != 2 or feats.shape[0] != len(keys):
            raise ValueError(f"{len(keys)} keys but features of shape {tuple(feats.shape)}")
        cpu = feats.detach().to("cpu").contiguous()
        for k, v in zip(keys, cpu, strict=True):
            self._remember(k, v.clone())
        if self.path is not None and len(keys):
            self._disk_put(list(keys), cpu)

    def fetch(self, keys: Sequence[FeatureKey], compute: Callable[[list[int]], Tensor]) -> Tensor:
        """(len(keys), D) features: cached rows, and ``compute(indices of the missing keys)``
        (a (len(indices), D) tensor) for the rest, which are then stored."""
        hits, missing = self.get_many(keys)
        if missing:
            pos: dict[FeatureKey, int] = {}
            for i, k in enumerate(keys):
                pos.setdefault(k, i)
            idx = [pos[k] for k in dict.fromkeys(missing)]
            new = compute(idx)
            self.put_many([keys[i] for i in idx], new)
            hits.update({keys[i]: v for i, v in zip(idx, new.detach().cpu(), strict=True)})
        return torch.stack([hits[k] for k in keys])
