"""Megapixel MNIST rendered on the device from the sparse placements (issue 16).

:class:`DeviceMegapixelMNIST` draws every item's :class:`~ats_wsi.datasets.megapixel_mnist.
Placement` once on the CPU (the same ``(seed, i)`` draws as the lazy generator) and keeps
them as small tensors on the device, next to two piece banks: the digit pool plus the noise
patterns at full resolution (uint8 and float32) and the same pieces resized once per pool
item at the low-res scale (with the CPU generator's own Pillow resize). A batch is then
rendered with a few batched tensor ops, no per-item Python loop:

* the low-res view and full canvases by one ``scatter_reduce(amax)`` of keys
  ``paste order * 2^k + value``: the largest key at a pixel is the piece pasted last, so
  overwriting (later pieces cover earlier ones, background zeros included) is reproduced
  exactly and independently of the scatter's order;
* ATS patches by :class:`PlacementPatchSource`, which never builds the canvas: for each
  requested box it finds the few pieces that overlap it and reads, per pixel, the one pasted
  last.

Everything matches the CPU generator bit for bit (``tests/test_megapixel_mnist_device.py``):
``render_high`` / ``render_high_uint8`` / ``render_low`` and patches cut from those canvases.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ats_wsi.datasets.megapixel_mnist import _DIGIT, MegapixelMNIST, _resize

__all__ = ["DeviceLoader", "DeviceMegapixelMNIST", "PlacementPatchSource"]

_LOW32 = (1 << 32) - 1


def _float_keys(order: Tensor, values: Tensor) -> Tensor:
    """int64 ``order << 32 | float32 bits``: amax picks the largest order, the bits ride along."""
    bits = values.contiguous().view(torch.int32).to(torch.int64) & _LOW32
    return (order.to(torch.int64) << 32) | bits


def _float_from_keys(keys: Tensor) -> Tensor:
    low = keys & _LOW32
    # Back to a signed int32 bit pattern (values >= 2^31 are negative floats' bits).
    low = torch.where(low >= 1 << 31, low - (1 << 32), low).to(torch.int32)
    return low.view(torch.float32)


def _composite(
    batch: int,
    size: tuple[int, int],
    pieces: Tensor,
    pos: Tensor,
    keys_of: Any,
) -> Tensor:
    """Paste (B, M, s, s) ``pieces`` at ``pos`` (B, M, 2) in order m = 0..M-1 (later covers).

    ``keys_of(order, pieces)`` turns values into sortable keys (order 1..M, 0 = background);
    returns the (B, H * W) key canvas. Pixels outside the canvas are dropped.
    """
    h, w = size
    _, m, s, _ = pieces.shape
    device = pieces.device
    r = torch.arange(s, device=device)
    ys = pos[..., 0, None, None] + r[:, None]  # (B, M, s, 1)
    xs = pos[..., 1, None, None] + r[None, :]  # (B, M, 1, s)
    inside = (ys >= 0) & (ys < h) & (xs >= 0) & (xs < w)
    order = torch.arange(1, m + 1, device=device).view(1, m, 1, 1).expand_as(pieces)
    keys = keys_of(order, pieces)
    # Outside pixels get key 0 on a clamped in-frame index: amax with 0 changes nothing.
    keys = torch.where(inside, keys, torch.zeros((), dtype=keys.dtype, device=device))
    flat = ys.clamp(0, h - 1) * w + xs.clamp(0, w - 1)
    flat = flat + torch.arange(batch, device=device).view(batch, 1, 1, 1) * (h * w)
    canvas = torch.zeros(batch * h * w, dtype=keys.dtype, device=device)
    canvas.scatter_reduce_(0, flat.reshape(-1), keys.reshape(-1), "amax")
    return canvas.view(batch, h * w)


class DeviceMegapixelMNIST:
    """All items of a :class:`MegapixelMNIST` as placement tensors on ``device``.

    Args:
        ds: the CPU generator; its placements, labels, pieces and geometry are used as they are.
        device: where the tables live and batches are rendered.
        n_items: render only items ``0..n_items-1`` (default: all of ``ds``).

    Item ``i`` here is item ``i`` of ``ds``: same placement, same label, same pixels.
    """

    def __init__(
        self, ds: MegapixelMNIST, device: torch.device | str = "cpu", n_items: int | None = None
    ) -> None:
        n = len(ds) if n_items is None else int(n_items)
        if not 0 <= n <= len(ds):
            raise ValueError(f"n_items={n} outside [0, {len(ds)}]")
        self.device = torch.device(device)
        self.ds = ds
        self.canvas_size = ds.canvas_size
        self.low_size = ds.low_size
        self.scale = ds.scale
        self.target = ds.target
        self.source = ds.source + " [rendered on device]"
        n_pool = len(ds.pool)
        n_pieces = ds.n_digits + ds.n_noise
        bank = np.zeros((n, n_pieces), np.int64)
        pos = np.zeros((n, n_pieces, 2), np.int64)
        mult_u8 = np.zeros((n, n_pieces), np.int32)
        mult_f = np.zeros((n, n_pieces), np.float32)
        labels = []
        for i in range(n):
            p = ds.placement(i)
            labels.append(ds.labels(i, p)[ds.target])
            a = p.noise_intensity
            digits = (p.digit_indices, p.digit_positions, np.ones(ds.n_digits))
            # Same arithmetic as render_high_uint8: float32 pattern times the float64 255 * a.
            noise_u8 = np.round(np.ones(1, np.float32) * (255.0 * a))
            noise = (n_pool + p.noise_patterns, p.noise_positions, noise_u8)
            first, second = (digits, noise) if ds.noise_order == "after" else (noise, digits)
            bank[i] = np.concatenate([first[0], second[0]])
            pos[i] = np.concatenate([first[1], second[1]])
            mult_u8[i] = np.concatenate([first[2], second[2]])
            f_digits, f_noise = np.ones(ds.n_digits, np.float32), a.astype(np.float32)
            mult_f[i] = np.concatenate(
                [f_digits, f_noise] if ds.noise_order == "after" else [f_noise, f_digits]
            )
        # The CPU generator pastes the low-res piece at int(y * scale) (float64, truncated).
        low_pos = (pos.astype(np.float64) * ds.scale).astype(np.int64)
        digits_f = ds.pool.images.astype(np.float32) / 255.0
        high_f = np.concatenate([digits_f, ds.patterns.astype(np.float32)])
        high_u8 = np.concatenate([ds.pool.images, ds.patterns.astype(np.uint8)])
        # Resized once per pool item, with the CPU generator's own resize: bit-identical pieces
        # (only the digits some item uses; the others stay zero and are never read).
        side = ds._low_side
        low_digits = np.zeros((n_pool, side, side), np.float32)
        for k in np.unique(bank[bank < n_pool]):
            low_digits[k] = _resize(digits_f[k], side)
        low_bank = np.concatenate([low_digits, ds._low_patterns]).astype(np.float32)

        dev = self.device
        self.bank = torch.from_numpy(bank).to(dev)
        self.pos = torch.from_numpy(pos).to(dev)
        self.low_pos = torch.from_numpy(low_pos).to(dev)
        self.mult_u8 = torch.from_numpy(mult_u8).to(dev)
        self.mult_f = torch.from_numpy(mult_f).to(dev)
        self.high_u8 = torch.from_numpy(high_u8).to(dev)
        self.high_f = torch.from_numpy(high_f).to(dev)
        self.low_bank = torch.from_numpy(low_bank).to(dev)
        if ds.target == "multi":
            self.labels = torch.from_numpy(np.stack(labels).astype(np.float32)).to(dev)
        else:
            self.labels = torch.tensor(labels, dtype=torch.int64, device=dev)

    def __len__(self) -> int:
        return int(self.bank.shape[0])

    def _idx(self, idx: Tensor | Any) -> Tensor:
        return torch.as_tensor(idx, dtype=torch.long).reshape(-1).to(self.device)

    def render_low(self, idx: Tensor | Any) -> Tensor:
        """(B, 1, h, w) float32 low-res views of items ``idx`` (= ``ds.render_low``)."""
        idx = self._idx(idx)
        pieces = self.low_bank[self.bank[idx]] * self.mult_f[idx][..., None, None]
        keys = _composite(len(idx), self.low_size, pieces, self.low_pos[idx], _float_keys)
        low = _float_from_keys(keys).view(len(idx), 1, *self.low_size)
        return low.clamp_(0.0, 1.0)

    def render_high(self, idx: Tensor | Any, dtype: str = "uint8") -> Tensor:
        """(B, 1, H, W) canvases of items ``idx``: ``uint8`` (= ``ds.render_high_uint8``) or
        ``float32`` (= ``ds.render_high``)."""
        idx = self._idx(idx)
        b = len(idx)
        if dtype == "uint8":
            pieces = (
                self.high_u8[self.bank[idx]].to(torch.int32) * self.mult_u8[idx][..., None, None]
            )

            def keys_of(order: Tensor, values: Tensor) -> Tensor:
                return order.to(torch.int32) * 256 + values

            keys = _composite(b, self.canvas_size, pieces, self.pos[idx], keys_of)
            return (keys & 255).to(torch.uint8).view(b, 1, *self.canvas_size)
        if dtype == "float32":
            pieces = self.high_f[self.bank[idx]] * self.mult_f[idx][..., None, None]
            keys = _composite(b, self.canvas_size, pieces, self.pos[idx], _float_keys)
            return _float_from_keys(keys).view(b, 1, *self.canvas_size)
        raise ValueError(f"dtype must be 'uint8' or 'float32', got {dtype!r}")

    def patch_source(
        self, idx: Tensor | Any, patch_size: int, dtype: str = "uint8"
    ) -> PlacementPatchSource:
        """A :class:`PlacementPatchSource` over items ``idx``."""
        return PlacementPatchSource(self, self._idx(idx), patch_size, dtype)

    def batch(
        self, idx: Tensor | Any, views: str = "ats", patch_size: int = 50, high_dtype: str = "uint8"
    ) -> tuple[Tensor, Any, Tensor]:
        """``(x_low, high, y)`` for items ``idx``.

        ``views``: ``ats`` (low view and a :class:`PlacementPatchSource`), ``low`` (low view,
        empty high), ``high`` (empty low, a ``high_dtype`` canvas), ``both`` (view and canvas).
        """
        idx = self._idx(idx)
        empty = torch.zeros(0, device=self.device)
        y = self.labels[idx]
        if views == "ats":
            return self.render_low(idx), self.patch_source(idx, patch_size, high_dtype), y
        if views == "low":
            return self.render_low(idx), empty, y
        if views == "high":
            return empty, self.render_high(idx, high_dtype), y
        if views == "both":
            return self.render_low(idx), self.render_high(idx, high_dtype), y
        raise ValueError(f"views must be 'ats', 'low', 'high' or 'both', got {views!r}")


class PlacementPatchSource:
    """:class:`~ats_wsi.patches.PatchSource` that renders the requested boxes straight from
    the placements of a batch (the canvas is never built).

    ``extract`` returns what :class:`~ats_wsi.patches.TensorPatchSource` would cut from the
    CPU canvas: ``dtype="uint8"`` the uint8 canvas's patches as float / 255 (the pipeline's
    ``high_dtype: uint8``), ``"float32"`` the float canvas's patches. Pixels outside the
    canvas are 0.

    Per box it keeps the K pieces that overlap it (K = the batch's largest overlap count, a
    handful), so the work is B * N * K * p * p, independent of the canvas size.
    """

    def __init__(
        self, data: DeviceMegapixelMNIST, idx: Tensor, patch_size: int, dtype: str = "uint8"
    ) -> None:
        if dtype not in ("uint8", "float32"):
            raise ValueError(f"dtype must be 'uint8' or 'float32', got {dtype!r}")
        if patch_size < 1:
            raise ValueError(f"patch_size must be positive, got {patch_size}")
        self.data = data
        self.idx = idx
        self.patch_size = int(patch_size)
        self.dtype = dtype
        self.shape: tuple[int, int] = tuple(data.canvas_size)  # type: ignore[assignment]

    def __len__(self) -> int:
        return int(self.idx.numel())

    def extract(self, top_left: Tensor) -> Tensor:
        """int (B, N, 2) (y, x) top-left corners -> float32 (B, N, 1, p, p) patches."""
        d, p = self.data, self.patch_size
        b = len(self.idx)
        if top_left.dim() != 3 or top_left.shape[0] != b or top_left.shape[-1] != 2:
            raise ValueError(f"top_left must be ({b}, N, 2), got {tuple(top_left.shape)}")
        device = d.device
        tl = top_left.to(device=device, dtype=torch.long)
        n = tl.shape[1]
        pos = d.pos[self.idx]  # (B, M, 2)
        m = pos.shape[1]
        py, px = pos[:, None, :, 0], pos[:, None, :, 1]  # (B, 1, M)
        y0, x0 = tl[..., 0, None], tl[..., 1, None]  # (B, N, 1)
        hit = (py < y0 + p) & (py + _DIGIT > y0) & (px < x0 + p) & (px + _DIGIT > x0)
        k = int(hit.sum(-1).max()) if hit.numel() else 0  # one host sync per batch
        out = torch.zeros(b, n, 1, p, p, device=device)
        if k == 0:
            return out
        order = torch.arange(1, m + 1, device=device)
        rank, sel = torch.where(hit, order, 0).topk(k, dim=-1)  # latest-pasted first
        bank = d.bank[self.idx][:, None, :].expand(b, n, m).gather(2, sel)  # (B, N, K)
        dy = y0 - py.expand(b, n, m).gather(2, sel)
        dx = x0 - px.expand(b, n, m).gather(2, sel)
        if self.dtype == "uint8":
            mult = d.mult_u8[self.idx][:, None, :].expand(b, n, m).gather(2, sel)
            bank_px = d.high_u8.view(-1)
        else:
            mult = d.mult_f[self.idx][:, None, :].expand(b, n, m).gather(2, sel)
            bank_px = d.high_f.view(-1)
        r = torch.arange(p, device=device)
        rows, cols = dy[..., None] + r, dx[..., None] + r  # (B, N, K, p) piece coordinates
        row_ok = (rows >= 0) & (rows < _DIGIT) & (rank > 0)[..., None]
        col_ok = (cols >= 0) & (cols < _DIGIT)
        base = (bank * _DIGIT)[..., None] + rows.clamp(0, _DIGIT - 1)  # (B, N, K, p)
        cols = cols.clamp(0, _DIGIT - 1)
        out = out[:, :, 0]
        # Painter's order over the K selected pieces (oldest first, so later ones cover):
        # a loop over a handful of overlap slots, each step batched over all B * N boxes.
        for j in range(k - 1, -1, -1):
            flat = base[:, :, j, :, None] * _DIGIT + cols[:, :, j, None, :]  # (B, N, p, p)
            val = bank_px[flat]
            if self.dtype == "uint8":
                val = (val.to(torch.int32) * mult[:, :, j, None, None]).to(torch.float32)
                val = val.div_(255.0)
            else:
                val = val * mult[:, :, j, None, None]
            cover = row_ok[:, :, j, :, None] & col_ok[:, :, j, None, :]
            out = torch.where(cover, val, out)
        return out[:, :, None]

    def __repr__(self) -> str:
        return (
            f"PlacementPatchSource(items={len(self)}, shape={self.shape}, "
            f"patch_size={self.patch_size}, dtype={self.dtype})"
        )


class DeviceLoader:
    """Batches of a :class:`DeviceMegapixelMNIST`, rendered on its device.

    Shuffling draws ``torch.randperm`` from ``generator`` (a CPU generator, so its state is
    checkpointed by :func:`ats_wsi.training.fit` like a DataLoader's); ``views``,
    ``patch_size`` and ``high_dtype`` are those of :meth:`DeviceMegapixelMNIST.batch`.
    """

    def __init__(
        self,
        data: DeviceMegapixelMNIST,
        batch_size: int,
        *,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        views: str = "ats",
        patch_size: int = 50,
        high_dtype: str = "uint8",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.data = data
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = generator
        self.views = views
        self.patch_size = int(patch_size)
        self.high_dtype = high_dtype

    def __len__(self) -> int:
        return math.ceil(len(self.data) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Any, Tensor]]:
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.data.batch(idx, self.views, self.patch_size, self.high_dtype)
