"""Per-slide forward passes, the slide training / evaluation loops, and single-slide inference.

Slides differ in size, so a "batch" is a loop of one-slide forwards whose gradients are
accumulated (``accumulate`` slides per optimiser step). Each forward: the slide's low-res view
at ``attention_mpp`` (from a :class:`~ats_wsi.io.prefetch.LowResItem`, loaded ahead by dask),
the tissue mask brought onto the attention grid (only tissue cells may be sampled), and the
sampled patches read at ``patch_mpp`` through a :class:`~ats_wsi.io.SlidePatchSource` in level-0
coordinates. Works under ``torch.distributed`` (DDP, gradients synchronised once per step).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_wsi.attention import entropy_regulariser, score_distillation, tile_scores
from ats_wsi.io import LowResItem, LowResLoader, Prefetcher, SlidePatchSource, mask_to_grid
from ats_wsi.io.readers import SlideReader, open_slide
from ats_wsi.model import ATSModel, ATSOutput, attention_logits
from ats_wsi.nets import ConvStack
from ats_wsi.settings import to_dict
from ats_wsi.slides.costs import SlideCost, SlideZoom, Stopwatch
from ats_wsi.slides.settings import (
    HE_MEAN,
    HE_STD,
    ModelSettings,
    SlideSettings,
    TrainSettings,
)
from ats_wsi.training import check_finite

__all__ = [
    "LowResBaseline",
    "SlideCost",
    "SlideResult",
    "SlideSettings",
    "SlideZoom",
    "ViewStore",
    "build_model",
    "classification_metrics",
    "opened",
    "predict_slide",
    "run_slides",
    "slide_forward",
    "slide_generator",
]


def build_model(model: ModelSettings, num_classes: int, patch_size: int) -> ATSModel:
    """The slide :class:`ATSModel` from a config's ``model`` section: the one recipe the
    trainer and every checkpoint loader use."""
    cfg = {**to_dict(model), "num_classes": num_classes, "patch_size": patch_size}
    return ATSModel.from_config(cfg)


def slide_generator(
    seed: int, slide_id: str, epoch: int = 0, device: Any = "cpu"
) -> torch.Generator:
    """A generator seeded from (seed, slide, epoch): the same draws whatever process runs it."""
    key = zlib.crc32(f"{seed}:{epoch}:{slide_id}".encode())
    return torch.Generator(device=device).manual_seed(key)


# Keyed by the net object itself (weakly): an id() key could be reused by another net.
_GRIDS: weakref.WeakKeyDictionary[nn.Module, dict[tuple[int, int], tuple[int, int]]] = (
    weakref.WeakKeyDictionary()
)


def attention_grid(net: nn.Module, low_shape: tuple[int, int, int], device: Any) -> tuple[int, int]:
    """(a_h, a_w) of ``net``'s map for a (C, h, w) view: from its :meth:`tiling` when it has
    one, else probed once per net and size (every slide of a cohort has its own size, and a
    probe is a forward over a whole view)."""
    c, h, w = (int(v) for v in low_shape)
    geo = net.tiling() if hasattr(net, "tiling") else None
    if geo is not None:
        return h // geo[1], w // geo[1]
    sizes = _GRIDS.setdefault(net, {})
    if (h, w) not in sizes:
        with torch.no_grad():
            probe = attention_logits(net, torch.zeros(1, c, h, w, device=device))
        sizes[(h, w)] = (int(probe.shape[-2]), int(probe.shape[-1]))
    return sizes[(h, w)]


def tissue_grid(
    item: LowResItem, grid: tuple[int, int], settings: SlideSettings, rf: int
) -> Tensor | None:
    """(1, a_h, a_w) bool mask of cells with enough tissue, or None without a tissue mask."""
    if item.mask is None or settings.min_tissue <= 0:
        return None
    cells = mask_to_grid(
        item.mask,
        grid,
        settings.min_tissue,
        receptive_field=rf,
        low_size=item.image.shape[:2],
        slide=item.path,
    )
    return torch.from_numpy(cells)[None]


class LowResBaseline(nn.Module):
    """The control model: sees only the low-res view (convs, mean + max over tissue, linear).

    It has the same input as the attention net, so whatever it cannot learn is not visible at
    the attention resolution.
    """

    def __init__(self, in_channels: int = 3, width: int = 16, num_classes: int = 2) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.trunk = ConvStack([in_channels, width, width, width], 3, "same", final_relu=True)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x_low: Tensor, mask: Tensor | None = None) -> Tensor:
        """``x_low`` (B, C, h, w) in [0, 1]; ``mask`` (B, h, w) bool tissue or None."""
        h = self.trunk((x_low - HE_MEAN) / HE_STD)
        if mask is None:
            mask = torch.ones(h.shape[0], *h.shape[-2:], dtype=torch.bool, device=h.device)
        m = mask[:, None].to(h.dtype)
        mean = (h * m).sum((-2, -1)) / m.sum((-2, -1)).clamp_min(1)
        peak = h.masked_fill(~mask[:, None], float("-inf")).amax((-2, -1))
        return self.head(torch.cat([mean, peak], 1))


# ----------------------------------------------------------------------------- views


class ViewStore:
    """Low-res views in a given order, loaded ahead on a dask client, optionally kept.

    Args:
        loader: path -> :class:`LowResItem` (runs on dask workers).
        depth: loads in flight; 0 loads synchronously in this process.
        client: dask client to use (one is started on first use otherwise).
        cache: keep every view in memory after its first load (small cohorts).
    """

    def __init__(
        self, loader: LowResLoader, depth: int = 4, client: Any = None, cache: bool = True
    ) -> None:
        self.loader = loader
        self.depth = depth
        self.client = client
        self.cache: dict[str, LowResItem] | None = {} if cache else None

    def iterate(self, paths: Sequence[str]) -> Iterator[tuple[str, LowResItem | Exception]]:
        """``(path, view or the exception its load raised)`` in the order of ``paths``."""
        cached = self.cache or {}
        missing = [p for p in paths if p not in cached]
        fetched: Iterator[tuple[str, Any]]
        if not missing:
            fetched = iter(())
        elif self.depth > 0:
            fetched = iter(Prefetcher(missing, self.loader, self.depth, client=self._client()))
        else:
            fetched = ((p, _safe(self.loader, p)) for p in missing)
        for p in paths:
            if p in cached:
                yield p, cached[p]
                continue
            _, item = next(fetched)
            if self.cache is not None and not isinstance(item, Exception):
                self.cache[p] = item
            yield p, item

    def _client(self) -> Any:
        if self.client is None:
            from distributed import Client

            # Threads: OpenSlide releases the GIL and nothing has to be pickled.
            self.client = Client(
                processes=False,
                n_workers=1,
                threads_per_worker=max(1, self.depth),
                dashboard_address=":0",
            )
        return self.client

    def close(self) -> None:
        """Close the dask client if this store started it."""
        if self.client is not None:
            self.client.close()
            self.client = None


def _safe(fn: Callable[[str], Any], p: str) -> Any:
    try:
        return fn(p)
    except Exception as e:  # handed to the caller like Prefetcher does
        return e


# ----------------------------------------------------------------------------- forwards


def _core(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") else model


SlideInput = str | os.PathLike[str] | SlideReader | Callable[[], SlideReader]


def opened(slide: SlideInput, settings: SlideSettings) -> contextlib.AbstractContextManager[Any]:
    """A context giving a reader for ``slide``: a path is opened with the settings' backend
    and mpp override (and closed after), a callable is called to open one (closed after), an
    open reader is used as it is (its owner closes it)."""
    if isinstance(slide, (str, os.PathLike)):
        return open_slide(slide, settings.backend, settings.slide_mpp)
    if callable(slide):
        return slide()
    return contextlib.nullcontext(slide)


def _view(item: LowResItem, model: nn.Module) -> Tensor:
    """The item's view as uint8 (1, C, h, w) with the channels the model takes; the model
    scales it block by block (:meth:`ats_wsi.model.ATSModel.prep_view`)."""
    x = item.pixels()
    channels = getattr(model, "in_channels", None)
    return x if channels is None else x[:, :channels]


def slide_forward(
    model: nn.Module,
    item: LowResItem,
    slide: SlideInput,
    settings: SlideSettings,
    device: torch.device,
    *,
    n_patches: int | None = None,
    sampler: str | None = None,
    generator: torch.Generator | None = None,
    feature_cache: Any = None,
) -> tuple[ATSOutput, Tensor | None]:
    """The one slide forward: an (optionally DDP-wrapped) :class:`ATSModel` on ``item``'s view,
    restricted to its tissue cells, patches read from ``slide`` at ``settings.patch_mpp``.

    Returns the model's output and the (1, a_h, a_w) tissue mask of the attention grid (None
    without a tissue mask). Train, predict, the tiatoolbox engine and the benchmarks use it.
    ``feature_cache`` (frozen pretrained encoders) is handed to :meth:`ATSModel.forward`.
    """
    core = _core(model)
    x_low = _view(item, core).to(device)
    grid = attention_grid(core.attention_net, tuple(x_low.shape[1:]), device)
    mask = tissue_grid(item, grid, settings, core.receptive_field)
    with (
        opened(slide, settings) as reader,
        SlidePatchSource(
            reader, settings.patch_size, settings.patch_mpp, settings.read_workers
        ) as source,
    ):
        out = model(
            x_low,
            source,
            None if mask is None else mask.to(device),
            n_patches=n_patches,
            sampler=sampler,
            generator=generator,
            feature_cache=feature_cache,
        )
    return out, mask


def baseline_slide_forward(
    model: nn.Module, item: LowResItem, settings: SlideSettings, device: torch.device
) -> Tensor:
    """One slide through the low-res-only baseline; returns logits (1, C)."""
    x_low = _view(item, _core(model)).to(device).float().div_(255)
    mask = None
    if item.mask is not None and settings.min_tissue > 0:
        mask = torch.from_numpy(item.mask)[None].to(device)
    return model(x_low, mask)


# ----------------------------------------------------------------------------- metrics


def classification_metrics(
    y: Sequence[int], probs: np.ndarray, losses: Sequence[float], prefix: str = ""
) -> dict[str, float | None]:
    """Mean loss, accuracy, balanced accuracy and ROC AUC (None when undefined)."""
    from sklearn.metrics import balanced_accuracy_score

    from ats_wsi.slides.export import roc_auc

    y_arr = np.asarray(y, dtype=np.int64)
    if len(y_arr) == 0:
        return {f"{prefix}n": 0}
    pred = probs.argmax(1)
    return {
        f"{prefix}loss": float(np.mean(losses)),
        f"{prefix}accuracy": float((pred == y_arr).mean()),
        f"{prefix}balanced_accuracy": float(balanced_accuracy_score(y_arr, pred)),
        f"{prefix}auc": roc_auc(y_arr, probs),
        f"{prefix}n": len(y_arr),
    }


# ----------------------------------------------------------------------------- loops


@dataclass
class SlideRecord:
    """One manifest row as the loops need it."""

    slide_id: str
    path: str
    y: int
    case_id: str = ""


def _autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager[Any]:
    if amp and device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def _optimizer_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, clip_norm: float | None
) -> None:
    """Clip (after unscaling, with a grad scaler), step, zero the gradients."""
    if scaler is not None:
        scaler.unscale_(optimizer)
    if clip_norm:
        nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _distillation(out: ATSOutput, scores: Tensor, beta: float) -> Tensor:
    """Score distillation of every level toward the head's scores of the tiles read: level
    0's cell map over all tiles, and with zoom-in sampling each region's level-1 attention
    over the tiles drawn in it (mean over regions)."""
    loss = score_distillation(out.probs.float(), out.indices, scores, beta)
    z = out.zoom
    if z is None:
        return loss
    inner = []
    for r in range(z.regions.shape[1]):
        drawn = z.tile_region == r
        inner.append(
            score_distillation(
                z.cell_probs[r : r + 1].float(), z.tile_cell[drawn][None], scores[:, drawn], beta
            )
        )
    return loss + torch.stack(inner).mean()


_EVAL_STEP = TrainSettings(entropy_lambda=0.0, accumulate=1, clip_norm=None)


def run_slides(
    model: nn.Module,
    records: Sequence[SlideRecord],
    views: ViewStore,
    settings: SlideSettings,
    *,
    kind: str = "ats",
    optimizer: torch.optim.Optimizer | None = None,
    step: TrainSettings | None = None,
    device: torch.device | str = "cpu",
    class_weights: Tensor | None = None,
    amp: bool = True,
    scaler: Any = None,
    sampler: str | None = None,
    n_patches: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    progress: Callable[[Iterable[Any]], Iterable[Any]] | None = None,
    where: str = "training",
    feature_cache: Any = None,
) -> tuple[list[int], np.ndarray, list[float], list[str]]:
    """Train (``optimizer`` given) or evaluate ``model`` over ``records``, one slide at a time.

    ``kind`` is ``"ats"`` (an :class:`ATSModel`) or ``"baseline"`` (:class:`LowResBaseline`).
    Training takes its step from ``step`` (a :class:`TrainSettings`; required with an
    ``optimizer``): gradients are accumulated over ``step.accumulate`` slides per optimiser
    step and clipped to ``step.clip_norm``; under DDP the gradient all-reduce happens only on
    the step's last slide. The loss of a slide is its class weight times its cross-entropy (a
    per-sample weight: ``F.cross_entropy(weight=...)`` would divide it out again for a one-slide
    batch) plus ``step.entropy_lambda`` times the entropy regulariser, plus
    ``step.distill_lambda`` times :func:`~ats_wsi.attention.score_distillation` of the attention
    toward the head's :func:`~ats_wsi.attention.tile_scores` of the patches it read (no
    gradient into the head or the features from that term).

    A NaN or infinite training loss raises :class:`~ats_wsi.training.NonFiniteLossError`
    naming ``where``, the optimiser step and the slide, before its backward pass.

    Returns (targets, probabilities (n, C), losses, slide ids) of the slides seen, in order.
    """
    device = torch.device(device)
    train = optimizer is not None
    if train and step is None:
        raise ValueError("run_slides: training (an optimizer) needs its step settings")
    # Evaluation backpropagates nothing: only its cross-entropy is reported.
    step = step if train else _EVAL_STEP
    model.train(train)
    weights = None if class_weights is None else class_weights.to(device)
    ys: list[int] = []
    probs: list[np.ndarray] = []
    losses: list[float] = []
    ids: list[str] = []
    by_path = {r.path: r for r in records}
    stream: Iterable[Any] = views.iterate([r.path for r in records])
    if progress is not None:
        stream = progress(stream)
    n = len(records)
    if train:
        optimizer.zero_grad(set_to_none=True)
    for k, (path, item) in enumerate(stream):
        rec = by_path[path]
        if isinstance(item, Exception):
            raise item
        last_of_step = (k + 1) % step.accumulate == 0 or k == n - 1
        sync = contextlib.nullcontext()
        if train and not last_of_step and hasattr(model, "no_sync"):
            sync = model.no_sync()
        target = torch.tensor([rec.y], device=device)
        with sync, torch.set_grad_enabled(train):
            with _autocast(device, amp):
                if kind == "ats":
                    gen = slide_generator(seed, rec.slide_id, epoch, device)
                    out, _ = slide_forward(
                        model,
                        item,
                        item.path,
                        settings,
                        device,
                        n_patches=n_patches,
                        sampler=sampler,
                        generator=gen,
                        feature_cache=feature_cache,
                    )
                    logits, att = out.logits, out.probs
                    if step.distill_lambda and train:
                        with torch.no_grad():
                            scores = tile_scores(_core(model).head(out.features.float()))
                else:
                    logits, att = baseline_slide_forward(model, item, settings, device), None
            logits = logits.float()
            ce = F.cross_entropy(logits, target, reduction="none")[0]
            loss = ce * (weights[rec.y] if weights is not None else 1.0)
            if step.entropy_lambda and att is not None:
                loss = loss + step.entropy_lambda * entropy_regulariser(att.float())
            if step.distill_lambda and train and kind == "ats":
                distill = _distillation(out, scores, step.distill_beta)
                loss = loss + step.distill_lambda * distill
            if train:
                at = f"{where}, step {k // step.accumulate + 1}, slide {rec.slide_id}"
                check_finite(loss, at)
                scaled = loss / step.accumulate
                (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if train and last_of_step:
            _optimizer_step(model, optimizer, scaler, step.clip_norm)
        ys.append(rec.y)
        probs.append(torch.softmax(logits.detach(), 1)[0].cpu().numpy())
        losses.append(float(ce.detach()))
        ids.append(rec.slide_id)
    width = probs[0].shape[0] if probs else 0
    return ys, np.array(probs).reshape(len(probs), width), losses, ids


# ----------------------------------------------------------------------------- inference


@dataclass
class SlideResult:
    """What inference produced for one slide (arrays are numpy, coordinates level-0).

    ``locations_xy`` are the top-left (x, y) of the sampled patches in draw order, ``scores``
    their attention (with zoom: each tile's probability under the nested distribution,
    :meth:`~ats_wsi.model.ZoomOutput.tile_probability`), ``patches`` (N, 3, p, p) float in
    [0, 1]. ``zoom`` holds the regions and level-1 attention (None for one level), ``cost``
    what was read and computed.
    """

    probs: np.ndarray
    attention: np.ndarray
    mask: np.ndarray | None
    locations_xy: np.ndarray
    scores: np.ndarray
    patches: np.ndarray
    patch_size_level0: int
    thumbnail: np.ndarray
    dimensions: tuple[int, int]
    mpp: tuple[float, float]
    runtime_s: float
    features: np.ndarray | None = None  # (N, D) the sampled patches' features
    zoom: SlideZoom | None = None
    cost: SlideCost | None = None

    def summary(self) -> dict[str, Any]:
        """Plain-data fields for logs."""
        d = asdict(self)
        for k in ("attention", "mask", "locations_xy", "scores", "patches", "thumbnail", "probs"):
            d.pop(k)
        d.pop("features")
        zoom = d.pop("zoom")
        if zoom is not None:
            d["regions"] = len(zoom["regions_xywh"])
        return d


@torch.no_grad()
def predict_slide(
    model: ATSModel,
    slide: SlideInput,
    settings: SlideSettings,
    *,
    device: torch.device | str = "cpu",
    sampler: str = "topk",
    n_patches: int | None = None,
    seed: int = 0,
    slide_id: str = "",
    item: LowResItem | None = None,
) -> SlideResult:
    """Run one slide (a path, an open reader or a callable opening one), opened once.

    ``item`` is the slide's low-res view and tissue mask when already loaded (prefetched, or
    with a user mask); otherwise it is read from the same reader. A zoom model's regions and
    level-1 attention are in the result's ``zoom``. Raises the slide's I/O errors; callers
    turn them into error rows.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    model.eval()
    core = _core(model)
    watch = Stopwatch(getattr(core, "zoom_net", None))
    try:
        with opened(slide, settings) as reader:
            if item is None:
                path = slide if isinstance(slide, (str, os.PathLike)) else None
                item = settings.loader().read(reader, path)
            gen = slide_generator(seed, slide_id or item.path, 0, device)
            out, mask = slide_forward(
                model,
                item,
                reader,
                settings,
                device,
                n_patches=n_patches,
                sampler=sampler,
                generator=gen,
            )
    finally:
        watch.close()
    locations = out.locations[0].cpu().numpy()
    zoom = None if out.zoom is None else SlideZoom.of(out, core.zoom.region_mpp)
    if out.zoom is None:
        scores = out.probs[0, out.indices[0]]
    else:
        scores = out.zoom.tile_probability()
    side = int(out.patches.shape[-1])
    runtime = time.perf_counter() - t0
    cost = SlideCost.of(out, item.image.shape, side, watch.seconds, runtime)
    return SlideResult(
        probs=torch.softmax(out.logits.float(), 1)[0].cpu().numpy(),
        attention=out.attention[0].float().cpu().numpy(),
        mask=None if mask is None else mask[0].numpy(),
        locations_xy=locations[:, ::-1].copy(),
        scores=scores.float().cpu().numpy(),
        patches=out.patches[0].float().clamp(0, 1).cpu().numpy(),
        patch_size_level0=int(out.patches.shape[-1] * settings.patch_mpp / item.mpp[0] + 0.5),
        thumbnail=item.image,
        dimensions=item.dimensions,
        mpp=item.mpp,
        runtime_s=runtime,
        features=out.features[0].float().cpu().numpy(),
        zoom=zoom,
        cost=cost,
    )
