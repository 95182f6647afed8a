"""The realistic cohort's configuration, its generator version and class names.

``GENERATOR_VERSION`` and :meth:`CohortConfig.key` name the cache folder of a cohort: change
the version whenever the generator's output changes.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["CLASSES", "GENERATOR_VERSION", "CohortConfig"]

GENERATOR_VERSION = 1
CLASSES = ("normal", "tumor")


@dataclass(frozen=True)
class CohortConfig:
    """What the cohort holds (sizes in level-0 pixels at ``mpp``; lesion sizes in microns).

    Attributes:
        n_cases: patients; each has ``slides_per_case`` slides sharing its label.
        positive_fraction: fraction of positive patients (rounded).
        size: (min, max) side of a slide, rounded down to a multiple of ``tile``.
        tissue_fraction: (min, max) fraction of the slide covered by tissue.
        lesion_diameter_um: (min, max) of the log-uniform lesion diameter.
        lesions_per_positive: (min, max) lesions on a positive slide.
        skin_fraction: share of the tissue drawn from the skin image (the rest is stroma).
        attention_mpp: resolution quoted in the outlines' properties (lesion size in view px).
        compression: TIFF tile compression (``jpeg`` like scanners, or ``zlib``).
        workers: slides generated in parallel (processes).
    """

    n_cases: int = 36
    slides_per_case: tuple[int, int] = (1, 2)
    positive_fraction: float = 0.4
    size: tuple[int, int] = (8192, 9216)
    mpp: float = 0.5
    tissue_fraction: tuple[float, float] = (0.2, 0.35)
    lesion_diameter_um: tuple[float, float] = (60.0, 1000.0)
    lesions_per_positive: tuple[int, int] = (1, 3)
    skin_fraction: float = 0.65
    attention_mpp: float = 16.0
    tile: int = 256
    compression: str = "jpeg"
    seed: int = 0
    workers: int = 1

    @classmethod
    def from_dict(cls, cfg: dict[str, Any] | None) -> CohortConfig:
        """Build from parsed YAML; lists become tuples, unknown keys are an error."""
        cfg = dict(cfg or {})
        unknown = set(cfg) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown cohort keys: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})

    def key(self) -> dict[str, Any]:
        """What the cache is keyed by (``workers`` does not change the output)."""
        d = asdict(self)
        d.pop("workers")
        return {"version": GENERATOR_VERSION, **d}
