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

from torch import Tensor

from ats_wsi.estimators import expectation

__all__ = ["nested_expectation"]


def nested_expectation(
    probs: Sequence[Tensor],
    features: Tensor,
    indices: Sequence[Tensor],
    modes: Sequence[str] | str = "without_replacement",
) -> Tensor:
    """Estimate the nested expectation over ``L`` levels.

    Args:
        probs: per level, the distributions (B * N_0 * ... * N_{l-1}, K_l); row order is the
            row-major order of the samples of the levels above.
        features: (B * N_0 * ... * N_{L-2}, N_{L-1}, D) features of the last level's samples.
        indices: per level, the sampled cells (same rows as ``probs``, N_l columns).
        modes: estimator name per level (or one for all).

    Returns:
        (B, D).
    """
    if isinstance(modes, str):
        modes = [modes] * len(probs)
    if not (len(probs) == len(indices) == len(modes)) or not probs:
        raise ValueError("probs, indices and modes must have one entry per level")
    est = expectation(probs[-1], features, indices[-1], modes[-1])
    for level in range(len(probs) - 2, -1, -1):
        n = indices[level].shape[1]
        est = est.view(-1, n, est.shape[-1])
        est = expectation(probs[level], est, indices[level], modes[level])
    return est
