"""What the paper experiments (Megapixel MNIST, speed limits) share: config checks, model
and loader construction, training one model with :func:`ats_wsi.training.fit` and measuring
its cost, attention figures, and the ``results.json`` every run writes.

:class:`ExperimentRun` is the scaffold of every experiment's ``run``: start the run folder,
the ``results.json`` skeleton, one :meth:`ExperimentRun.train` per model (seed, build, Adam,
:func:`fit`, cost, extras), :meth:`ExperimentRun.finish`; the experiment supplies only its
data, models and forward functions."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
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
    FitSettings,
    ForwardFn,
    fit,
    loader_steps,
    param_groups,
    pick_device,
    seed_everything,
    summarise_history,
)

__all__ = [
    "ExperimentRun",
    "LoaderFn",
    "RESUMABLE",
    "TrainSettings",
    "baseline_schema",
    "budget_seconds",
    "build_ats",
    "build_baseline",
    "enabled_baselines",
    "eval_sampler_kwargs",
    "finish_run",
    "first_batch",
    "fit_loaders",
    "load_checked_config",
    "make_loader",
    "measure_cost",
    "new_results",
    "run_generators",
    "start_run",
    "train_model",
    "train_rates",
    "train_settings",
    "write_attention_figures",
]

# ``(batch_size, shuffle generator) -> (train loader, test loader)``.
LoaderFn = Callable[[int, torch.Generator], tuple[Iterable[Any], Iterable[Any]]]

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


def start_run(
    cfg: Mapping[str, Any],
    out_dir: Path,
    resume_run: bool,
    *,
    added: Mapping[str, Any] | None = None,
) -> torch.device:
    """Pick the device, create ``out_dir`` and write ``config.json`` (checked on resume).

    ``added``: top-level sections added to the schema after runs were written; an older
    ``config.json`` without one is checked as if it held the value given (its default).
    """
    device = pick_device(cfg["device"])
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_file = out_dir / "config.json"
    if resume_run and cfg_file.exists():
        old = json.loads(cfg_file.read_text())
        old.update({k: v for k, v in (added or {}).items() if k not in old})
        check_resume_config(old, cfg, str(out_dir), resumable=RESUMABLE)
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
    loop = FitSettings(
        epochs=epochs,
        eval_every=t["eval_every"],
        checkpoint_every=t["checkpoint_every"],
        time_budget_s=budget_seconds(budget_minutes),
    )
    return fit(
        model,
        opt,
        loop=loop,
        **steps,
        out_dir=out_dir,
        name=name,
        device=device,
        scheduler=scheduler,
        config=cfg,
        generators=generators,
        resume_run=resume_run,
    )


def train_rates(history: Sequence[Mapping[str, Any]], n_train: int) -> dict[str, Any]:
    """Training samples/s of a :func:`fit` log, over all epochs and at the median epoch."""
    times = [r["train_time_s"] for r in history]
    # The first epoch of a call pays warm-up (cuDNN autotuning, compilation): the median
    # epoch is the steady rate.
    return {
        "train_samples_per_s": n_train * len(times) / max(sum(times), 1e-9),
        "median_epoch_train_s": statistics.median(times) if times else None,
        "steady_train_samples_per_s": n_train / statistics.median(times) if times else None,
    }


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
    cost_batch: tuple[Tensor, ...] | None = None,
    cost_forward: ForwardFn | None = None,
    cost_used: Sequence[int] = (0,),
    resume_run: bool,
    progress: bool | None,
    loaders: LoaderFn | None = None,
    rates: bool = False,
    **fit_kwargs: Any,
) -> dict[str, Any]:
    """Train ``model`` with :func:`fit`, then measure its cost; returns its results entry.

    ``loaders(batch_size, generators["shuffle"])`` makes the train and test loaders
    (default: DataLoaders over ``train_ds`` / ``test_ds``, :func:`make_loader`, the training
    set shuffled with ``generators["shuffle"]``). ``fit_kwargs`` (``forward``,
    ``eval_forward``, ``bn_loader``, ...) go to :func:`loader_steps`, ``scheduler`` to
    :func:`fit`. With ``cost_forward`` the entry gets ``cost`` (:func:`measure_cost` on
    ``cost_batch``), with ``rates`` the samples/s of :func:`train_rates`.
    """
    if loaders is None:
        shuffle = generators["shuffle"]
        train_loader = make_loader(train_ds, batch_size, True, cfg, device, shuffle)
        test_loader = make_loader(test_ds, batch_size, False, cfg, device)
    else:
        train_loader, test_loader = loaders(batch_size, generators["shuffle"])
    history = fit_loaders(
        name,
        model,
        opt,
        train_loader,
        test_loader,
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
    n_train = len(train_ds)  # type: ignore[arg-type]
    entry = summarise_history(history, epochs, n_train)
    if cost_forward is not None:
        if cost_batch is None:
            raise ValueError("cost_forward needs a cost_batch")
        entry["cost"] = measure_cost(
            model, cost_batch, cost_forward, device, cfg["report"]["cost_repeats"], cost_used
        )
    if rates:
        entry.update(train_rates(history, n_train))
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


# ----------------------------------------------------------------------------- scaffold


@dataclass(frozen=True)
class TrainSettings:
    """How one model is trained: the ``train`` block for ATS, a baseline block (its nulls
    filled from ``train``) for a baseline."""

    lr: float
    epochs: int
    batch_size: int
    budget_minutes: float | None


def train_settings(cfg: Mapping[str, Any], name: str) -> TrainSettings:
    """:class:`TrainSettings` of model ``name`` (``"ats"`` or a key of ``baselines``)."""
    t = cfg["train"]
    if name == "ats":
        return TrainSettings(t["lr"], t["epochs"], t["batch_size"], t["time_budget_minutes"])
    b = cfg["baselines"][name]
    return TrainSettings(
        lr=b["lr"],
        epochs=b["epochs"] or t["epochs"],
        batch_size=b["batch_size"] or t["batch_size"],
        budget_minutes=b["time_budget_minutes"],
    )


def enabled_baselines(cfg: Mapping[str, Any]) -> list[str]:
    """The names of the enabled baselines, in config order."""
    return [name for name, b in cfg["baselines"].items() if b["enabled"]]


def eval_sampler_kwargs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """Model kwargs of evaluation: ``{"sampler": model.eval_sampler}`` when one is set."""
    sampler = cfg["model"]["eval_sampler"]
    return {"sampler": sampler} if sampler else {}


def run_generators(
    cfg: Mapping[str, Any], device: torch.device, *, sampling: bool = False, augment: bool = False
) -> dict[str, torch.Generator]:
    """The checkpointed generators of one model: ``shuffle`` (CPU, ``seed``), with
    ``augment`` ``augment`` (CPU, ``seed + 3``), with ``sampling`` ATS's ``sample`` and
    ``eval`` (on ``device``, ``seed + 1`` and ``seed + 2``)."""
    seed = cfg["seed"]
    gens = {"shuffle": torch.Generator().manual_seed(seed)}
    if augment:
        gens["augment"] = torch.Generator().manual_seed(seed + 3)
    if sampling:
        gens["sample"] = torch.Generator(device=device).manual_seed(seed + 1)
        gens["eval"] = torch.Generator(device=device).manual_seed(seed + 2)
    return gens


class ExperimentRun:
    """One experiment run: the steps every experiment's ``run`` shares.

    ``ExperimentRun(cfg, out_dir, ...)`` starts the clock, picks the device and writes
    ``config.json`` (:func:`start_run`, with its ``added``); :meth:`begin` makes the
    ``results.json`` skeleton; :meth:`train` trains one model into ``results["models"]``;
    :meth:`finish` writes ``results.json``.
    """

    def __init__(
        self,
        cfg: dict[str, Any],
        out_dir: Path,
        *,
        resume_run: bool = False,
        progress: bool | None = None,
        added: Mapping[str, Any] | None = None,
    ) -> None:
        self.t_run = time.perf_counter()  # wall time of the whole run
        self.cfg, self.out_dir = cfg, out_dir
        self.resume_run, self.progress = resume_run, progress
        self.device = start_run(cfg, out_dir, resume_run, added=added)
        self.results: dict[str, Any] = {}
        self.cost_batch: tuple[Tensor, ...] | None = None

    def begin(
        self,
        benchmark: str,
        config_path: str,
        train_ds: Any,
        test_ds: Any,
        *,
        cost_batch: tuple[Tensor, ...] | None = None,
        **data: Any,
    ) -> dict[str, Any]:
        """The ``results.json`` skeleton (:func:`new_results`); ``cost_batch`` is the batch
        :meth:`train` measures costs on."""
        self.results = new_results(
            benchmark, config_path, self.cfg, self.device, train_ds, test_ds, **data
        )
        self.cost_batch = cost_batch
        return self.results

    def train(
        self,
        name: str,
        build: Callable[[], nn.Module],
        data: tuple[Dataset, Dataset],
        *,
        generators: dict[str, torch.Generator],
        scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
        after: Callable[[nn.Module], Mapping[str, Any]] | None = None,
        **train_kwargs: Any,
    ) -> dict[str, Any]:
        """Train model ``name`` and add its entry to ``results["models"]``; returns it.

        ``build()`` runs right after ``seed_everything(seed)``, so every model starts from
        the same RNG state; the model goes to the device and is trained by Adam over
        :func:`~ats_wsi.training.param_groups` with its :func:`train_settings`, by
        :func:`train_model` on ``data`` (``(train, test)``) with ``train_kwargs`` (``loaders``,
        ``forward``, ``eval_forward``, ``cost_forward``, ``rates``, ...), costs measured on
        the ``cost_batch`` of :meth:`begin`. ``scheduler(opt)`` makes an lr scheduler;
        ``after(model)`` adds fields to the entry (figures).
        """
        cfg, device = self.cfg, self.device
        s = train_settings(cfg, name)
        seed_everything(cfg["seed"])
        model = build().to(device)
        groups = param_groups(model, s.lr, cfg["train"]["head_lr_multiplier"])
        opt = torch.optim.Adam(groups, lr=s.lr)
        entry = train_model(
            name,
            model,
            opt,
            *data,
            cfg=cfg,
            out_dir=self.out_dir,
            device=device,
            batch_size=s.batch_size,
            epochs=s.epochs,
            budget_minutes=s.budget_minutes,
            generators=generators,
            cost_batch=self.cost_batch,
            resume_run=self.resume_run,
            progress=self.progress,
            scheduler=None if scheduler is None else scheduler(opt),
            **train_kwargs,
        )
        if after is not None:
            entry.update(after(model))
        self.results["models"][name] = entry
        return entry

    def finish(self) -> dict[str, Any]:
        """:func:`finish_run`: write and return ``results.json``."""
        return finish_run(self.results, self.out_dir, self.t_run)
