"""The slide workflow's settings: one dataclass per config section, validated once.

``TrainConfig`` is the schema of ``python -m pipelines.train_slides --config``'s YAML (and of
the ``config`` a slide checkpoint stores); :func:`ats_wsi.settings.parse` turns plain data into
it with one-line errors naming the file and the dotted key, :func:`ats_wsi.settings.to_dict`
turns it back. The engine, the trainer, the predictor and the tiatoolbox engine take these
objects, never nested dicts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ats_wsi.io.mpp import MppSpec
from ats_wsi.io.prefetch import LowResLoader

__all__ = [
    "HE_MEAN",
    "HE_STD",
    "BaselineSettings",
    "DataSettings",
    "ModelSettings",
    "PredictSettings",
    "SlideSettings",
    "TrainConfig",
    "TrainSettings",
    "ZoomSettings",
]

# H&E pixels in [0, 1] are centred and scaled inside the models (fixed, not learnt, so that a
# checkpoint carries no data-dependent statistics): the slide config's model defaults.
HE_MEAN, HE_STD = 0.5, 0.25


@dataclass
class DataSettings:
    """Where the slides and labels come from (``data:``)."""

    manifest: str | None = None  # None: build the demo cohort
    slide_dir: str | None = None
    val_fraction: float = 0.2
    test_fraction: float = 0.25
    mpp: float | None = None  # level-0 mpp of slides whose file and manifest give none
    mpp_override: bool = False  # the manifest's / data.mpp wins over metadata
    # TRIDENT / CLAM feature h5s of the slides: train without reading or encoding their tiles.
    features_dir: str | None = None


@dataclass(frozen=True)
class SlideSettings:
    """Where the model reads a slide (resolutions in microns per pixel; ``slides:``).

    Attributes:
        attention_mpp: resolution of the low-res view the attention net sees.
        patch_mpp: resolution of the patches the feature net sees.
        patch_size: patch side in pixels at ``patch_mpp``.
        min_tissue: tissue fraction a cell needs to be sampled; 0 disables the tissue mask.
        backend: reader backend (None: from the file name).
        slide_mpp: level-0 mpp overriding the file's metadata, or an :class:`MppSpec`.
        read_workers: threads reading the patches of one slide.
    """

    attention_mpp: float = 16.0
    patch_mpp: float = 0.5
    patch_size: int = 32
    min_tissue: float = 0.1
    backend: str | None = None
    slide_mpp: float | MppSpec | None = None
    read_workers: int = 4

    def loader(self) -> LowResLoader:
        """The picklable low-res view loader for these settings."""
        return LowResLoader(
            mpp=self.attention_mpp,
            tissue=self.min_tissue > 0,
            backend=self.backend,
            slide_mpp=self.slide_mpp,
        )


def _net(name: str, width: int) -> Any:
    return field(default_factory=lambda: {"name": name, "width": width})


@dataclass
class ZoomSettings:
    """Zoom-in sampling (``model.zoom:``; slides.md): ``n_regions`` 0 keeps one level.

    Level 0 samples ``n_regions`` regions of ``region_cells`` x ``region_cells`` attention
    cells (one every ``region_stride`` cells; 0: ``region_cells``); each is read once at
    ``region_mpp`` um/px and scored by ``attention_net``; ``model.n_patches`` tiles are then
    sampled inside each region.
    """

    n_regions: int = 0
    region_cells: int = 4
    region_stride: int = 0
    region_mpp: float = 4.0
    attention_net: dict[str, Any] | str = _net("histology", 8)


@dataclass
class ModelSettings:
    """The slide :class:`~ats_wsi.model.ATSModel` (``model:``); nets are registry specs."""

    attention_net: dict[str, Any] | str = _net("histology", 8)
    feature_net: dict[str, Any] | str = _net("histology", 16)
    n_patches: int = 16
    sampler: str = "without_replacement"
    smoothing: float = 1e-4
    in_channels: int = 3
    input_mean: float | list[float] = HE_MEAN
    input_std: float | list[float] = HE_STD
    zoom: ZoomSettings = field(default_factory=ZoomSettings)


@dataclass
class TrainSettings:
    """The optimisation (``train:``)."""

    epochs: int = 40
    lr: float = 1e-3
    head_lr_multiplier: float = 30.0
    encoder_lr: float | None = None  # trainable blocks of a pretrained encoder; None: lr
    weight_decay: float = 0.0
    accumulate: int = 2
    entropy_lambda: float = 1e-2
    distill_lambda: float = 0.0  # attention toward the head's tile scores (slides.md)
    distill_beta: float = 2.0
    clip_norm: float | None = 1.0
    class_balanced: bool = True
    amp: bool = True
    device: str = "auto"
    prefetch_depth: int = 4
    cache_views: bool = True
    # Features of a frozen pretrained encoder, kept across epochs (0 disables).
    feature_cache_mb: float = 1024
    feature_cache_dir: str | None = None
    select_metric: str = "val_loss"
    eval_sampler: str = "topk"
    eval_every: int = 1
    time_budget_s: float | None = None
    torch_threads: int | None = None
    progress: bool | None = None


@dataclass
class BaselineSettings:
    """The low-res-only baseline (``baseline:``)."""

    enabled: bool = True
    epochs: int | None = None  # None: same as ATS
    lr: float = 3e-3
    width: int = 16


@dataclass
class PredictSettings:
    """Predicting the test split after training (``predict:``)."""

    enabled: bool = True
    sampler: str = "topk"
    n_patches: int | None = None
    heatmaps: bool = True
    gallery: bool = True
    zarr: bool = True
    geojson: bool = True
    workers: int = 0
    scheduler_address: str | None = None


@dataclass
class TrainConfig:
    """A ``train_slides`` config: every section, with its defaults."""

    seed: int = 0
    classes: list[str] | None = None
    data: DataSettings = field(default_factory=DataSettings)
    demo: dict[str, Any] = field(default_factory=dict)
    slides: SlideSettings = field(default_factory=SlideSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    baseline: BaselineSettings = field(default_factory=BaselineSettings)
    predict: PredictSettings = field(default_factory=PredictSettings)
