"""Megapixel MNIST benchmark (ATS_SPEC 2.1): ATS and two CNN baselines in one run.

    python -m pipelines.megapixel_mnist --config configs/megapixel_mnist.yaml \
        [--mnist-dir DIR] [--out DIR] [--resume] [--device cpu|cuda] [--no-progress]

Writes to ``--out`` (default ``runs/<config name>``): ``{model}_metrics.jsonl`` and
``{model}_checkpoint.pt`` per model, ``figures/*.png`` (attention on a few test images) and
``results.json`` (test error, time and peak memory per sample for every model, data source,
noise order, machine). ``--resume`` continues every model from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ats_wsi.baselines import BaselineCNN
from ats_wsi.benchmarking import describe_machine, write_json
from ats_wsi.config import (
    REQUIRED,
    ConfigError,
    check_choices,
    check_resume_config,
    load_yaml_config,
)
from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST
from ats_wsi.datasets.mnist import load_digit_pools
from ats_wsi.model import ATSModel
from ats_wsi.training import (
    ForwardFn,
    StepOutput,
    ats_forward,
    fit,
    library_versions,
    measure_step_cost,
    param_groups,
    pick_device,
    seed_everything,
    summarise_history,
    to_device_float,
)
from pipelines.common import RESUMABLE, baseline_schema, run_and_report

__all__ = ["SCHEMA", "cnn_forward", "main", "run"]

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


_CHOICES = {
    ("data", "noise_order"): ("after", "before"),
    ("data", "target"): ("majority", "max", "top"),
    ("data", "high_dtype"): ("float32", "uint8"),
    ("model", "sampler"): ("with_replacement", "without_replacement"),
    ("model", "eval_sampler"): (None, "with_replacement", "without_replacement", "topk"),
    ("baselines", "low_res_cnn", "pool"): ("avg", "max"),
    ("baselines", "full_res_cnn", "pool"): ("avg", "max"),
}


def _loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    cfg: Mapping[str, Any],
    device: torch.device,
    generator: torch.Generator | None = None,
) -> DataLoader:
    workers = int(cfg["data"]["num_workers"])
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=2 if workers > 0 else None,
    )


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


def build_ats(cfg: Mapping[str, Any], in_channels: int, num_classes: int) -> ATSModel:
    """The paper's ATS model from the ``model`` block."""
    m = cfg["model"]
    return ATSModel.from_config(
        {
            "attention_net": {
                **m["attention_net_args"],
                "name": m["attention_net"],
                "in_channels": in_channels,
            },
            "feature_net": {
                **m["feature_net_args"],
                "name": m["feature_net"],
                "in_channels": in_channels,
            },
            "num_classes": num_classes,
            "n_patches": m["n_patches"],
            "patch_size": m["patch_size"],
            "sampler": m["sampler"],
            "smoothing": m["smoothing"],
        }
    )


def _first_batch(ds: Dataset, n: int) -> tuple[Tensor, ...]:
    items = [ds[i] for i in range(min(n, len(ds)))]
    return tuple(
        torch.stack([torch.as_tensor(it[k]) for it in items]) for k in range(len(items[0]))
    )


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
    from ats_wsi.viz import save_attention_figure

    if n <= 0:
        return []
    x_low, x_high, y = _first_batch(ds, n)
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        out = ats_forward(gen, **forward_kwargs)(model, (x_low, x_high, y), device).extra
    names = []
    pred = out.logits.argmax(1).cpu()
    for i in range(len(y)):
        path = out_dir / "figures" / f"{prefix}_{i:02d}.png"
        save_attention_figure(
            path,
            x_low[i],
            out.attention[i],
            out.locations[i],
            model.patch_size,
            tuple(x_high.shape[-2:]),
            patches=out.patches[i],
            title=f"label {int(y[i])}, predicted {int(pred[i])}",
        )
        names.append(str(path.relative_to(out_dir)))
    return names


def _measure(
    model: nn.Module,
    batch: tuple[Tensor, ...],
    forward: ForwardFn,
    device: torch.device,
    repeats: int,
    used: Sequence[int],
) -> dict[str, Any]:
    """Train-step and inference cost per sample; inputs counted are the views ``used``."""
    n_bytes = sum(batch[k].numel() * batch[k].element_size() for k in used)
    on_device = tuple(t.to(device) for t in batch)
    return {
        mode: measure_step_cost(
            model,
            on_device,
            forward=forward,
            device=device,
            train=mode == "train",
            repeats=repeats,
            input_bytes=n_bytes,
        )
        for mode in ("train", "inference")
    }


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
    device = pick_device(cfg["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = out_dir / "config.json"
    if resume_run and cfg_file.exists():
        check_resume_config(
            json.loads(cfg_file.read_text()), cfg, str(out_dir), resumable=RESUMABLE
        )
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    budget = cfg["train"]["time_budget_minutes"]
    train_ds, test_ds = build_datasets(cfg)
    num_classes = 10
    t = cfg["train"]
    results: dict[str, Any] = {
        "benchmark": "megapixel_mnist",
        "config_file": config_path,
        "config": cfg,
        "data": {
            "train_source": train_ds.source,
            "test_source": test_ds.source,
            "n_train": len(train_ds),
            "n_test": len(test_ds),
            "noise_order": train_ds.noise_order,
            "canvas_size": list(train_ds.canvas_size),
            "low_size": list(train_ds.low_size),
        },
        "device": str(device),
        "machine": describe_machine(),
        "versions": library_versions(),
        "models": {},
    }
    cost_batch = _first_batch(test_ds, cfg["report"]["cost_batch_size"])

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
    history = fit(
        model,
        opt,
        _loader(train_ds, t["batch_size"], True, cfg, device, shuffle_gen),
        epochs=t["epochs"],
        out_dir=out_dir,
        name="ats",
        eval_loader=_loader(test_ds, t["batch_size"], False, cfg, device),
        eval_every=t["eval_every"],
        forward=ats_forward(sample_gen),
        eval_forward=ats_forward(eval_gen, **eval_kwargs),
        device=device,
        entropy_lambda=t["entropy_lambda"],
        clip_norm=t["clip_norm"],
        config=cfg,
        generators={"shuffle": shuffle_gen, "sample": sample_gen, "eval": eval_gen},
        checkpoint_every=t["checkpoint_every"],
        resume_run=resume_run,
        time_budget_s=None if budget is None else 60.0 * budget,
        progress=progress,
    )
    results["models"]["ats"] = summarise_history(history, t["epochs"], len(train_ds))
    results["models"]["ats"]["cost"] = _measure(
        model,
        cost_batch,
        ats_forward(torch.Generator(device=device).manual_seed(0)),
        device,
        cfg["report"]["cost_repeats"],
        used=(0, 1),
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
        cnn = BaselineCNN(
            1, num_classes, b["width"], b["depth"], b["stem_kernel"], b["stem_stride"], b["pool"]
        ).to(device)
        bs = b["batch_size"] or t["batch_size"]
        epochs = b["epochs"] or t["epochs"]
        b_shuffle = torch.Generator().manual_seed(cfg["seed"])
        history = fit(
            cnn,
            torch.optim.Adam(param_groups(cnn, b["lr"], t["head_lr_multiplier"]), lr=b["lr"]),
            _loader(b_train, bs, True, cfg, device, b_shuffle),
            epochs=epochs,
            out_dir=out_dir,
            name=name,
            eval_loader=_loader(b_test, bs, False, cfg, device),
            eval_every=t["eval_every"],
            forward=cnn_forward(view),
            device=device,
            clip_norm=t["clip_norm"],
            config=cfg,
            generators={"shuffle": b_shuffle},
            checkpoint_every=t["checkpoint_every"],
            resume_run=resume_run,
            time_budget_s=None
            if b["time_budget_minutes"] is None
            else 60.0 * b["time_budget_minutes"],
            progress=progress,
        )
        results["models"][name] = summarise_history(history, epochs, len(b_train))
        results["models"][name]["cost"] = _measure(
            cnn,
            cost_batch,
            cnn_forward(view),
            device,
            cfg["report"]["cost_repeats"],
            used=(view,),
        )
        del cnn

    results["wall_time_s"] = time.perf_counter() - t_run
    results["complete"] = all(
        m.get("epochs_completed") == m.get("epochs_planned") for m in results["models"].values()
    )
    write_json(out_dir / "results.json", results)
    return results


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.megapixel_mnist",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", required=True, help="YAML config (see configs/)")
    p.add_argument("--mnist-dir", help="folder with MNIST IDX files (overrides data.mnist_dir)")
    p.add_argument("--out", help="output folder (default runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoints")
    p.add_argument("--device", help="cpu, cuda, cuda:N or auto (overrides the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_yaml_config(args.config, SCHEMA)
        check_choices(cfg, args.config, _CHOICES)
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.mnist_dir:
        cfg["data"]["mnist_dir"] = args.mnist_dir
    return run_and_report(run, cfg, args)


if __name__ == "__main__":
    sys.exit(main())
