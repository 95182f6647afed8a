"""What the paper experiments (Megapixel MNIST, speed limits) share: config checks, model
and loader construction, training one model with :func:`ats_wsi.training.fit` and measuring
its cost, attention figures, and the ``results.json`` every run writes."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from ats_wsi.baselines import BaselineCNN
from ats_wsi.benchmarking import describe_machine, measure_step_cost, write_json
from ats_wsi.checkpoint import library_versions
from ats_wsi.config import check_choices, check_resume_config, load_yaml_config
from ats_wsi.model import ATSModel
from ats_wsi.training import (
    ForwardFn,
    fit,
    loader_steps,
    pick_device,
    summarise_history,
)

__all__ = [
    "RESUMABLE",
    "baseline_schema",
    "budget_seconds",
    "build_ats",
    "build_baseline",
    "finish_run",
    "first_batch",
    "load_checked_config",
    "make_loader",
    "measure_cost",
    "new_results",
    "start_run",
    "train_model",
    "write_attention_figures",
]

# Keys that may change between a run and its --resume (everything else must match).
RESUMABLE = frozenset(
    {
        ("train", "epochs"),
        ("train", "time_budget_minutes"),
        ("device",),
        ("data", "num_workers"),
        ("report",),  # what is measured after training, not how the model was trained
        ("baselines",),  # each model resumes from its own checkpoint
    }
)


# ----------------------------------------------------------------------------- config


def baseline_schema() -> dict[str, Any]:
    """Schema of one CNN baseline block (:class:`ats_wsi.baselines.BaselineCNN`)."""
    return {
        "enabled": ((bool,), True),
        "epochs": ((int, type(None)), None),  # None: same as ATS
        "batch_size": ((int, type(None)), None),
        "lr": ((int, float), 1e-3),
        "width": ((int,), 32),
        "depth": ((int,), 4),
        "stem_kernel": ((int,), 7),
        "stem_stride": ((int,), 1),
        "pool": ((str,), "avg"),
        "time_budget_minutes": ((int, float, type(None)), None),
    }


def budget_seconds(minutes: float | None) -> float | None:
    """A ``time_budget_minutes`` value in seconds (None: no budget)."""
    return None if minutes is None else 60.0 * minutes


def load_checked_config(
    path: str,
    schema: Mapping[str, Any],
    choices: Mapping[tuple[str, ...], tuple[Any, ...]],
    *checks: Callable[[Mapping[str, Any], str], None],
) -> dict[str, Any]:
    """Load a YAML config against ``schema``, then check ``choices`` and every ``check``.

    Raises :class:`~ats_wsi.config.ConfigError` naming the file and key (``OSError`` when the
    file cannot be read).
    """
    cfg = load_yaml_config(path, schema)
    check_choices(cfg, path, choices)
    for check in checks:
        check(cfg, path)
    return cfg


# ----------------------------------------------------------------------------- models, data


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


def build_baseline(b: Mapping[str, Any], in_channels: int, num_classes: int) -> BaselineCNN:
    """The CNN of a baseline block (see :func:`baseline_schema`)."""
    arch = ("width", "depth", "stem_kernel", "stem_stride", "pool")
    return BaselineCNN(in_channels, num_classes, **{k: b[k] for k in arch})


def make_loader(
    ds: Dataset,
    batch_size: int,
    shuffle: bool,
    cfg: Mapping[str, Any],
    device: torch.device,
    generator: torch.Generator | None = None,
) -> DataLoader:
    """DataLoader with ``data.num_workers`` workers (kept alive), pinned memory on CUDA."""
    workers = int(cfg["data"]["num_workers"])
    return DataLoader(
        ds,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


def first_batch(ds: Dataset, n: int) -> tuple[Tensor, ...]:
    """The first ``n`` items of ``ds`` stacked field by field."""
    items = [ds[i] for i in range(min(n, len(ds)))]
    return tuple(
        torch.stack([torch.as_tensor(it[k]) for it in items]) for k in range(len(items[0]))
    )


# ----------------------------------------------------------------------------- run


def start_run(cfg: Mapping[str, Any], out_dir: Path, resume_run: bool) -> torch.device:
    """Pick the device, create ``out_dir`` and write ``config.json`` (checked on resume)."""
    device = pick_device(cfg["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = out_dir / "config.json"
    if resume_run and cfg_file.exists():
        check_resume_config(
            json.loads(cfg_file.read_text()), cfg, str(out_dir), resumable=RESUMABLE
        )
    cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
    return device


def new_results(
    benchmark: str,
    config_path: str,
    cfg: Mapping[str, Any],
    device: torch.device,
    train_ds: Any,
    test_ds: Any,
    **data: Any,
) -> dict[str, Any]:
    """The ``results.json`` skeleton; ``data`` adds to the data block, ``models`` starts empty."""
    return {
        "benchmark": benchmark,
        "config_file": config_path,
        "config": cfg,
        "data": {
            "train_source": train_ds.source,
            "test_source": test_ds.source,
            "n_train": len(train_ds),
            "n_test": len(test_ds),
            **data,
        },
        "device": str(device),
        "machine": describe_machine(),
        "versions": library_versions(),
        "models": {},
    }


def measure_cost(
    model: nn.Module,
    batch: tuple[Tensor, ...],
    forward: ForwardFn,
    device: torch.device,
    repeats: int,
    used: Sequence[int] = (0,),
) -> dict[str, Any]:
    """Train-step and inference cost per sample; input bytes count the batch elements ``used``."""
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


def fit_loaders(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    test_loader: Iterable[Any],
    *,
    cfg: Mapping[str, Any],
    out_dir: Path,
    device: torch.device,
    epochs: int,
    budget_minutes: float | None,
    generators: dict[str, torch.Generator],
    resume_run: bool,
    progress: bool | None,
    **step_kwargs: Any,
) -> list[dict[str, Any]]:
    """:func:`fit` over two loaders with the experiment config's ``train`` settings (clip norm,
    evaluation and checkpoint cadence, budget); ``step_kwargs`` go to :func:`loader_steps`,
    except ``scheduler``, which goes to :func:`fit`. Returns the metrics history."""
    t = cfg["train"]
    scheduler = step_kwargs.pop("scheduler", None)
    steps = loader_steps(
        model,
        opt,
        train_loader,
        test_loader,
        name=name,
        epochs=epochs,
        device=device,
        clip_norm=t["clip_norm"],
        progress=progress,
        **step_kwargs,
    )
    return fit(
        model,
        opt,
        **steps,
        epochs=epochs,
        out_dir=out_dir,
        name=name,
        eval_every=t["eval_every"],
        device=device,
        scheduler=scheduler,
        config=cfg,
        generators=generators,
        checkpoint_every=t["checkpoint_every"],
        resume_run=resume_run,
        time_budget_s=budget_seconds(budget_minutes),
    )


def train_model(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train_ds: Dataset,
    test_ds: Dataset,
    *,
    cfg: Mapping[str, Any],
    out_dir: Path,
    device: torch.device,
    batch_size: int,
    epochs: int,
    budget_minutes: float | None,
    generators: dict[str, torch.Generator],
    cost_batch: tuple[Tensor, ...],
    cost_forward: ForwardFn,
    cost_used: Sequence[int] = (0,),
    resume_run: bool,
    progress: bool | None,
    **fit_kwargs: Any,
) -> dict[str, Any]:
    """Train ``model`` with :func:`fit`, then measure its cost; returns its results entry.

    The training set is shuffled with ``generators["shuffle"]``; ``fit_kwargs`` (``forward``,
    ``eval_forward``, ``bn_loader``, ...) go to :func:`loader_steps`, ``scheduler`` to
    :func:`fit`.
    """
    history = fit_loaders(
        name,
        model,
        opt,
        make_loader(train_ds, batch_size, True, cfg, device, generators["shuffle"]),
        make_loader(test_ds, batch_size, False, cfg, device),
        cfg=cfg,
        out_dir=out_dir,
        device=device,
        epochs=epochs,
        budget_minutes=budget_minutes,
        generators=generators,
        resume_run=resume_run,
        progress=progress,
        **fit_kwargs,
    )
    entry = summarise_history(history, epochs, len(train_ds))
    entry["cost"] = measure_cost(
        model, cost_batch, cost_forward, device, cfg["report"]["cost_repeats"], cost_used
    )
    return entry


def write_attention_figures(
    out_dir: Path,
    out: Any,
    x_low: Tensor,
    y: Tensor,
    high_size: Sequence[int],
    patch_size: int,
    class_names: Sequence[str] | None = None,
    prefix: str = "ats_test",
) -> list[str]:
    """One figure per item of the ATS output ``out`` under ``out_dir/figures``.

    Titles give the label and the prediction (``class_names`` or class indices). Returns the
    paths relative to ``out_dir``.
    """
    from ats_wsi.viz import save_attention_figure

    def name(k: Tensor) -> str:
        return class_names[int(k)] if class_names is not None else str(int(k))

    pred = out.logits.argmax(1).cpu()
    names = []
    for i in range(len(y)):
        path = out_dir / "figures" / f"{prefix}_{i:02d}.png"
        save_attention_figure(
            path,
            x_low[i],
            out.attention[i],
            out.locations[i],
            patch_size,
            tuple(high_size),
            patches=out.patches[i],
            title=f"label {name(y[i])}, predicted {name(pred[i])}",
        )
        names.append(str(path.relative_to(out_dir)))
    return names


def finish_run(results: dict[str, Any], out_dir: Path, t_run: float) -> dict[str, Any]:
    """Add ``wall_time_s`` (since ``t_run``) and ``complete``; write and return ``results.json``."""
    results["wall_time_s"] = time.perf_counter() - t_run
    results["complete"] = all(
        m.get("epochs_completed") == m.get("epochs_planned") for m in results["models"].values()
    )
    write_json(out_dir / "results.json", results)
    return results
