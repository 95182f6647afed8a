"""The attention-sampling model (ATS_SPEC 1, docs/architecture.md), with optional zoom-in
sampling over a second level (ATS_SPEC 1.5, :mod:`ats_wsi.zoom`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_wsi.attention import attention_distribution
from ats_wsi.estimators import expectation
from ats_wsi.mapping import GridMapping
from ats_wsi.nets import build_attention_net, build_feature_net
from ats_wsi.patches import PatchSource, TensorPatchSource
from ats_wsi.sampling import SAMPLERS, sample
from ats_wsi.zoom import RegionGrid, cell_mask, draw_in_regions, region_logits, zoom_expectation

__all__ = ["ATSModel", "ATSOutput", "ZoomLevel", "ZoomOutput", "attend", "attention_logits"]


def attention_logits(
    net: nn.Module,
    view: Tensor,
    mask: Tensor | None = None,
    prep: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """``net(prep(view))``; without autograd, block by block when the net supports it
    (:meth:`~ats_wsi.nets.AttentionNet.forward_blocks`), so inference on a whole slide's view
    never holds all its activations (nor a float copy of the view) at once, and blocks with no
    cell of ``mask`` (bool (B, h, w), True = may be sampled) are skipped: their cells, which
    get probability 0 anyway, have logit 0. ``prep``: elementwise input preparation (uint8 to
    [0, 1], normalisation), applied to each block."""
    if not torch.is_grad_enabled() and hasattr(net, "forward_blocks"):
        return net.forward_blocks(view, keep=mask, prep=prep)
    return net(view if prep is None else prep(view))


def attend(
    attention_net: nn.Module,
    view: Tensor,
    mask: Tensor | None,
    smoothing: float,
    n: int,
    mode: str,
    generator: torch.Generator | None = None,
    prep: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One attention level: logits (B,1,h,w), probs (B,K) and ``n`` sampled indices (B,n).
    ``prep``: as in :func:`attention_logits`.

    ``n`` is capped at the cells with non-zero probability for samplers that draw distinct
    cells; counted on probs, not the mask, because an unsmoothed softmax can underflow to 0.
    """
    logits = attention_logits(attention_net, view, mask, prep)
    probs = attention_distribution(logits, mask, smoothing)
    if mode != "with_replacement":
        n = min(n, int((probs > 0).sum(dim=1).min()))
    return logits, probs, sample(probs, n, mode, generator)


@dataclass
class ATSOutput:
    """Everything one forward pass produced (B samples, N patches, K = h * w cells).

    Attributes:
        logits: (B, num_classes) class scores (before softmax).
        attention: (B, h, w) attention probabilities (the map of ``probs``).
        probs: (B, K) the same distribution, flat and row-major.
        indices: (B, N) sampled cells in draw order.
        locations: (B, N, 2) top-left (y, x) of each patch in the source's pixel units.
        patches: (B, N, C, p, p) the patches as the source returned them (before the
            model's input normalisation); None when a feature cache supplied the features.
        features: (B, N, D) L2-normalised patch features.
        zoom: the zoom-in level's regions and inner attention (None for one level); then
            ``attention`` / ``probs`` are level 0's cell map the regions are pooled from and
            ``indices`` the cells of the tiles read, region by region.
    """

    logits: Tensor
    attention: Tensor
    probs: Tensor
    indices: Tensor
    locations: Tensor
    patches: Tensor | None
    features: Tensor
    zoom: ZoomOutput | None = None


@dataclass
class ZoomLevel:
    """The second attention level of zoom-in sampling (see :mod:`ats_wsi.zoom`).

    Attributes:
        attention_net: (R, C, h, w) region views -> (R, 1, a, b) logits, average-pooled onto
            the region's ``region_cells`` x ``region_cells`` cells.
        n_regions: regions N0 sampled by level 0 (``n_patches`` cells are drawn in each).
        region_cells: region side in level-0 attention cells.
        region_stride: cells between region origins (0: ``region_cells``, no overlap).
        region_mpp: resolution of the region views, in the source's ``mpp`` units.
    """

    attention_net: nn.Module
    n_regions: int
    region_cells: int = 4
    region_stride: int = 0
    region_mpp: float = 4.0

    def __post_init__(self) -> None:
        if self.n_regions < 1 or self.region_cells < 1 or self.region_mpp <= 0:
            raise ValueError(
                "zoom needs n_regions >= 1, region_cells >= 1 and region_mpp > 0, got "
                f"{self.n_regions}, {self.region_cells}, {self.region_mpp}"
            )
        self.region_stride = self.region_stride or self.region_cells


@dataclass
class ZoomOutput:
    """What the zoom-in level looked at (one sample; R regions drawn, T tiles in all).

    Attributes:
        region_probs: (1, M) level-0 distribution over all regions.
        regions: (1, R) sampled regions in draw order.
        region_top_left: (R, 2) top-left (y, x) of each region's box, source pixels.
        region_box: (h, w) of the region boxes, source pixels.
        region_grid: (r_h, r_w) regions per axis.
        members: (R, S) level-0 cells of each region (-1: past the grid edge).
        cell_probs: (R, S) level-1 attention inside each region.
        tile_region: (T,) which sampled region (0..R-1) each tile was drawn in.
        tile_cell: (T,) the tile's position inside its region (column of ``members``).
        region_pixels: region-view pixels read (R * h * w at ``region_mpp``).
    """

    region_probs: Tensor
    regions: Tensor
    region_top_left: Tensor
    region_box: tuple[int, int]
    region_grid: tuple[int, int]
    members: Tensor
    cell_probs: Tensor
    tile_region: Tensor
    tile_cell: Tensor
    region_pixels: int

    def tile_probability(self) -> Tensor:
        """(T,) each tile's probability under the nested distribution through its region:
        ``a_0(region) * a_1(tile | region)``."""
        region = self.region_probs[0, self.regions[0, self.tile_region]]
        return region * self.cell_probs[self.tile_region, self.tile_cell]


def _channel_tensor(value: float | list[float] | None) -> Tensor:
    """Scalar or per-channel statistics as a tensor broadcasting over (..., C, H, W)."""
    if value is None:
        return torch.zeros(())
    return torch.as_tensor(value, dtype=torch.float32).reshape(-1, 1, 1).squeeze(0)


class ATSModel(nn.Module):
    """Attention net on the low-res view, sampling, feature net on full-res patches, linear head.

    Args:
        attention_net: (B, C, h, w) -> (B, 1, a_h, a_w) logits; must have ``receptive_field``.
        feature_net: (M, C, p, p) -> (M, D) L2-normalised; must have ``out_dim``.
        num_classes: outputs of the linear head.
        n_patches: patches per sample N (clamped to the allowed cells when sampling without
            replacement or top-k).
        patch_size: box side used when ``forward`` is given a plain tensor instead of a
            :class:`PatchSource` (a source's own ``patch_size`` always wins).
        sampler: ``with_replacement``, ``without_replacement`` or ``topk``; also selects the
            estimator of the same name.
        smoothing: eps of the attention smoothing ``(1 - eps) a + eps / K``.
        baseline_momentum: momentum of the running mean of past estimates (one vector for all
            samples) used as the estimators' control variate (see :mod:`ats_wsi.estimators`);
            ``None`` disables it. The running mean is updated after the current estimate, so it
            never depends on the current draws and the gradients stay exactly unbiased. On by
            default because, measured exactly (docs/estimators.md), a dataset-wide mean feature
            cut the summed logit-gradient variance of 40 problems with non-negative features to
            0.14-0.20x, though it raised the variance of 20 % of them.
        in_channels: image channels the nets take (the first ``in_channels`` of a view are used
            by front ends that read RGB slides).
        zoom: zoom-in sampling (:mod:`ats_wsi.zoom`), None for one level. A
            :class:`ZoomLevel`: its ``n_regions`` regions of ``region_cells`` x
            ``region_cells`` attention cells are sampled first, each is read at
            ``region_mpp`` (through the source's ``read_regions``) and scored by its
            ``attention_net``, and ``n_patches`` cells are sampled inside each region.
        input_mean, input_std: per-channel (or scalar) normalisation ``(x - mean) / std`` applied
            inside the model to the low-res view and to the patches, so callers hand it images
            in [0, 1]; None: no normalisation. A feature net with ``normalizes_input = True``
            (pretrained encoders, :mod:`ats_wsi.encoders`) gets the raw patches and normalises
            them itself. Stored in the config, not the state dict.
    """

    def __init__(
        self,
        attention_net: nn.Module,
        feature_net: nn.Module,
        num_classes: int,
        n_patches: int,
        patch_size: int,
        sampler: str = "without_replacement",
        smoothing: float = 0.0,
        baseline_momentum: float | None = 0.9,
        in_channels: int | None = None,
        input_mean: float | list[float] | None = None,
        input_std: float | list[float] | None = None,
        zoom: ZoomLevel | None = None,
    ) -> None:
        super().__init__()
        for attr, net in (("receptive_field", attention_net), ("out_dim", feature_net)):
            if not hasattr(net, attr):
                raise TypeError(f"{type(net).__name__} has no {attr!r} attribute")
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; available: {sorted(SAMPLERS)}")
        if n_patches < 1 or patch_size < 1:
            raise ValueError("n_patches and patch_size must be positive")
        self.attention_net = attention_net
        self.feature_net = feature_net
        self.head = nn.Linear(int(feature_net.out_dim), num_classes)
        self.receptive_field = int(attention_net.receptive_field)
        self.n_patches = int(n_patches)
        self.patch_size = int(patch_size)
        self.sampler = sampler
        self.smoothing = float(smoothing)
        self.baseline_momentum = baseline_momentum
        self.register_buffer("feature_mean", torch.zeros(int(feature_net.out_dim)))
        self.in_channels = in_channels
        if (input_mean is None) != (input_std is None):
            raise ValueError("give both input_mean and input_std, or neither")
        self.normalize = input_mean is not None
        # Non-persistent: the normalisation is configuration, and checkpoints stay loadable.
        self.register_buffer("input_mean", _channel_tensor(input_mean), persistent=False)
        self.register_buffer("input_std", _channel_tensor(input_std), persistent=False)
        self.patch_normalize = self.normalize and not getattr(
            feature_net, "normalizes_input", False
        )
        self.zoom = zoom
        # A registered submodule only when zooming: single-level state dicts stay as they were.
        self.zoom_net = None if zoom is None else zoom.attention_net

    def _features(self, patches: Tensor) -> Tensor:
        """(B, N, C, p, p) patches -> (B * N, D) features (the model's normalisation first)."""
        seen = (patches - self.input_mean) / self.input_std if self.patch_normalize else patches
        return self.feature_net(seen.reshape(-1, *patches.shape[2:]))

    def _cacheable(self, source: Any) -> bool:
        if not hasattr(source, "box_keys"):
            return False
        from ats_wsi.encoders.protocol import PatchEncoder  # imports no timm

        return isinstance(self.feature_net, PatchEncoder) and bool(self.feature_net.fully_frozen)

    def _cached_features(self, source: Any, locations: Tensor, cache: Any) -> Tensor:
        from ats_wsi.encoders import FeatureKey

        enc = self.feature_net.encoder_id
        keys = [FeatureKey.of(*k, enc) for k in source.box_keys(locations)]
        flat = locations.reshape(1, -1, 2)

        def compute(idx: list[int]) -> Tensor:
            patches = source.extract(flat[:, idx]).to(locations.device)
            return self._features(patches)

        return cache.fetch(keys, compute)

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> ATSModel:
        """Build from plain data, e.g. parsed YAML.

        ``attention_net`` and ``feature_net`` are a registry name or a mapping
        ``{"name": ..., **constructor kwargs}``; the other keys are ``__init__`` arguments.
        """
        cfg = dict(cfg)

        def build(key: str, builder: Any) -> nn.Module:
            spec = cfg.pop(key)
            if isinstance(spec, str):
                return builder(spec)
            spec = dict(spec)
            return builder(spec.pop("name"), **spec)

        attention_net = build("attention_net", build_attention_net)
        feature_net = build("feature_net", build_feature_net)
        zoom = dict(cfg.pop("zoom", None) or {})
        cfg["zoom"] = None
        if zoom.get("n_regions", 0):
            net = zoom.pop("attention_net")
            net = {"name": net} if isinstance(net, str) else dict(net)
            cfg["zoom"] = ZoomLevel(build_attention_net(net.pop("name"), **net), **zoom)
        return cls(attention_net, feature_net, **cfg)

    def forward(
        self,
        x_low: Tensor,
        source: PatchSource | Tensor,
        mask: Tensor | None = None,
        *,
        n_patches: int | None = None,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
        feature_cache: Any = None,
    ) -> ATSOutput:
        """Run the model on a batch.

        Args:
            x_low: (B, C, h, w) low-resolution views, float in [0, 1] or uint8 (converted
                block by block, see :meth:`prep_view`).
            source: where patches come from; a (B, C, H, W) tensor is wrapped in a
                :class:`TensorPatchSource` with this model's ``patch_size``.
            mask: optional bool (B, a_h, a_w) at attention resolution; True = may be sampled.
            n_patches, sampler: per-call overrides (e.g. more patches or ``topk`` at inference).
            generator: makes the sampling reproducible.
            feature_cache: an :class:`ats_wsi.encoders.FeatureCache`; used when the feature net
                is a fully frozen encoder and the source names its boxes (``box_keys``, as
                :class:`~ats_wsi.io.SlidePatchSource` does): cached boxes are neither read
                nor encoded again. The attention net still trains through the estimator.
        """
        if isinstance(source, Tensor):
            source = TensorPatchSource(source, self.patch_size)
        mode = self.sampler if sampler is None else sampler
        n = self.n_patches if n_patches is None else int(n_patches)
        if self.zoom is not None:
            return self._zoom_forward(x_low, source, mask, n, mode, generator, feature_cache)
        logits, probs, indices = attend(
            self.attention_net, x_low, mask, self.smoothing, n, mode, generator, self.prep_view
        )
        locations = self._mapping(x_low, source, logits).top_left(indices)
        patches, features = self._read(source, locations, feature_cache, x_low.device)
        baseline = None if self.baseline_momentum is None else self.feature_mean.clone()
        estimate = expectation(probs, features, indices, mode, baseline)
        return self._output(estimate, logits, probs, indices, locations, patches, features)

    def prep_view(self, x: Tensor) -> Tensor:
        """A view (or a block of one) as the attention nets take it: uint8 scaled to [0, 1],
        then the model's normalisation. Elementwise, so blocks give the whole view's values."""
        if not x.is_floating_point():
            x = x.float().div_(255)
        return (x - self.input_mean) / self.input_std if self.normalize else x

    def _mapping(self, view: Tensor, source: PatchSource, logits: Tensor) -> GridMapping:
        """Level 0's cells -> boxes of ``source.patch_size`` in the source's pixels."""
        return GridMapping(
            low_size=tuple(view.shape[-2:]),
            high_size=tuple(source.shape),
            attention_size=tuple(logits.shape[-2:]),
            receptive_field=self.receptive_field,
            patch_size=source.patch_size,
        )

    def _read(
        self, source: PatchSource, locations: Tensor, feature_cache: Any, device: torch.device
    ) -> tuple[Tensor | None, Tensor]:
        """Patches (B, N, C, p, p) (None when cached) and features (B, N, D) at ``locations``."""
        batch, n = locations.shape[:2]
        if feature_cache is not None and self._cacheable(source):
            features = self._cached_features(source, locations, feature_cache)
            return None, features.to(device).view(batch, n, -1)
        patches = source.extract(locations)
        if patches.shape[:2] != (batch, n):
            raise ValueError(f"source returned {tuple(patches.shape)} for {batch} x {n} boxes")
        patches = patches.to(device=device)
        return patches, self._features(patches).view(batch, n, -1)

    def _output(
        self,
        estimate: Tensor,
        logits: Tensor,
        probs: Tensor,
        indices: Tensor,
        locations: Tensor,
        patches: Tensor | None,
        features: Tensor,
        zoom: ZoomOutput | None = None,
    ) -> ATSOutput:
        if self.training and self.baseline_momentum is not None:
            with torch.no_grad():
                self.feature_mean.lerp_(estimate.mean(dim=0), 1 - self.baseline_momentum)
        return ATSOutput(
            logits=self.head(estimate),
            attention=probs.view(probs.shape[0], *logits.shape[-2:]),
            probs=probs,
            indices=indices,
            locations=locations,
            patches=patches,
            features=features,
            zoom=zoom,
        )

    def _zoom_forward(
        self,
        view: Tensor,
        source: Any,
        mask: Tensor | None,
        n: int,
        mode: str,
        generator: torch.Generator | None,
        feature_cache: Any,
    ) -> ATSOutput:
        """Two levels (:mod:`ats_wsi.zoom`): regions from level 0's cell map, ``n`` cells
        inside each region from its view at ``zoom.region_mpp``, read, encoded, nested."""
        zoom = self.zoom
        assert zoom is not None
        if view.shape[0] != 1:
            raise ValueError(f"zoom-in sampling takes one sample at a time, got {view.shape[0]}")
        if not hasattr(source, "read_regions"):
            raise TypeError(f"{type(source).__name__} cannot read zoom-in regions")
        logits = attention_logits(self.attention_net, view, mask, self.prep_view)
        flat_mask = None if mask is None else mask.reshape(1, -1)
        probs = attention_distribution(logits, flat_mask, self.smoothing)
        regions_of = RegionGrid(tuple(logits.shape[-2:]), zoom.region_cells, zoom.region_stride)
        every = regions_of.members().to(view.device)
        rlogits, rmask = region_logits(logits.flatten(1), every, flat_mask)
        region_probs = attention_distribution(rlogits[:, None], rmask, self.smoothing)
        n0 = zoom.n_regions
        if mode != "with_replacement":
            n0 = min(n0, int((region_probs > 0).sum()))
        regions = sample(region_probs, n0, mode, generator)
        members = every[regions[0]]
        mapping = self._mapping(view, source, logits)
        top_left, box = mapping.block_boxes(regions_of.origin(regions[0]), zoom.region_cells)
        scale = float(source.mpp) / zoom.region_mpp
        out = (max(1, round(box[0] * scale)), max(1, round(box[1] * scale)))
        rviews = source.read_regions(top_left[None], box, out)[0].to(view.device)
        channels = view.shape[1]
        rviews = self.prep_view(rviews[:, :channels])
        side = zoom.region_cells
        inner_logits = F.adaptive_avg_pool2d(self.zoom_net(rviews), (side, side))
        inner_probs = attention_distribution(
            inner_logits, cell_mask(members, flat_mask), self.smoothing
        )
        drawn = draw_in_regions(inner_probs, n, mode, generator)
        tile_region = torch.cat(
            [torch.full((len(d),), r, dtype=torch.long) for r, d in enumerate(drawn)]
        ).to(view.device)
        tile_cell = torch.cat(drawn)
        cells = members[tile_region, tile_cell][None]
        locations = mapping.top_left(cells)
        patches, features = self._read_unique(source, locations, feature_cache, view.device)
        baseline = None if self.baseline_momentum is None else self.feature_mean.clone()
        estimate = zoom_expectation(
            region_probs, regions, inner_probs, drawn, features[0], mode, baseline
        )
        info = ZoomOutput(
            region_probs=region_probs,
            regions=regions,
            region_top_left=top_left,
            region_box=box,
            region_grid=regions_of.shape,
            members=members,
            cell_probs=inner_probs,
            tile_region=tile_region,
            tile_cell=tile_cell,
            region_pixels=int(regions.shape[1] * out[0] * out[1]),
        )
        return self._output(estimate, logits, probs, cells, locations, patches, features, info)

    def _read_unique(
        self, source: PatchSource, locations: Tensor, feature_cache: Any, device: torch.device
    ) -> tuple[Tensor | None, Tensor]:
        """:meth:`_read`, each distinct box once (overlapping regions can draw a tile twice)."""
        unique, inverse = torch.unique(locations[0], dim=0, return_inverse=True)
        patches, features = self._read(source, unique[None], feature_cache, device)
        return (None if patches is None else patches[:, inverse]), features[:, inverse]
