"""Nested (zoom-in) attention sampling over two or more resolution levels (ATS_SPEC 1.5).

Level 0 attends over a low-resolution view of the whole image and samples regions; each deeper
level attends inside the regions sampled by the level above and samples sub-boxes; the last
level's boxes are the patches seen by the feature network. The estimate is the nested
expectation ``E_{r~a_0} E_{k~a_1(r)} ... f``, computed by applying the single-level estimators
from the innermost level outwards. Because every single-level estimator is unbiased in value and
linear in its features with unbiased gradients, the composition is unbiased for the value and
for the gradients of every level (checked by enumeration in ``tests/test_multilevel.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ats_wsi.estimators import expectation
from ats_wsi.mapping import GridMapping
from ats_wsi.model import attend
from ats_wsi.patches import PatchSource

__all__ = ["MultiLevelATSModel", "MultiLevelOutput", "nested_expectation"]


def nested_expectation(
    probs: Sequence[Tensor],
    features: Tensor,
    indices: Sequence[Tensor],
    modes: Sequence[str] | str = "without_replacement",
    baseline: Tensor | None = None,
) -> Tensor:
    """Estimate the nested expectation over ``L`` levels.

    Args:
        probs: per level, the distributions (B * N_0 * ... * N_{l-1}, K_l); row order is the
            row-major order of the samples of the levels above.
        features: (B * N_0 * ... * N_{L-2}, N_{L-1}, D) features of the last level's samples.
        indices: per level, the sampled cells (same rows as ``probs``, N_l columns).
        modes: estimator name per level (or one for all).
        baseline: optional (D,) control variate, independent of the current draws; every
            level's estimates live in the same feature space, so each level uses it.

    Returns:
        (B, D).
    """
    if isinstance(modes, str):
        modes = [modes] * len(probs)
    if not (len(probs) == len(indices) == len(modes)) or not probs:
        raise ValueError("probs, indices and modes must have one entry per level")
    est = expectation(probs[-1], features, indices[-1], modes[-1], baseline)
    for level in range(len(probs) - 2, -1, -1):
        n = indices[level].shape[1]
        est = est.view(-1, n, est.shape[-1])
        est = expectation(probs[level], est, indices[level], modes[level], baseline)
    return est


@dataclass
class MultiLevelOutput:
    """What a nested forward pass looked at, level by level (level 0 is the coarsest).

    ``probs[l]``, ``indices[l]`` and ``locations[l]`` have one row per box sampled at the levels
    above (row-major); ``locations[l]`` are top-left corners in the pixel frame of
    ``sources[l]``.
    """

    logits: Tensor
    probs: list[Tensor]
    indices: list[Tensor]
    locations: list[Tensor]
    attention_shapes: list[tuple[int, int]]
    patches: Tensor
    features: Tensor


class MultiLevelATSModel(nn.Module):
    """Zoom-in attention sampling: one attention network per level, one feature network.

    ``sources[l]`` supplies the boxes sampled at level ``l``: the region views that level
    ``l + 1`` attends over, and, for the last level, the patches for the feature network. All
    sources describe the same image; their frames may differ in scale (tensors at several
    resolutions) or coincide (slides, where every frame is level-0 baseline pixels).
    ``baseline_momentum`` is the running-mean control variate of :class:`ATSModel`.
    """

    def __init__(
        self,
        attention_nets: Sequence[nn.Module],
        feature_net: nn.Module,
        num_classes: int,
        n_samples: Sequence[int],
        sampler: str = "without_replacement",
        smoothing: float = 0.0,
        baseline_momentum: float | None = 0.9,
    ) -> None:
        super().__init__()
        if len(attention_nets) != len(n_samples) or not attention_nets:
            raise ValueError("need one attention network and one sample count per level")
        self.attention_nets = nn.ModuleList(attention_nets)
        self.feature_net = feature_net
        self.head = nn.Linear(feature_net.out_dim, num_classes)
        self.n_samples = list(n_samples)
        self.sampler = sampler
        self.smoothing = smoothing
        self.baseline_momentum = baseline_momentum
        self.register_buffer("feature_mean", torch.zeros(int(feature_net.out_dim)))

    def forward(
        self,
        x_low: Tensor,
        sources: Sequence[PatchSource],
        mask: Tensor | None = None,
        *,
        sampler: str | None = None,
        generator: torch.Generator | None = None,
    ) -> MultiLevelOutput:
        if len(sources) != len(self.attention_nets):
            raise ValueError(f"need {len(self.attention_nets)} sources, got {len(sources)}")
        mode = sampler or self.sampler
        batch = x_low.shape[0]
        view = x_low
        offset = torch.zeros(batch, 1, 2, dtype=torch.long, device=x_low.device)
        extent = tuple(sources[0].shape)
        probs_all, idx_all, locs_all, shapes = [], [], [], []
        for level, (net, n, src) in enumerate(
            zip(self.attention_nets, self.n_samples, sources, strict=True)
        ):
            logits, probs, idx = attend(
                net, view, mask if level == 0 else None, self.smoothing, n, mode, generator
            )
            mapping = GridMapping(
                low_size=tuple(view.shape[-2:]),
                high_size=extent,
                attention_size=tuple(logits.shape[-2:]),
                receptive_field=net.receptive_field,
                patch_size=src.patch_size,
            )
            top_left = mapping.top_left(idx) + offset
            boxes = src.extract(top_left.reshape(batch, -1, 2))
            boxes = boxes.reshape(-1, *boxes.shape[2:])  # (rows * n, C, p, p)
            probs_all.append(probs)
            idx_all.append(idx)
            locs_all.append(top_left)
            shapes.append(tuple(logits.shape[-2:]))
            if level + 1 < len(sources):
                # Boxes of this level become the views of the next, in the next source's frame.
                nxt = sources[level + 1].shape
                scale = torch.tensor(
                    [nxt[0] / src.shape[0], nxt[1] / src.shape[1]], device=x_low.device
                )
                offset = torch.round(top_left.reshape(-1, 1, 2) * scale).long()
                extent = (
                    round(src.patch_size * scale[0].item()),
                    round(src.patch_size * scale[1].item()),
                )
                view = boxes
        feats = self.feature_net(boxes).view(idx_all[-1].shape[0], idx_all[-1].shape[1], -1)
        # Samplers and estimators share names, so the sampler picks its estimator.
        baseline = None if self.baseline_momentum is None else self.feature_mean.clone()
        est = nested_expectation(probs_all, feats, idx_all, mode, baseline)
        if self.training and self.baseline_momentum is not None:
            with torch.no_grad():
                self.feature_mean.lerp_(est.mean(dim=0), 1 - self.baseline_momentum)
        return MultiLevelOutput(
            logits=self.head(est),
            probs=probs_all,
            indices=idx_all,
            locations=locs_all,
            attention_shapes=shapes,
            patches=boxes,
            features=feats,
        )
