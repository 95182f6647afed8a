"""Small attention and feature networks, and the registries configs select them from.

Contracts (checked by the tests):

* an attention net maps a low-res view (B, C, h, w) to logits (B, 1, a_h, a_w) and has an int
  ``receptive_field`` (low-res pixels not covered by its map, both sides combined; 0 for
  'same' padding), used by :class:`ats_wsi.mapping.GridMapping`;
* a feature net maps patches (M, C, p, p) to L2-normalised features (M, out_dim) and has an
  int ``out_dim``. Unit norm is what makes sampling from the attention the minimum-variance
  choice (ATS_SPEC 1).

Every constructor takes ``in_channels``. Register new nets with
:func:`register_attention_net` / :func:`register_feature_net`; build them by name with
:func:`build_attention_net` / :func:`build_feature_net`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ATTENTION_NETS",
    "FEATURE_NETS",
    "AttentionNet",
    "ConvStack",
    "FeatureNet",
    "GlobalAvgPool",
    "GlobalMaxPool",
    "L2Normalize",
    "PreActBlock",
    "ScaledResBlock",
    "UniformAttention",
    "build_attention_net",
    "build_feature_net",
    "he_init_",
    "register_attention_net",
    "register_feature_net",
]

T = TypeVar("T", bound=Callable[..., nn.Module])

ATTENTION_NETS: dict[str, Callable[..., nn.Module]] = {}
FEATURE_NETS: dict[str, Callable[..., nn.Module]] = {}


def _register(table: dict[str, Callable[..., nn.Module]], kind: str, name: str) -> Callable[[T], T]:
    def wrap(fn: T) -> T:
        if name in table:
            raise ValueError(f"{kind} net {name!r} is already registered")
        table[name] = fn
        return fn

    return wrap


def register_attention_net(name: str) -> Callable[[T], T]:
    """Decorator: register an attention-net constructor under ``name``."""
    return _register(ATTENTION_NETS, "attention", name)


def register_feature_net(name: str) -> Callable[[T], T]:
    """Decorator: register a feature-net constructor under ``name``."""
    return _register(FEATURE_NETS, "feature", name)


def _build(table: dict[str, Callable[..., nn.Module]], kind: str, name: str, kw: Any) -> nn.Module:
    try:
        ctor = table[name]
    except KeyError:
        raise ValueError(
            f"unknown {kind} net {name!r}; available: {', '.join(sorted(table))}"
        ) from None
    return ctor(**kw)


def build_attention_net(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered attention net ``name`` (unknown name: ValueError)."""
    return _build(ATTENTION_NETS, "attention", name, kwargs)


def build_feature_net(name: str, **kwargs: Any) -> nn.Module:
    """Build the registered feature net ``name`` (unknown name: ValueError)."""
    return _build(FEATURE_NETS, "feature", name, kwargs)


# ----------------------------------------------------------------------------- blocks


class L2Normalize(nn.Module):
    """Rows to unit L2 norm; ``eps`` keeps an all-zero row finite (it stays zero)."""

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, p=2.0, dim=1, eps=self.eps)


class GlobalMaxPool(nn.Module):
    """(M, C, h, w) -> (M, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=(-2, -1))


class GlobalAvgPool(nn.Module):
    """(M, C, h, w) -> (M, C)."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class ConvStack(nn.Sequential):
    """Convolutions with ReLU between them (none after the last unless ``final_relu``)."""

    def __init__(
        self,
        channels: Sequence[int],
        kernel_sizes: int | Sequence[int] = 3,
        padding: str = "same",
        final_relu: bool = False,
    ) -> None:
        n = len(channels) - 1
        if n < 1:
            raise ValueError("channels needs at least an input and an output entry")
        ks = [kernel_sizes] * n if isinstance(kernel_sizes, int) else list(kernel_sizes)
        if len(ks) != n:
            raise ValueError(f"{n} convs but {len(ks)} kernel sizes")
        layers: list[nn.Module] = []
        for i in range(n):
            layers.append(nn.Conv2d(channels[i], channels[i + 1], ks[i], padding=padding))
            if i < n - 1 or final_relu:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al. 2016): [BN-]ReLU-conv-[BN-]ReLU-conv + skip."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, norm: bool = True) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_ch) if norm else nn.Identity()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=not norm)
        self.norm2 = nn.BatchNorm2d(out_ch) if norm else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.shortcut: nn.Module = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(x))
        # The projection sees the pre-activated input, as in the pre-activation paper.
        skip = self.shortcut(out) if not isinstance(self.shortcut, nn.Identity) else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + skip


class ScaledResBlock(nn.Module):
    """Normalisation-free residual block: ``skip(x) + alpha * body(x)``, alpha starts at 0.

    Starting as the identity (SkipInit, De & Smith 2020) keeps training stable without
    BatchNorm, whose batch statistics over a handful of sampled patches are noisy.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.shortcut: nn.Module = (
            nn.Conv2d(in_ch, out_ch, 1, stride=stride)
            if stride != 1 or in_ch != out_ch
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        body = self.conv2(F.relu(self.conv1(F.relu(x))))
        return self.shortcut(x) + self.alpha * body


def he_init_(module: nn.Module) -> nn.Module:
    """He-normal (fan-in, ReLU gain) conv weights and zero biases, in place; returns ``module``.

    PyTorch's default conv init (uniform, gain 1/sqrt(3)) with random biases leaves a small
    ReLU stack's output almost independent of its input, so L2-normalised features start out
    nearly identical for every patch and attention sampling has no signal to bootstrap from
    (the end-to-end learning test fails on about half of the seeds with it, none with this).
    Zero biases also match the reference's Keras initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return module


def _identity(x: Tensor) -> Tensor:
    return x


class AttentionNet(nn.Sequential):
    """``nn.Sequential`` producing (B, 1, a_h, a_w) logits, with its ``receptive_field``.

    Convolutions are re-initialised with :func:`he_init_`.
    """

    def __init__(self, *layers: nn.Module, receptive_field: int = 0) -> None:
        super().__init__(*layers)
        self.receptive_field = int(receptive_field)
        he_init_(self)

    def tiling(self) -> tuple[int, int] | None:
        """(halo, stride) in input pixels when the net is 'same' stride-1 convolutions,
        ReLUs and non-overlapping pools (an output cell then depends on its ``stride`` x
        ``stride`` input pixels plus ``halo`` on each side); None for anything else."""
        halo, stride = 0, 1
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k, st, dil = m.kernel_size, m.stride, m.dilation
                if (m.padding != "same" and k != (1, 1)) or st != (1, 1) or dil != (1, 1):
                    return None
                halo += (max(k) // 2) * stride
            elif isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)):
                k = m.kernel_size if isinstance(m.kernel_size, int) else max(m.kernel_size)
                if m.stride not in (k, (k, k)) or m.padding not in (0, (0, 0)):
                    return None
                stride *= k
            elif not isinstance(m, (nn.ReLU, nn.Sequential)):
                return None
        return halo, stride

    def forward_blocks(
        self,
        x: Tensor,
        block: int = 256,
        keep: Tensor | None = None,
        whole: int = 1024,
        prep: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """``self(x)`` computed on blocks of about ``block`` x ``block`` input pixels with a
        halo of real neighbours, so the activations of a whole slide's view are never held at
        once (a 100k px slide at 16 um/px is a 3,072 px view: ~1.8 GB of activations in one
        piece). Equal to ``self(x)`` up to float rounding; for inference (no autograd graph
        is kept either way under ``torch.no_grad``). Nets without a :meth:`tiling`, and views
        within ``whole`` pixels a side (every cohort and demo slide's view), run in one piece.

        ``keep``: optional bool (B, h_out, w_out) of the output cells that matter (the tissue
        cells); a block with none is not computed and its cells are 0. Background is most of a
        slide's view, so this is most of the attention net's time on a whole slide.
        ``prep``: an elementwise input preparation applied to each block (with its halo), so a
        uint8 view is never held as float whole.
        """
        geo = self.tiling()
        h, w = x.shape[-2:]
        if prep is None:
            prep = _identity
        if geo is None or max(h, w) <= whole:
            return self(prep(x))
        halo, s = geo
        pad = -(-halo // s) * s  # rounded up to whole output cells: pools stay aligned
        step = max(s, block // s * s)
        rows, cols = h // s * s, w // s * s  # what a floor-mode pool covers
        if keep is not None and tuple(keep.shape[-2:]) != (rows // s, cols // s):
            keep = None  # not this net's grid: compute every block
        out: Tensor | None = None
        for y0 in range(0, rows, step):
            y1 = min(y0 + step, rows)
            for x0 in range(0, cols, step):
                x1 = min(x0 + step, cols)
                if keep is not None and not keep[..., y0 // s : y1 // s, x0 // s : x1 // s].any():
                    continue
                ya, xa = max(0, y0 - pad), max(0, x0 - pad)
                part = self(prep(x[..., ya : min(h, y1 + pad), xa : min(w, x1 + pad)]))
                r, c = (y0 - ya) // s, (x0 - xa) // s
                part = part[..., r : r + (y1 - y0) // s, c : c + (x1 - x0) // s]
                if out is None:
                    out = part.new_zeros((*part.shape[:-2], rows // s, cols // s))
                out[..., y0 // s : y1 // s, x0 // s : x1 // s] = part
        if out is None:  # nothing kept: the (B, 1, h, w) logits of an all-masked view
            out = x.new_zeros((x.shape[0], 1, rows // s, cols // s))
        return out


class FeatureNet(nn.Sequential):
    """``nn.Sequential`` ending in :class:`L2Normalize`, with its ``out_dim``.

    Convolutions are re-initialised with :func:`he_init_`.
    """

    def __init__(self, *layers: nn.Module, out_dim: int) -> None:
        super().__init__(*layers, L2Normalize())
        self.out_dim = int(out_dim)
        he_init_(self)


# ----------------------------------------------------------------------------- entries


@register_attention_net("mnist")
def mnist_attention(in_channels: int = 1, width: int = 8) -> AttentionNet:
    """Megapixel MNIST (ATS_SPEC 2.1): three 3x3 'same' convs (8, 8, 1); one cell per pixel."""
    return AttentionNet(ConvStack([in_channels, width, width, 1], 3, "same"), receptive_field=0)


@register_feature_net("mnist")
def mnist_features(in_channels: int = 1, width: int = 32) -> FeatureNet:
    """Megapixel MNIST (ATS_SPEC 2.1): 7x7 conv then three 3x3 convs ('valid', ReLU after each,
    as in the reference), global max pool, L2. Needs patches of at least 13 x 13."""
    convs = ConvStack([in_channels] + [width] * 4, [7, 3, 3, 3], "valid", final_relu=True)
    return FeatureNet(convs, GlobalMaxPool(), out_dim=width)


@register_attention_net("sts")
def sts_attention(in_channels: int = 3, widths: Sequence[int] = (8, 16, 32)) -> AttentionNet:
    """Speed limits (ATS_SPEC 2.2): four 3x3 'valid' convs (8, 16, 32, 1), then max-pool 8.
    ``widths`` sets the first three (CPU configs use fewer channels).

    ``receptive_field`` is 9, the value the spec and the reference use: 9 = 1 + 4 * (3 - 1) is
    the receptive field of one output unit of the conv stack (a 9 x 9 window). The pixels the
    four valid convs actually remove are 8 (4 on each side), so exact cell centres would use
    8. With 9, the centre of cell ``i`` moves by ``0.5 - (i + 0.5) / A`` low-res pixels: under
    half a low-res pixel (under 1.7 high-res pixels at the spec's scale 0.3), negligible
    against 100 px patches.
    """
    if len(widths) != 3:
        raise ValueError(f"sts attention needs 3 widths, got {list(widths)}")
    convs = ConvStack([in_channels, *map(int, widths), 1], 3, "valid")
    return AttentionNet(convs, nn.MaxPool2d(8), receptive_field=9)


@register_feature_net("sts_resnet")
def sts_resnet_features(
    in_channels: int = 3,
    width: int = 32,
    strides: Sequence[int] = (1, 2, 2, 2),
    norm: bool = True,
) -> FeatureNet:
    """Speed limits (ATS_SPEC 2.2): small pre-activation ResNet, one block per stride,
    global average pool, L2."""
    blocks: list[nn.Module] = [nn.Conv2d(in_channels, width, 3, padding=1)]
    blocks += [PreActBlock(width, width, s, norm=norm) for s in strides]
    # Pre-activation nets need one last norm + ReLU before pooling.
    blocks += [nn.BatchNorm2d(width) if norm else nn.Identity(), nn.ReLU(inplace=True)]
    return FeatureNet(*blocks, GlobalAvgPool(), out_dim=width)


@register_attention_net("histology")
def histology_attention(in_channels: int = 3, width: int = 8) -> AttentionNet:
    """H&E slides: two 3x3 'same' convs and a 1x1 scorer; one cell per low-res pixel."""
    return AttentionNet(
        ConvStack([in_channels, width, width], 3, "same", final_relu=True),
        nn.Conv2d(width, 1, 1),
        receptive_field=0,
    )


@register_attention_net("tile_pool")
def tile_pool_attention(in_channels: int = 3, width: int = 16, pool: int = 8) -> AttentionNet:
    """H&E slides on a tile grid: three 3x3 'same' convs and a 1x1 scorer, average-pooled
    ``pool`` x ``pool``: one logit per tile when ``pool`` view pixels span a tile (a 256 px tile
    at 0.5 um/px is 8 view pixels at 16 um/px)."""
    return AttentionNet(
        ConvStack([in_channels, width, width, width], 3, "same", final_relu=True),
        nn.Conv2d(width, 1, 1),
        nn.AvgPool2d(pool),
        receptive_field=0,
    )


class UniformAttention(nn.Module):
    """Zero logits on a ``pool``-pooled grid: uniform attention over the allowed (tissue)
    cells, no parameters. Sampling from it is the random-N baseline."""

    receptive_field = 0

    def __init__(self, pool: int) -> None:
        super().__init__()
        self.pool = nn.AvgPool2d(pool)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(x[:, :1]) * 0.0


@register_attention_net("uniform_tiles")
def uniform_tiles_attention(in_channels: int = 3, pool: int = 8) -> UniformAttention:
    """Random-N on the ``tile_pool`` grid: uniform over tissue cells."""
    return UniformAttention(pool)


@register_feature_net("histology")
def histology_features(in_channels: int = 3, width: int = 16) -> FeatureNet:
    """H&E slides: strided stem and three BatchNorm-free residual blocks (strides 1, 2, 2),
    global average pool, L2; ``out_dim = 2 * width``. Cheap enough for CPU inference."""
    return FeatureNet(
        nn.Conv2d(in_channels, width, 3, stride=2, padding=1),
        ScaledResBlock(width, width, 1),
        ScaledResBlock(width, 2 * width, 2),
        ScaledResBlock(2 * width, 2 * width, 2),
        nn.ReLU(),
        GlobalAvgPool(),
        out_dim=2 * width,
    )


@register_feature_net("timm")
def timm_features(**kwargs: Any) -> nn.Module:
    """A pretrained timm encoder from local weights (:func:`ats_wsi.encoders.build_timm_encoder`;
    imported on use, so plain nets do not pay for timm)."""
    from ats_wsi.encoders import build_timm_encoder

    return build_timm_encoder(**kwargs)


@register_feature_net("torchvision_resnet")
def torchvision_resnet_features(**kwargs: Any) -> nn.Module:
    """A torchvision ResNet from a local weights file
    (:func:`ats_wsi.encoders.build_torchvision_resnet`; imported on use, like ``timm``)."""
    from ats_wsi.encoders import build_torchvision_resnet

    return build_torchvision_resnet(**kwargs)
