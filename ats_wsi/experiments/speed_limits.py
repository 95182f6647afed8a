"""Speed limits (ATS_SPEC 2.2): ATS and a CNN on the low-res view trained and measured in one run.

With ``data.root`` the real Swedish Traffic Signs ``Set1`` / ``Set2`` are used; otherwise the
deterministic offline stand-in. Images travel as uint8; on the device each training batch gets
brightness/contrast and +-100 px pan augmentation (:func:`augment`), then the low-res view is
made from the (augmented) full image with an anti-aliased resize (:func:`low_res_view`), as in
the authors' model. Outputs as in :mod:`ats_wsi.experiments.megapixel_mnist`;
``python -m pipelines.speed_limits`` is the command line.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from ats_wsi.config import REQUIRED, ConfigError
from ats_wsi.datasets.speed_limits import CLASSES, SpeedLimits, SpeedLimitsStandIn
from ats_wsi.experiments.runner import (
    ExperimentRun,
    baseline_schema,
    build_ats,
    build_baseline,
    enabled_baselines,
    eval_sampler_kwargs,
    first_batch,
    load_checked_config,
    make_loader,
    run_generators,
    write_attention_figures,
)
from ats_wsi.model import ATSModel
from ats_wsi.training import ForwardFn, StepOutput, class_balanced_weights

__all__ = [
    "CHOICES",
    "SCHEMA",
    "augment",
    "build_datasets",
    "check_lists",
    "load_config",
    "low_res_view",
    "run",
    "save_figures",
    "sts_forward",
]

_NUM = (int, float)
_OPT_STR = (str, type(None))

SCHEMA: dict[str, Any] = {
    "seed": ((int,), 0),
    "device": ((str,), "auto"),
    "data": {
        "root": (_OPT_STR, None),  # STS folder with Set1/ and Set2/; null: stand-in
        "n_train": ((int,), 747),  # stand-in sizes (the real subset has 747 / 684)
        "n_test": ((int,), 684),
        "class_probs": ((list,), [0.25, 0.25, 0.25, 0.25]),
        "sign_diameter": ((list,), [18, 30]),
        "image_size": ((list,), [960, 1280]),  # stand-in only: (height, width)
        "n_clutter": ((int,), 40),  # stand-in only
        "scale": (_NUM, 0.3),
        "num_workers": ((int,), 0),
    },
    "model": {
        "attention_net": ((str,), "sts"),
        "attention_net_args": ((dict,), {}),
        "feature_net": ((str,), "sts_resnet"),
        "feature_net_args": ((dict,), {}),
        "n_patches": ((int,), 5),
        "patch_size": ((int,), 100),
        "sampler": ((str,), "without_replacement"),
        "eval_sampler": (_OPT_STR, None),
        "smoothing": (_NUM, 1e-4),
    },
    "train": {
        "epochs": ((int,), REQUIRED),
        "batch_size": ((int,), 32),
        "lr": (_NUM, 1e-3),
        "head_lr_multiplier": (_NUM, 1.0),
        "lr_decay_epochs": ((list,), [250]),  # lr x lr_decay_factor at each
        "lr_decay_factor": (_NUM, 0.1),
        "clip_norm": ((int, float, type(None)), None),
        "entropy_lambda": (_NUM, 1e-4),
        "class_balanced": ((bool,), True),
        "augment": ((bool,), True),
        "pan_px": ((int,), 100),
        "contrast": ((list,), [0.8, 1.2]),
        "brightness": ((list,), [-0.1, 0.1]),
        "eval_every": ((int,), 1),
        "checkpoint_every": ((int,), 1),
        "time_budget_minutes": ((int, float, type(None)), None),
        # BatchNorm statistics recomputed on this many unshuffled training batches before
        # each evaluation and checkpoint (0: keep training's momentum average, which made
        # single epochs evaluate at chance in docs/speed_limits.md).
        "bn_recalibration_batches": ((int,), 25),
    },
    "baselines": {"low_res_cnn": baseline_schema()},
    "report": {
        "n_figures": ((int,), 4),
        "cost_batch_size": ((int,), 4),
        "cost_repeats": ((int,), 3),
    },
}

CHOICES: dict[tuple[str, ...], tuple[Any, ...]] = {
    ("model", "sampler"): ("with_replacement", "without_replacement"),
    ("model", "eval_sampler"): (None, "with_replacement", "without_replacement", "topk"),
    ("baselines", "low_res_cnn", "pool"): ("avg", "max"),
}


def check_lists(cfg: Mapping[str, Any], where: str) -> None:
    """Lengths and element types of the list-valued keys (the schema checks only ``list``)."""
    specs = {
        ("data", "class_probs"): (4, (int, float)),
        ("data", "sign_diameter"): (2, (int,)),
        ("data", "image_size"): (2, (int,)),
        ("train", "contrast"): (2, (int, float)),
        ("train", "brightness"): (2, (int, float)),
        ("train", "lr_decay_epochs"): (None, (int,)),
    }
    for (sec, key), (n, types) in specs.items():
        v = cfg[sec][key]
        if (n is not None and len(v) != n) or not all(
            isinstance(x, types) and not isinstance(x, bool) for x in v
        ):
            what = f"{n} numbers" if n else "a list of integers"
            raise ConfigError(f"{where}: key '{sec}.{key}' must be {what}, got {v!r}")


def load_config(path: str) -> dict[str, Any]:
    """The checked config at ``path`` (raises :class:`~ats_wsi.config.ConfigError`)."""
    return load_checked_config(path, SCHEMA, CHOICES, check_lists)


# ----------------------------------------------------------------------------- batches


def augment(x: Tensor, cfg: Mapping[str, Any], generator: torch.Generator) -> Tensor:
    """Per-sample ``clamp(a * x + b)`` and a random shift of up to ``pan_px`` (zero fill).

    ``generator`` is a CPU generator (a few numbers per sample), so runs on any device draw
    the same augmentations.
    """
    b = x.shape[0]
    (c0, c1), (b0, b1) = cfg["contrast"], cfg["brightness"]
    u = torch.rand(b, 2, generator=generator)
    a = (c0 + (c1 - c0) * u[:, 0]).to(x.device, x.dtype).view(b, 1, 1, 1)
    off = (b0 + (b1 - b0) * u[:, 1]).to(x.device, x.dtype).view(b, 1, 1, 1)
    x = (a * x + off).clamp_(0.0, 1.0)
    pan = int(cfg["pan_px"])
    if pan <= 0:
        return x
    shifts = torch.randint(-pan, pan + 1, (b, 2), generator=generator).tolist()
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(shifts):
        # Destination window and source window of the shifted image.
        ys, yd = max(0, -dy), max(0, dy)
        xs, xd = max(0, -dx), max(0, dx)
        hh, ww = h - abs(dy), w - abs(dx)
        if hh <= 0 or ww <= 0:
            continue  # shifted entirely out of the frame (tiny images only)
        out[i, :, yd : yd + hh, xd : xd + ww] = x[i, :, ys : ys + hh, xs : xs + ww]
    return out


def low_res_view(x_high: Tensor, scale: float) -> Tensor:
    """Anti-aliased bilinear resize of (B, C, H, W) by ``scale`` (0.3: 960x1280 -> 288x384)."""
    size = (int(x_high.shape[-2] * scale), int(x_high.shape[-1] * scale))
    return F.interpolate(x_high, size=size, mode="bilinear", antialias=True, align_corners=False)


def sts_forward(
    cfg: Mapping[str, Any],
    *,
    train: bool,
    kind: str = "ats",
    generator: torch.Generator | None = None,
    aug_generator: torch.Generator | None = None,
    **model_kwargs: Any,
) -> ForwardFn:
    """Forward function for ``(x_high uint8, y)`` batches: augment (training), make the
    low-res view, run ATS (``kind="ats"``) or a CNN on the low-res view (``"low_res_cnn"``)."""
    tcfg, scale = cfg["train"], float(cfg["data"]["scale"])

    def forward(model: nn.Module, batch: Any, device: torch.device) -> StepOutput:
        x, y = batch[0], batch[1]
        x = x.to(device, non_blocking=True).float().div_(255.0)
        if train and tcfg["augment"]:
            x = augment(x, tcfg, aug_generator or torch.Generator().manual_seed(0))
        x_low = low_res_view(x, scale)
        y = y.to(device)
        if kind != "ats":
            return StepOutput(model(x_low), y)
        gen = generator if generator is not None and generator.device.type == device.type else None
        out = model(x_low, x, generator=gen, **model_kwargs)
        return StepOutput(out.logits, y, out.probs, out)

    return forward


# ----------------------------------------------------------------------------- run


def build_datasets(cfg: Mapping[str, Any]) -> tuple[Dataset, Dataset]:
    """Real STS when ``data.root`` is set, else the stand-in (seeds ``2 seed``, ``2 seed + 1``)."""
    d = cfg["data"]
    if d["root"]:
        return SpeedLimits(d["root"], "train"), SpeedLimits(d["root"], "test")
    common = dict(
        class_probs=tuple(d["class_probs"]),
        sign_diameter=tuple(d["sign_diameter"]),
        image_size=tuple(d["image_size"]),
        n_clutter=d["n_clutter"],
    )
    return (
        SpeedLimitsStandIn(d["n_train"], seed=2 * cfg["seed"], **common),
        SpeedLimitsStandIn(d["n_test"], seed=2 * cfg["seed"] + 1, **common),
    )


def save_figures(
    model: ATSModel, ds: Dataset, cfg: Mapping[str, Any], out_dir: Path, device: torch.device
) -> list[str]:
    """Attention figures for the first ``report.n_figures`` test images."""
    n = cfg["report"]["n_figures"]
    if n <= 0:
        return []
    x, y = first_batch(ds, n)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    with torch.no_grad():
        out = sts_forward(cfg, train=False, generator=gen)(model, (x, y), device).extra
        x_low = low_res_view(x.float().div(255.0), float(cfg["data"]["scale"]))
    return write_attention_figures(
        out_dir, out, x_low, y, x.shape[-2:], model.patch_size, class_names=CLASSES
    )


def run(
    cfg: dict[str, Any],
    out_dir: Path,
    *,
    config_path: str = "<dict>",
    resume_run: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train and evaluate ATS and the low-res CNN; write and return ``results.json``."""
    exp = ExperimentRun(cfg, out_dir, resume_run=resume_run, progress=progress)
    device = exp.device
    train_ds, test_ds = build_datasets(cfg)
    t = cfg["train"]
    train_labels = list(train_ds.labels)
    weights = class_balanced_weights(train_labels, len(CLASSES)) if t["class_balanced"] else None
    exp.begin(
        "speed_limits",
        config_path,
        train_ds,
        test_ds,
        cost_batch=first_batch(test_ds, cfg["report"]["cost_batch_size"]),
        train_class_counts=[train_labels.count(c) for c in range(len(CLASSES))],
        classes=list(CLASSES),
    )

    def schedule(opt: torch.optim.Optimizer) -> Any:
        return torch.optim.lr_scheduler.MultiStepLR(opt, t["lr_decay_epochs"], t["lr_decay_factor"])

    # ---- ATS
    gens = run_generators(cfg, device, sampling=True, augment=True)
    eval_kwargs = eval_sampler_kwargs(cfg)
    n_bn = min(len(train_ds), t["bn_recalibration_batches"] * t["batch_size"])
    bn_loader = None
    if n_bn > 0:
        bn_loader = make_loader(Subset(train_ds, range(n_bn)), t["batch_size"], False, cfg, device)
    exp.train(
        "ats",
        lambda: build_ats(cfg, 3, len(CLASSES)),
        (train_ds, test_ds),
        generators=gens,
        scheduler=schedule,
        forward=sts_forward(
            cfg, train=True, generator=gens["sample"], aug_generator=gens["augment"]
        ),
        eval_forward=sts_forward(cfg, train=False, generator=gens["eval"], **eval_kwargs),
        bn_loader=bn_loader,
        entropy_lambda=t["entropy_lambda"],
        class_weights=weights,
        cost_forward=sts_forward(
            cfg, train=False, generator=torch.Generator(device=device).manual_seed(0)
        ),
        after=lambda model: {"figures": save_figures(model, test_ds, cfg, out_dir, device)},
    )

    # ---- baseline: a CNN on the low-res view
    for name in enabled_baselines(cfg):
        gens = run_generators(cfg, device, augment=True)
        cnn_forward = sts_forward(cfg, train=False, kind=name)
        exp.train(
            name,
            partial(build_baseline, cfg["baselines"][name], 3, len(CLASSES)),
            (train_ds, test_ds),
            generators=gens,
            scheduler=schedule,
            forward=sts_forward(cfg, train=True, kind=name, aug_generator=gens["augment"]),
            eval_forward=cnn_forward,
            class_weights=weights,
            cost_forward=cnn_forward,
        )
    return exp.finish()
