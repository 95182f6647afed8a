"""A trained ATS model as a tiatoolbox model (``ModelABC``) and a tiatoolbox-style engine.

Import this module explicitly (``import ats_wsi`` does not): it imports tiatoolbox.

* :class:`ATSTiatoolboxModel` wraps an :class:`~ats_wsi.model.ATSModel` with its
  :class:`~ats_wsi.slides.engine.SlideSettings` and class names. ``infer_batch`` takes
  tiatoolbox's uint8 (B, H, W, 3) batches, each item an image region at ``patch_mpp``, and
  returns per-region class probabilities (B, C): the low-res view is the region downsampled to
  ``attention_mpp`` and patches are cut from the region itself (top-k sampling, no tissue mask).
* :class:`ATSEngine` predicts whole slides (paths or tiatoolbox ``WSIReader`` objects) with the
  project's own per-slide code (:func:`~ats_wsi.slides.engine.predict_slide`), reading pixels
  through tiatoolbox via :class:`~ats_wsi.io.tiatoolbox_reader.TiatoolboxReader`. It returns
  probabilities, the attention map and the sampled level-0 boxes per slide, or writes one zarr
  group per slide plus the project's predictions CSV.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tiatoolbox.models.models_abc import ModelABC
from tiatoolbox.wsicore.wsireader import WSIReader
from torch import Tensor

from ats_wsi.checkpoint import load_checkpoint, load_model_state
from ats_wsi.io.tiatoolbox_reader import TiatoolboxReader
from ats_wsi.io.tissue import load_mask
from ats_wsi.model import ATSModel, ATSOutput
from ats_wsi.settings import parse
from ats_wsi.slides.engine import SlideResult, predict_slide
from ats_wsi.slides.export import PredictionsCSV, prediction_columns
from ats_wsi.slides.inference import PredictOptions, Predictor, write_prediction
from ats_wsi.slides.settings import SlideSettings, TrainConfig

__all__ = ["ATSEngine", "ATSTiatoolboxModel"]


class ATSTiatoolboxModel(ModelABC):
    """A trained :class:`ATSModel` as a tiatoolbox ``ModelABC``.

    Args:
        model: the ATS model (its weights are shared, not copied).
        settings: the resolutions it was trained with (default :class:`SlideSettings`).
        classes: class names, index order (default ``"0"``, ``"1"``, ...).
    """

    def __init__(
        self,
        model: ATSModel,
        settings: SlideSettings | None = None,
        classes: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.settings = settings if settings is not None else SlideSettings()
        n = model.head.out_features
        self.classes = (
            [str(c) for c in classes] if classes is not None else [str(i) for i in range(n)]
        )
        if len(self.classes) != n:
            raise ValueError(f"{len(self.classes)} class names for a {n}-class model")
        self.class_dict = dict(enumerate(self.classes))

    @classmethod
    def from_checkpoint(
        cls, checkpoint: str | os.PathLike[str], device: str = "cpu"
    ) -> ATSTiatoolboxModel:
        """Load a project checkpoint (``torch.load(weights_only=True)``) with its settings."""
        pred = Predictor.load(checkpoint, device)
        return cls(pred.model, pred.settings, pred.classes)

    def forward(  # type: ignore[override]
        self,
        x_low: Tensor,
        source: Any,
        mask: Tensor | None = None,
        **kwargs: Any,
    ) -> ATSOutput:
        """:meth:`ATSModel.forward` (normalised views and patch source)."""
        return self.model(x_low, source, mask, **kwargs)

    @staticmethod
    def preproc(image: np.ndarray) -> np.ndarray:
        """Identity: ``infer_batch`` does the scaling the model needs."""
        return image

    @staticmethod
    def postproc(image: np.ndarray) -> np.ndarray:
        """Probabilities (..., C) -> predicted class index."""
        return np.argmax(image, axis=-1)

    @staticmethod
    def infer_batch(
        model: torch.nn.Module, batch_data: np.ndarray | Tensor, *, device: str
    ) -> np.ndarray:
        """uint8 (B, H, W, 3) regions at ``patch_mpp`` -> class probabilities (B, C)."""
        core = getattr(model, "module", model)
        s = core.settings
        if not isinstance(batch_data, Tensor):
            batch_data = torch.from_numpy(np.array(batch_data))  # a writable copy
        x = batch_data.to(device).permute(0, 3, 1, 2).float() / 255
        # The model normalises its inputs itself; it takes [0, 1] images of its channels.
        x = x[:, : core.model.in_channels or x.shape[1]]
        f = s.patch_mpp / s.attention_mpp
        size = (max(1, round(x.shape[-2] * f)), max(1, round(x.shape[-1] * f)))
        x_low = F.interpolate(x, size=size, mode="area")
        core.eval()
        with torch.inference_mode():
            out = core(x_low, x, None, sampler="topk")
            return torch.softmax(out.logits.float(), 1).cpu().numpy()

    def load_weights_from_file(self, weights: str | Path) -> torch.nn.Module:  # type: ignore[override]
        """Load a project checkpoint (``torch.load(weights_only=True)``) into the wrapped model;
        settings and class names are taken from the checkpoint too."""
        ckpt = load_checkpoint(weights, map_location="cpu")
        load_model_state(self.model, ckpt)
        raw = ckpt.get("config") or {}
        cfg = parse(TrainConfig, raw, f"{weights} (its config)")
        if raw.get("slides"):
            self.settings = cfg.slides
        classes = ckpt.get("extra", {}).get("classes") or cfg.classes
        if classes:
            self.classes = [str(c) for c in classes]
            self.class_dict = dict(enumerate(self.classes))
        return self

    def to(  # type: ignore[override]
        self, device: str | torch.device = "cpu", dtype: torch.dtype | None = None, **kw: Any
    ) -> ATSTiatoolboxModel:
        """Move to ``device`` (never wrapped in DataParallel: a slide is one forward)."""
        torch.nn.Module.to(self, torch.device(device), dtype=dtype, **kw)
        return self


def _slide_id(image: Any, index: int) -> str:
    if isinstance(image, WSIReader):
        path = image.input_path
        return Path(path).stem if path is not None else f"slide_{index}"
    return Path(image).stem


def _mask_array(mask: Any) -> Any:
    """A tiatoolbox mask reader -> its image; paths and arrays pass through."""
    if isinstance(mask, WSIReader):
        img = getattr(mask, "img", None)
        return np.asarray(img) if img is not None else mask.slide_thumbnail()
    return mask


class ATSEngine:
    """Whole-slide ATS inference in tiatoolbox's style (``engine.run(images, masks)``).

    Args:
        model: an :class:`ATSTiatoolboxModel`, or the path of a project checkpoint.
        device: torch device.
        seed: sampling seed for stochastic samplers (ignored by ``topk``); per slide the draws
            are those of ``predict_slides`` with the same seed and slide id.
    """

    def __init__(
        self,
        model: ATSTiatoolboxModel | str | os.PathLike[str],
        *,
        device: str = "cpu",
        seed: int = 0,
    ) -> None:
        if not isinstance(model, ATSTiatoolboxModel):
            model = ATSTiatoolboxModel.from_checkpoint(model, device)
        self.model = model.to(device)
        self.device = device
        self.seed = seed

    def run(
        self,
        images: Sequence[str | os.PathLike[str] | WSIReader],
        masks: Sequence[Any] | None = None,
        *,
        save_dir: str | os.PathLike[str] | None = None,
        output_type: str = "dict",
        sampler: str = "topk",
        n_patches: int | None = None,
        mpp: float | None = None,
        slide_ids: Sequence[str] | None = None,
        overwrite: bool = False,
    ) -> dict[str, Any]:
        """Predict each slide.

        Args:
            images: slide paths or tiatoolbox ``WSIReader`` objects (e.g. a
                ``VirtualWSIReader`` over a plain image).
            masks: one per image, or None: tissue masks at any resolution covering the whole
                slide (array, image / ``.npy`` / zarr path, or a ``VirtualWSIReader``); they
                replace the automatic tissue mask. None in the list: automatic mask.
            save_dir: where ``output_type="zarr"`` writes ``zarr/<slide_id>.zarr`` and
                ``predictions.csv``.
            output_type: ``"dict"`` (results in memory) or ``"zarr"``.
            sampler, n_patches: as for ``predict_slides`` (None: the checkpoint's count).
            mpp: level-0 microns per pixel overriding the slides' metadata.
            slide_ids: names of the slides (default: file stems, ``slide_<i>`` for arrays).
            overwrite: replace an existing ``predictions.csv`` in ``save_dir``.

        Returns:
            ``{slide_id: result}``; with ``"dict"`` a result holds ``probabilities`` (C,),
            ``predictions`` (class index), ``pred_label``, ``attention`` (a_h, a_w),
            ``coordinates`` (N, 4) level-0 boxes ``x0, y0, x1, y1`` of the sampled patches in
            draw order, ``locations_xy`` (N, 2) their top-left corners, ``scores`` (N,),
            ``patch_size_level0``, ``mask`` (a_h, a_w) or None, ``dimensions``, ``mpp``,
            ``cost`` (pixels read per level, :class:`~ats_wsi.slides.costs.SlideCost` as a
            dict) and ``zoom`` (a zoom model's regions, :class:`~ats_wsi.slides.costs.SlideZoom`
            as a dict; None for one level);
            with ``"zarr"`` it is the path of the slide's zarr group.
        """
        if output_type not in ("dict", "zarr"):
            raise ValueError(f"output_type must be 'dict' or 'zarr', got {output_type!r}")
        if masks is not None and len(masks) != len(images):
            raise ValueError(f"{len(masks)} masks for {len(images)} images")
        ids = list(slide_ids) if slide_ids is not None else None
        if ids is None:
            ids = [_slide_id(im, i) for i, im in enumerate(images)]
        if len(ids) != len(images) or len(set(ids)) != len(ids):
            raise ValueError(f"slide ids must be unique, one per image: {ids}")
        table = None
        out = None
        if output_type == "zarr":
            if save_dir is None:
                raise ValueError("output_type='zarr' needs save_dir")
            out = Path(save_dir)
            csv_path = out / "predictions.csv"
            if csv_path.exists():
                if not overwrite:
                    raise FileExistsError(f"{csv_path} exists; pass overwrite=True")
                csv_path.unlink()
            table = PredictionsCSV(csv_path, prediction_columns(self.model.classes))
        options = PredictOptions(
            sampler=sampler,
            n_patches=n_patches,
            seed=self.seed,
            heatmaps=False,
            gallery=False,
            zarr=True,
            geojson=False,
            device=self.device,
        )
        pred = Predictor(self.model.model, self.model.settings, self.model.classes, {})
        results: dict[str, Any] = {}
        for i, (image, slide_id) in enumerate(zip(images, ids, strict=True)):
            mask = None if masks is None else masks[i]
            t0 = time.perf_counter()
            res = self._predict(image, mask, slide_id, sampler, n_patches, mpp)
            if out is None:
                results[slide_id] = self._result(res)
                continue
            row = {"slide_id": slide_id, "Y": -1, "sampler": sampler}
            row = write_prediction(out, res, pred, options, row)
            row["runtime_s"] = round(time.perf_counter() - t0, 4)
            table.write(row)
            results[slide_id] = out / "zarr" / f"{slide_id}.zarr"
        return results

    def _predict(
        self,
        image: Any,
        mask: Any,
        slide_id: str,
        sampler: str,
        n_patches: int | None,
        mpp: float | None,
    ) -> SlideResult:
        """One slide through :func:`predict_slide`, read by a :class:`TiatoolboxReader`."""
        settings = self.model.settings
        user_mask = _mask_array(mask) if mask is not None else None
        if user_mask is not None and settings.min_tissue <= 0:
            settings = replace(settings, min_tissue=1e-9)  # any tissue in a cell counts
        level0_mpp = mpp if mpp is not None else settings.slide_mpp
        with TiatoolboxReader(image, mpp=level0_mpp) as reader:
            item = replace(settings.loader(), tissue=user_mask is None).read(reader, slide_id)
            if user_mask is not None:
                shape = item.image.shape[:2]
                item = replace(item, mask=load_mask(user_mask, shape, slide=slide_id))
            return predict_slide(
                self.model.model,
                reader,
                settings,
                device=self.device,
                sampler=sampler,
                n_patches=n_patches,
                seed=self.seed,
                slide_id=slide_id,
                item=item,
            )

    def _result(self, res: Any) -> dict[str, Any]:
        y_hat = int(res.probs.argmax())
        xy = np.asarray(res.locations_xy, dtype=np.int64).reshape(-1, 2)
        return {
            "probabilities": res.probs,
            "predictions": y_hat,
            "pred_label": self.model.classes[y_hat],
            "attention": res.attention,
            "coordinates": np.concatenate([xy, xy + res.patch_size_level0], axis=1),
            "locations_xy": xy,
            "scores": res.scores,
            "patch_size_level0": res.patch_size_level0,
            "mask": res.mask,
            "dimensions": tuple(res.dimensions),
            "mpp": tuple(res.mpp),
            "cost": None if res.cost is None else asdict(res.cost),
            "zoom": None if res.zoom is None else asdict(res.zoom),
        }
