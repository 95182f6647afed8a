"""Multiple-instance heads over bags of patch features: gated-attention ABMIL and mean pooling.

The exhaustive baselines of the slide benchmarks: every tissue tile of a slide goes through a
(frozen) encoder once, and a small head learns the slide label from the bag of features.

* :class:`GatedAttentionMIL`: Ilse, Tomczak & Welling, "Attention-based Deep Multiple Instance
  Learning", ICML 2018, gated variant: ``h = ReLU(W x)``,
  ``a = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )``, ``z = sum_k a_k h_k``, linear
  classifier on ``z``.
* :class:`MeanPoolMIL`: the mean of the bag's features, then a linear classifier.

:func:`fit_mil` trains either on a list of bags (one slide per step, like CLAM), deterministic
given the seed; :func:`predict_mil` returns class probabilities and the attention of each bag.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GatedAttentionMIL", "MILOutput", "MeanPoolMIL", "fit_mil", "predict_mil"]


@dataclass
class MILOutput:
    """Logits (1, C) of one bag and its instance weights (n,) (uniform for mean pooling)."""

    logits: Tensor
    attention: Tensor


class GatedAttentionMIL(nn.Module):
    """Gated-attention MIL pooling (Ilse et al. 2018) with a linear classifier.

    Args:
        in_dim: feature dimension of the instances.
        hidden: width of the instance embedding ``h``.
        attention_dim: width of the gated attention branch.
        num_classes: outputs.
        dropout: dropout on ``h`` during training.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int = 128,
        attention_dim: int = 64,
        num_classes: int = 2,
        dropout: float = 0.25,
    ) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout))
        self.attention_v = nn.Linear(hidden, attention_dim)
        self.attention_u = nn.Linear(hidden, attention_dim)
        self.attention_w = nn.Linear(attention_dim, 1)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        """``bag``: (n, in_dim) instance features of one slide."""
        h = self.embed(bag)
        gate = torch.tanh(self.attention_v(h)) * torch.sigmoid(self.attention_u(h))
        a = torch.softmax(self.attention_w(gate).squeeze(-1), dim=0)
        z = (a[:, None] * h).sum(0, keepdim=True)
        return MILOutput(self.classifier(z), a)


class MeanPoolMIL(nn.Module):
    """Mean of the instance features, then a linear classifier."""

    def __init__(self, in_dim: int, num_classes: int = 2) -> None:
        super().__init__()
        self.classifier = nn.Linear(in_dim, num_classes)

    def forward(self, bag: Tensor) -> MILOutput:
        """``bag``: (n, in_dim) instance features of one slide."""
        n = bag.shape[0]
        return MILOutput(self.classifier(bag.mean(0, keepdim=True)), bag.new_full((n,), 1 / n))


def fit_mil(
    model: nn.Module,
    bags: Sequence[Tensor],
    labels: Sequence[int],
    *,
    epochs: int = 40,
    lr: float = 2e-4,
    weight_decay: float = 1e-4,
    class_weights: Tensor | None = None,
    seed: int = 0,
) -> list[float]:
    """Train on one bag per step (Adam), slides shuffled each epoch from ``seed``.

    Returns the mean training loss of every epoch.
    """
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    history = []
    for _ in range(epochs):
        model.train()
        total = 0.0
        for i in torch.randperm(len(bags), generator=gen).tolist():
            out = model(bags[i])
            target = torch.tensor([int(labels[i])])
            loss = F.cross_entropy(out.logits, target, reduction="none")[0]
            if class_weights is not None:
                # A per-sample weight: F.cross_entropy(weight=...) would divide it out again
                # for a one-bag batch.
                loss = loss * class_weights[int(labels[i])]
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += float(loss.detach())
        history.append(total / max(1, len(bags)))
    return history


@torch.no_grad()
def predict_mil(model: nn.Module, bags: Sequence[Tensor]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Class probabilities (n_bags, C) and each bag's instance weights."""
    model.eval()
    probs, att = [], []
    for bag in bags:
        out = model(bag)
        probs.append(torch.softmax(out.logits, 1)[0].numpy())
        att.append(out.attention.numpy())
    return np.stack(probs), att
