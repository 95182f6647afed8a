"""Megapixel MNIST (ATS_SPEC 2.1): ATS and two CNN baselines trained and measured in one run.

:func:`run` writes to its output folder ``{model}_metrics.jsonl`` and ``{model}_checkpoint.pt``
per model, ``figures/*.png`` (attention on a few test images) and ``results.json`` (test error,
time and peak memory per sample for every model, data source, noise order, machine); with
``resume_run`` every model continues from its checkpoint. ``python -m pipelines.megapixel_mnist``
is its command line.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ats_wsi.config import REQUIRED
from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST
from ats_wsi.datasets.mnist import load_digit_pools
from ats_wsi.experiments.runner import (
    baseline_schema,
    build_ats,
    build_baseline,
    finish_run,
    first_batch,
    load_checked_config,
    new_results,
    start_run,
    train_model,
    write_attention_figures,
)
from ats_wsi.model import ATSModel
from ats_wsi.training import (
    ForwardFn,
    StepOutput,
    ats_forward,
    param_groups,
    seed_everything,
    to_device_float,
)

__all__ = [
    "CHOICES",
    "SCHEMA",
    "build_datasets",
    "cnn_forward",
    "load_config",
    "run",
    "save_figures",
]

_NUM = (int, float)
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))


SCHEMA: dict[str, Any] = {
    "seed": ((int,), 0),
    "device": ((str,), "auto"),
    "data": {
        "mnist_dir": (_OPT_STR, None),
        "test_split_start": (_OPT_INT, None),
        "canvas_size": ((int,), 1500),
        "scale": (_NUM, 0.12),
        "n_digits": ((int,), 5),
        "n_target": ((int,), 3),
        "n_noise": ((int,), 50),
        "n_patterns": ((int,), 50),
        "noise_order": ((str,), "after"),
        "target": ((str,), "majority"),
        "n_train": ((int,), REQUIRED),
        "n_test": ((int,), REQUIRED),
        "high_dtype": ((str,), "float32"),
        "num_workers": ((int,), 0),
    },
    "model": {
        "attention_net": ((str,), "mnist"),
        "attention_net_args": ((dict,), {}),  # constructor kwargs of the registry entry
        "feature_net": ((str,), "mnist"),
        "feature_net_args": ((dict,), {}),
        "n_patches": ((int,), 10),
        "patch_size": ((int,), 50),
        "sampler": ((str,), "without_replacement"),
        "eval_sampler": (_OPT_STR, None),
        "smoothing": (_NUM, 1e-5),
    },
    "train": {
        "epochs": ((int,), REQUIRED),
        "batch_size": ((int,), 128),
        "lr": (_NUM, 1e-3),
        # lr multiplier of the linear head: on unit-norm features its weights must grow
        # large before predictions get confident, which at the base lr takes ~1000 steps.
        "head_lr_multiplier": (_NUM, 1.0),
        "clip_norm": ((int, float, type(None)), 1.0),
        "entropy_lambda": (_NUM, 1e-4),
        "eval_every": ((int,), 1),
        "checkpoint_every": ((int,), 1),
        "time_budget_minutes": ((int, float, type(None)), None),
    },
    "baselines": {
        "low_res_cnn": baseline_schema(),
        "full_res_cnn": baseline_schema(),
    },
    "report": {
        "n_figures": ((int,), 4),
        "cost_batch_size": ((int,), 8),
        "cost_repeats": ((int,), 3),
    },
}


def cnn_forward(view: int) -> ForwardFn:
    """Forward function feeding batch element ``view`` (0: low-res, 1: full-res) to a CNN."""

    def forward(model: nn.Module, batch: Any, device: torch.device) -> StepOutput:
        return StepOutput(model(to_device_float(batch[view], device)), batch[-1].to(device))

    return forward


CHOICES: dict[tuple[str, ...], tuple[Any, ...]] = {
    ("data", "noise_order"): ("after", "before"),
    ("data", "target"): ("majority", "max", "top"),
    ("data", "high_dtype"): ("float32", "uint8"),
    ("model", "sampler"): ("with_replacement", "without_replacement"),
    ("model", "eval_sampler"): (None, "with_replacement", "without_replacement", "topk"),
    ("baselines", "low_res_cnn", "pool"): ("avg", "max"),
    ("baselines", "full_res_cnn", "pool"): ("avg", "max"),
}


def load_config(path: str) -> dict[str, Any]:
    """The checked config at ``path`` (raises :class:`~ats_wsi.config.ConfigError`)."""
    return load_checked_config(path, SCHEMA, CHOICES)


def build_datasets(cfg: Mapping[str, Any], views: str = "both") -> tuple[MegapixelMNIST, ...]:
    """Train and test Megapixel MNIST from disjoint digit pools (seeds ``seed``, ``seed+1``)."""
    d = cfg["data"]
    train_pool, test_pool = load_digit_pools(d["mnist_dir"], d["test_split_start"])
    common = dict(
        canvas_size=d["canvas_size"],
        scale=d["scale"],
        n_digits=d["n_digits"],
        n_target=d["n_target"],
        n_noise=d["n_noise"],
        n_patterns=d["n_patterns"],
        noise_order=d["noise_order"],
        target=d["target"],
        high_dtype=d["high_dtype"],
        pattern_seed=cfg["seed"],
        views=views,
    )
    train = MegapixelMNIST(train_pool, d["n_train"], seed=2 * cfg["seed"], **common)
    test = MegapixelMNIST(test_pool, d["n_test"], seed=2 * cfg["seed"] + 1, **common)
    return train, test


def save_figures(
    model: ATSModel,
    ds: Dataset,
    out_dir: Path,
    n: int,
    device: torch.device,
    forward_kwargs: Mapping[str, Any],
    seed: int,
    prefix: str = "ats_test",
) -> list[str]:
    """Attention figures for the first ``n`` items of ``ds``; returns the file names."""
    if n <= 0:
        return []
    x_low, x_high, y = first_batch(ds, n)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = ats_forward(gen, **forward_kwargs)(model, (x_low, x_high, y), device).extra
    return write_attention_figures(
        out_dir, out, x_low, y, x_high.shape[-2:], model.patch_size, prefix=prefix
    )


def run(
    cfg: dict[str, Any],
    out_dir: Path,
    *,
    config_path: str = "<dict>",
    resume_run: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train and evaluate ATS and the enabled baselines; write and return ``results.json``."""
    t_run = time.perf_counter()
    device = start_run(cfg, out_dir, resume_run)
    train_ds, test_ds = build_datasets(cfg)
    num_classes = 10
    t = cfg["train"]
    results = new_results(
        "megapixel_mnist",
        config_path,
        cfg,
        device,
        train_ds,
        test_ds,
        noise_order=train_ds.noise_order,
        canvas_size=list(train_ds.canvas_size),
        low_size=list(train_ds.low_size),
    )
    shared = dict(  # arguments of every train_model call
        cfg=cfg,
        out_dir=out_dir,
        device=device,
        cost_batch=first_batch(test_ds, cfg["report"]["cost_batch_size"]),
        resume_run=resume_run,
        progress=progress,
    )

    # ---- ATS
    seed_everything(cfg["seed"])
    model = build_ats(cfg, 1, num_classes).to(device)
    opt = torch.optim.Adam(param_groups(model, t["lr"], t["head_lr_multiplier"]), lr=t["lr"])
    shuffle_gen = torch.Generator().manual_seed(cfg["seed"])
    sample_gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1)
    eval_gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 2)
    eval_kwargs = {}
    if cfg["model"]["eval_sampler"]:
        eval_kwargs["sampler"] = cfg["model"]["eval_sampler"]
    results["models"]["ats"] = train_model(
        "ats",
        model,
        opt,
        train_ds,
        test_ds,
        batch_size=t["batch_size"],
        epochs=t["epochs"],
        budget_minutes=t["time_budget_minutes"],
        generators={"shuffle": shuffle_gen, "sample": sample_gen, "eval": eval_gen},
        forward=ats_forward(sample_gen),
        eval_forward=ats_forward(eval_gen, **eval_kwargs),
        entropy_lambda=t["entropy_lambda"],
        cost_forward=ats_forward(torch.Generator(device=device).manual_seed(0)),
        cost_used=(0, 1),
        **shared,
    )
    results["models"]["ats"]["figures"] = save_figures(
        model, test_ds, out_dir, cfg["report"]["n_figures"], device, eval_kwargs, cfg["seed"]
    )
    del model, opt

    # ---- baselines: a CNN on the low-res view, a CNN on the full-resolution image
    for name, view in (("low_res_cnn", 0), ("full_res_cnn", 1)):
        b = cfg["baselines"][name]
        if not b["enabled"]:
            continue
        views = "low" if view == 0 else "high"
        b_train, b_test = build_datasets(cfg, views=views)
        seed_everything(cfg["seed"])
        cnn = build_baseline(b, 1, num_classes).to(device)
        results["models"][name] = train_model(
            name,
            cnn,
            torch.optim.Adam(param_groups(cnn, b["lr"], t["head_lr_multiplier"]), lr=b["lr"]),
            b_train,
            b_test,
            batch_size=b["batch_size"] or t["batch_size"],
            epochs=b["epochs"] or t["epochs"],
            budget_minutes=b["time_budget_minutes"],
            generators={"shuffle": torch.Generator().manual_seed(cfg["seed"])},
            forward=cnn_forward(view),
            cost_forward=cnn_forward(view),
            cost_used=(view,),
            **shared,
        )
        del cnn

    return finish_run(results, out_dir, t_run)
