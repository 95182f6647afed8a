"""Megapixel MNIST (ATS_SPEC 2.1): ATS and two CNN baselines trained and measured in one run.

:func:`run` writes to its output folder ``{model}_metrics.jsonl`` and ``{model}_checkpoint.pt``
per model, ``figures/*.png`` (attention on a few test images) and ``results.json`` (test error,
time and peak memory per sample for every model, data source, noise order, machine); with
``resume_run`` every model continues from its checkpoint. ``python -m pipelines.megapixel_mnist``
is its command line.

With ``accel.device_data`` the run follows the GPU protocol
(:mod:`ats_wsi.experiments.device_protocol`): batches rendered on the device, the ``accel``
speed settings, the side-by-side step costs and a test-error figure.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ats_wsi.config import REQUIRED, validate
from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST
from ats_wsi.datasets.megapixel_mnist_device import DeviceMegapixelMNIST
from ats_wsi.datasets.mnist import load_digit_pools
from ats_wsi.experiments import device_protocol as dp
from ats_wsi.experiments.runner import (
    ExperimentRun,
    baseline_schema,
    build_ats,
    build_baseline,
    enabled_baselines,
    eval_sampler_kwargs,
    first_batch,
    load_checked_config,
    run_generators,
    write_attention_figures,
)
from ats_wsi.model import ATSModel
from ats_wsi.training import ForwardFn, StepOutput, ats_forward, to_device_float

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
    "accel": dp.ACCEL_SCHEMA,  # the GPU protocol (device_protocol); off by default
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
    **dp.ACCEL_CHOICES,
}


def load_config(path: str) -> dict[str, Any]:
    """The checked config at ``path`` (raises :class:`~ats_wsi.config.ConfigError`)."""
    return load_checked_config(path, SCHEMA, CHOICES, dp.check_accel)


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


_VIEWS = {"low_res_cnn": 0, "full_res_cnn": 1}  # batch element each CNN baseline reads


def run(
    cfg: dict[str, Any],
    out_dir: Path,
    *,
    config_path: str = "<dict>",
    resume_run: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Train and evaluate ATS and the enabled baselines; write and return ``results.json``.

    With ``accel.device_data`` (the GPU protocol) ``results.json`` adds ``accel`` (settings
    in effect), ``step_costs`` (:func:`~ats_wsi.experiments.device_protocol.
    compare_step_costs` rows, also each model's ``cost``), samples/s per model and
    ``figures/test_error.png``.
    """
    # Runs written before the accel block existed resume as runs with it off.
    added = {"accel": validate({}, dp.ACCEL_SCHEMA)}
    exp = ExperimentRun(cfg, out_dir, resume_run=resume_run, progress=progress, added=added)
    train_ds, test_ds = build_datasets(cfg)
    if cfg["accel"]["device_data"]:
        _train_on_device(exp, train_ds, test_ds, config_path)
    else:
        _train_from_loaders(exp, train_ds, test_ds, config_path)
    return exp.finish()


def _data_info(train_ds: MegapixelMNIST) -> dict[str, Any]:
    return {
        "noise_order": train_ds.noise_order,
        "canvas_size": list(train_ds.canvas_size),
        "low_size": list(train_ds.low_size),
    }


def _train_from_loaders(
    exp: ExperimentRun, train_ds: MegapixelMNIST, test_ds: MegapixelMNIST, config_path: str
) -> None:
    """The models on DataLoaders of the lazily generated images, cost measured per model."""
    cfg, device = exp.cfg, exp.device
    cost_batch = first_batch(test_ds, cfg["report"]["cost_batch_size"])
    exp.begin(
        "megapixel_mnist",
        config_path,
        train_ds,
        test_ds,
        cost_batch=cost_batch,
        **_data_info(train_ds),
    )
    gens = run_generators(cfg, device, sampling=True)
    eval_kwargs = eval_sampler_kwargs(cfg)

    def figures(model: nn.Module) -> dict[str, Any]:
        n, seed = cfg["report"]["n_figures"], cfg["seed"]
        return {"figures": save_figures(model, test_ds, exp.out_dir, n, device, eval_kwargs, seed)}

    exp.train(
        "ats",
        lambda: build_ats(cfg, 1, 10),
        (train_ds, test_ds),
        generators=gens,
        forward=ats_forward(gens["sample"]),
        eval_forward=ats_forward(gens["eval"], **eval_kwargs),
        entropy_lambda=cfg["train"]["entropy_lambda"],
        cost_forward=ats_forward(torch.Generator(device=device).manual_seed(0)),
        cost_used=(0, 1),
        after=figures,
    )
    # Baselines: a CNN on the low-res view, a CNN on the full-resolution image, each on
    # datasets that render only its view.
    for name in enabled_baselines(cfg):
        view = _VIEWS[name]
        exp.train(
            name,
            partial(build_baseline, cfg["baselines"][name], 1, 10),
            build_datasets(cfg, views="low" if view == 0 else "high"),
            generators=run_generators(cfg, device),
            forward=cnn_forward(view),
            cost_forward=cnn_forward(view),
            cost_used=(view,),
        )


def _train_on_device(
    exp: ExperimentRun, train_ds: MegapixelMNIST, test_ds: MegapixelMNIST, config_path: str
) -> None:
    """The GPU protocol: the models on device-rendered batches with the ``accel`` settings,
    then the side-by-side step costs and the test-error figure."""
    cfg, device = exp.cfg, exp.device
    a, p, hd = cfg["accel"], cfg["model"]["patch_size"], cfg["data"]["high_dtype"]
    backends = dp.configure_backends(device)
    t0 = time.perf_counter()
    train_dev = DeviceMegapixelMNIST(train_ds, device)
    test_dev = DeviceMegapixelMNIST(test_ds, device)
    results = exp.begin(
        "megapixel_mnist",
        config_path,
        train_dev,
        test_dev,
        **_data_info(train_ds),
        rendering="device (placements as tensors)",
        placement_tables_s=time.perf_counter() - t0,  # one-off: building the tables
    )
    results["accel"] = {**dp.active_accel(device, a), **backends}
    data = (train_dev, test_dev)
    speed = {k: a[k] for k in ("amp", "channels_last", "compile")}
    gens = run_generators(cfg, device, sampling=True)
    eval_kwargs = eval_sampler_kwargs(cfg)

    def ats() -> nn.Module:
        model = build_ats(cfg, 1, 10).to(device)
        dp.accelerate_ats_(model, device, a)
        return model

    exp.train(
        "ats",
        ats,
        data,
        generators=gens,
        loaders=dp.device_loaders(*data, patch_size=p, high_dtype=hd),
        rates=True,
        forward=dp.source_forward(gens["sample"]),
        eval_forward=dp.source_forward(gens["eval"], **eval_kwargs),
        entropy_lambda=cfg["train"]["entropy_lambda"],
        after=lambda m: {
            "figures": dp.save_device_figures(m, test_dev, exp.out_dir, cfg, device, eval_kwargs)
        },
    )
    for name in enabled_baselines(cfg):
        view = _VIEWS[name]

        def cnn(b: Mapping[str, Any] = cfg["baselines"][name]) -> nn.Module:
            model = build_baseline(b, 1, 10).to(device)
            dp.accelerate_(model, device, **speed)
            return model

        exp.train(
            name,
            cnn,
            data,
            generators=run_generators(cfg, device),
            loaders=dp.device_loaders(*data, views="low" if view == 0 else "high"),
            rates=True,
            forward=dp.view_forward(view),
        )

    # Side-by-side step costs, the feature net over the whole image included.
    rows = dp.compare_step_costs(
        cfg,
        device,
        train_ds.pool,
        sizes=a["cost_sizes"] or [train_ds.canvas_size[0]],
        batch_sizes=a["cost_batch_sizes"],
        full_image_max_batch=a["cost_full_image_max_batch"],
        repeats=a["cost_repeats"],
        accel=results["accel"],
    )
    dp.attach_step_costs(results, rows)
    fig = dp.save_error_figure(exp.out_dir, list(results["models"]))
    results["figures"] = [fig] if fig else []
    print(dp.format_costs(rows))
