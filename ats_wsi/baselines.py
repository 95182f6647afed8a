"""Plain CNN baselines of the paper benchmarks (Megapixel MNIST, speed limits)."""

from __future__ import annotations

from torch import Tensor, nn

from ats_wsi.nets import he_init_

__all__ = ["BaselineCNN"]


class BaselineCNN(nn.Module):
    """Plain CNN baseline: a stem conv, ``depth`` stride-2 3x3 convs, global pool, linear.

    Args:
        in_channels, num_classes: input channels and outputs.
        width: channels of every conv.
        depth: number of stride-2 convs after the stem.
        stem_kernel, stem_stride: the first conv (a stride > 1 keeps a full-resolution input
            affordable).
        pool: ``"avg"`` (can count instances, which the majority label needs) or ``"max"``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int = 32,
        depth: int = 4,
        stem_kernel: int = 7,
        stem_stride: int = 1,
        pool: str = "avg",
    ) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"pool must be 'avg' or 'max', got {pool!r}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, width, stem_kernel, stem_stride, stem_kernel // 2),
            nn.ReLU(inplace=True),
        ]
        for _ in range(depth):
            layers += [nn.Conv2d(width, width, 3, 2, 1), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.pool = pool
        self.head = nn.Linear(width, num_classes)
        he_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        h = self.body(x)
        h = h.mean(dim=(-2, -1)) if self.pool == "avg" else h.amax(dim=(-2, -1))
        return self.head(h)
