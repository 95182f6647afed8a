"""The single-level attention-sampling model (ATS_SPEC 1, docs/architecture.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ats_wsi.attention import attention_distribution
from ats_wsi.estimators import expectation
from ats_wsi.mapping import GridMapping
from ats_wsi.nets import build_attention_net, build_feature_net
from ats_wsi.patches import PatchSource, TensorPatchSource
from ats_wsi.sampling import SAMPLERS, sample

__all__ = ["ATSModel", "ATSOutput", "attend"]


def attend(
    attention_net: nn.Module,
    view: Tensor,
    mask: Tensor | None,
    smoothing: float,
    n: int,
    mode: str,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One attention level: logits (B,1,h,w), probs (B,K) and ``n`` sampled indices (B,n).

    ``n`` is capped at the cells with non-zero probability for samplers that draw distinct
    cells; counted on probs, not the mask, because an unsmoothed softmax can underflow to 0.
    """
    logits = attention_net(view)
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
    """

    logits: Tensor
    attention: Tensor
    probs: Tensor
    indices: Tensor
    locations: Tensor
    patches: Tensor | None
    features: Tensor


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
            x_low: (B, C, h, w) low-resolution views.
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
        batch = x_low.shape[0]

        view = (x_low - self.input_mean) / self.input_std if self.normalize else x_low
        logits, probs, indices = attend(
            self.attention_net, view, mask, self.smoothing, n, mode, generator
        )
        n = indices.shape[1]

        mapping = GridMapping(
            low_size=tuple(x_low.shape[-2:]),
            high_size=tuple(source.shape),
            attention_size=tuple(logits.shape[-2:]),
            receptive_field=self.receptive_field,
            patch_size=source.patch_size,
        )
        locations = mapping.top_left(indices)
        if feature_cache is not None and self._cacheable(source):
            patches, features = None, self._cached_features(source, locations, feature_cache)
            features = features.to(x_low.device).view(batch, n, -1)
        else:
            patches = source.extract(locations)
            if patches.shape[:2] != (batch, n):
                raise ValueError(f"source returned {tuple(patches.shape)} for {batch} x {n} boxes")
            patches = patches.to(device=x_low.device)
            features = self._features(patches).view(batch, n, -1)
        baseline = None if self.baseline_momentum is None else self.feature_mean.clone()
        estimate = expectation(probs, features, indices, mode, baseline)
        if self.training and self.baseline_momentum is not None:
            with torch.no_grad():
                self.feature_mean.lerp_(estimate.mean(dim=0), 1 - self.baseline_momentum)
        return ATSOutput(
            logits=self.head(estimate),
            attention=probs.view(batch, *logits.shape[-2:]),
            probs=probs,
            indices=indices,
            locations=locations,
            patches=patches,
            features=features,
        )
