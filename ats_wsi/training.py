"""The training engine: seeding, steps, losses, evaluation and the one epoch loop (:func:`fit`).

Generic over what a batch is: a *forward function* turns ``(model, batch, device)`` into a
:class:`StepOutput` (logits, targets and, for attention models, the attention distribution
used by the entropy regulariser). :func:`ats_forward` handles ``(x_low, x_high, y)`` batches
for :class:`ats_wsi.model.ATSModel`; whole-slide pipelines pass their own.

:func:`fit` is the one epoch loop (resume, evaluation cadence, time budget, best and last
checkpoints, JSON-lines log, DDP rank 0 writing); it calls the caller's epoch steps, which
:func:`loader_steps` builds for DataLoaders and :mod:`ats_wsi.slides.trainer` for slides.
Checkpoints and logs are written by :mod:`ats_wsi.checkpoint`.
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ats_wsi.attention import entropy_regulariser
from ats_wsi.checkpoint import append_jsonl, read_jsonl, resume, save_checkpoint

__all__ = [
    "EpochStep",
    "FitSettings",
    "ForwardFn",
    "NonFiniteLossError",
    "StepOutput",
    "ats_forward",
    "check_finite",
    "class_balanced_weights",
    "compute_loss",
    "dist_info",
    "evaluate",
    "fit",
    "loader_steps",
    "param_groups",
    "pick_device",
    "recalibrate_batchnorm",
    "seed_everything",
    "summarise_history",
    "to_device_float",
    "train_epoch",
]

# ----------------------------------------------------------------------------- seeding


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed Python, NumPy and torch (CPU and CUDA); return a CPU generator seeded with ``seed``.

    ``deterministic`` also asks torch for deterministic kernels (slower; some ops warn).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - seeds third-party code using the legacy global RNG
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
    return torch.Generator().manual_seed(seed)


def pick_device(name: str) -> torch.device:
    """``auto``: CUDA when available, else CPU; anything else as ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- steps


@dataclass
class StepOutput:
    """What the loss needs from one batch.

    Attributes:
        logits: (B, classes).
        targets: (B,) int64 class indices.
        probs: (B, K) attention distribution for the entropy regulariser, or None.
        extra: anything else the caller wants back (not used by the engine).
    """

    logits: Tensor
    targets: Tensor
    probs: Tensor | None = None
    extra: Any = None


ForwardFn = Callable[[nn.Module, Any, torch.device], StepOutput]


def to_device_float(x: Tensor, device: torch.device | str) -> Tensor:
    """Move ``x`` to ``device`` as float; uint8 images become [0, 1]."""
    # uint8 images travel as bytes (4x less to copy) and become [0, 1] floats on the device.
    x = x.to(device, non_blocking=True)
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def ats_forward(generator: torch.Generator | None = None, **model_kwargs: Any) -> ForwardFn:
    """Forward function for ``(x_low, x_high, y)`` batches and an ``ATSModel``.

    A uint8 ``x_high`` is read patch by patch (never converted as a whole).

    ``generator`` makes the patch sampling reproducible; ``model_kwargs`` (e.g.
    ``sampler="topk"``) are passed to ``model.forward``. A model that returns a plain tensor
    is treated as logits, so the same function serves ATS-like models without attention.
    """

    def forward(model: nn.Module, batch: Any, device: torch.device) -> StepOutput:
        x_low, x_high, y = batch[0], batch[1], batch[2]
        x_low = to_device_float(x_low, device)
        x_high = x_high.to(device, non_blocking=True)
        # A uint8 image stays bytes: TensorPatchSource converts only the cut patches.
        source = x_high if x_high.dtype == torch.uint8 else x_high.float()
        gen = generator
        if gen is not None and gen.device.type != device.type:
            gen = None  # a CPU generator cannot drive CUDA sampling
        out = model(x_low, source, generator=gen, **model_kwargs)
        y = y.to(device)
        if isinstance(out, Tensor):
            return StepOutput(out, y)
        return StepOutput(out.logits, y, out.probs, out)

    return forward


def class_balanced_weights(labels: Iterable[int], num_classes: int) -> Tensor:
    """Cross-entropy weights ``n / (C * n_c)`` (classes absent from ``labels`` get 0)."""
    counts = np.bincount(np.asarray(list(labels), dtype=np.int64), minlength=num_classes)
    counts = counts[:num_classes].astype(np.float64)
    w = np.where(counts > 0, counts.sum() / (num_classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(w, dtype=torch.float32)


def compute_loss(
    step: StepOutput,
    entropy_lambda: float = 0.0,
    class_weights: Tensor | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Cross-entropy (optionally class-weighted) plus ``entropy_lambda * entropy_regulariser``.

    Returns the loss tensor and its parts as floats.
    """
    w = None if class_weights is None else class_weights.to(step.logits.device)
    ce = F.cross_entropy(step.logits, step.targets, weight=w)
    loss = ce
    parts = {"ce": float(ce.detach())}
    if entropy_lambda and step.probs is not None:
        reg = entropy_regulariser(step.probs)
        loss = loss + entropy_lambda * reg
        parts["entropy_reg"] = float(reg.detach())
    return loss, parts


def _metrics(prefix: str, losses: list[tuple[float, int]], y: list[Tensor], p: list[Tensor]):
    from sklearn.metrics import balanced_accuracy_score

    n = sum(b for _, b in losses)
    yt = torch.cat(y).numpy() if y else np.zeros(0, np.int64)
    yp = torch.cat(p).numpy() if p else np.zeros(0, np.int64)
    acc = float((yt == yp).mean()) if n else float("nan")
    with warnings.catch_warnings():
        # sklearn warns when predictions contain classes absent from the targets.
        warnings.simplefilter("ignore")
        bacc = float(balanced_accuracy_score(yt, yp)) if n else float("nan")
    return {
        f"{prefix}loss": sum(v * b for v, b in losses) / max(n, 1),
        f"{prefix}accuracy": acc,
        f"{prefix}balanced_accuracy": bacc,
        f"{prefix}error": 1.0 - acc,
        f"{prefix}n": n,
    }


def _progress(iterable: Any, enabled: bool | None, desc: str) -> Any:
    from tqdm.auto import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, disable=not enabled, leave=False, dynamic_ncols=True)


def train_epoch(
    model: nn.Module,
    loader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    *,
    forward: ForwardFn | None = None,
    device: torch.device | str = "cpu",
    entropy_lambda: float = 0.0,
    class_weights: Tensor | None = None,
    clip_norm: float | None = None,
    progress: bool | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over ``loader`` with gradient steps; returns ``train_*`` metrics.

    Metrics are computed on the training-mode predictions made along the way (as Keras
    reports them), so they lag the weights by up to an epoch.
    """
    forward = forward or ats_forward()
    device = torch.device(device)
    model.train()
    losses: list[tuple[float, int]] = []
    ys: list[Tensor] = []
    preds: list[Tensor] = []
    for k, batch in enumerate(_progress(loader, progress, desc)):
        step = forward(model, batch, device)
        loss, _ = compute_loss(step, entropy_lambda, class_weights)
        check_finite(loss, f"{desc}, step {k + 1}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_norm:
            nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
        optimizer.step()
        losses.append((float(loss.detach()), len(step.targets)))
        ys.append(step.targets.detach().cpu())
        preds.append(step.logits.detach().argmax(1).cpu())
    return _metrics("train_", losses, ys, preds)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    forward: ForwardFn | None = None,
    device: torch.device | str = "cpu",
    entropy_lambda: float = 0.0,
    class_weights: Tensor | None = None,
    progress: bool | None = None,
    prefix: str = "test_",
) -> dict[str, float]:
    """Loss, accuracy, balanced accuracy and error over ``loader`` (``{prefix}*`` keys)."""
    forward = forward or ats_forward()
    device = torch.device(device)
    model.eval()
    losses: list[tuple[float, int]] = []
    ys: list[Tensor] = []
    preds: list[Tensor] = []
    for batch in _progress(loader, progress, prefix.rstrip("_") or "eval"):
        step = forward(model, batch, device)
        loss, _ = compute_loss(step, entropy_lambda, class_weights)
        losses.append((float(loss), len(step.targets)))
        ys.append(step.targets.cpu())
        preds.append(step.logits.argmax(1).cpu())
    return _metrics(prefix, losses, ys, preds)


def recalibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[Any],
    *,
    forward: ForwardFn | None = None,
    device: torch.device | str = "cpu",
) -> int:
    """Set every BatchNorm's running statistics to their plain average over ``batches``,
    computed with the current weights ("precise BN"); returns how many batches ran.

    The momentum average that training keeps mixes statistics of many recent weight states;
    after a fast change, evaluation with it can collapse to one class while batch statistics
    are fine. Every other buffer (e.g. ATSModel's control variate) is left as it was. No
    batch runs when the model has no BatchNorm. Unlike ``torch.optim.swa_utils.update_bn``,
    which calls ``model(batch[0])``, batches go through a ``forward`` function, so ATS models
    (low-res view plus full-resolution source) work too.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    forward = forward or ats_forward()
    device = torch.device(device)
    was_training = model.training
    bn_buffers = {id(b) for m in bns for b in m.buffers()}
    others = [(b, b.clone()) for b in model.buffers() if id(b) not in bn_buffers]
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    n = 0
    model.train()
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch, device)
                n += 1
    finally:
        for m, momentum in zip(bns, momenta, strict=True):
            m.momentum = momentum
        for buf, saved in others:
            buf.copy_(saved)
        model.train(was_training)
    return n


# ----------------------------------------------------------------------------- fit


def param_groups(
    model: nn.Module, lr: float, head_lr_multiplier: float, encoder_lr: float | None = None
) -> list[dict[str, Any]]:
    """Optimizer groups of the trainable parameters: the rest at ``lr``, the ``head`` module at
    ``lr * head_lr_multiplier`` and, when ``model`` holds pretrained encoders with trainable
    blocks, those at ``encoder_lr`` (default ``lr``) in a third group."""
    head = list(model.head.parameters())
    from ats_wsi.encoders.protocol import encoder_parameters  # imports no timm

    encoder = encoder_parameters(model)
    taken = {id(p) for p in head} | {id(p) for p in encoder}
    rest = [p for p in model.parameters() if id(p) not in taken and p.requires_grad]
    groups = [{"params": rest, "lr": lr}, {"params": head, "lr": lr * head_lr_multiplier}]
    if encoder:
        groups.append({"params": encoder, "lr": lr if encoder_lr is None else encoder_lr})
    return groups


EpochStep = Callable[[int], dict[str, Any]]


class NonFiniteLossError(RuntimeError):
    """A training loss was NaN or infinite; raised before its backward pass, so the weights
    (and the last checkpoint) are those of the previous step."""


def check_finite(loss: Tensor, where: str) -> None:
    """Raise :class:`NonFiniteLossError` naming ``where`` unless ``loss`` is finite."""
    if not bool(torch.isfinite(loss.detach()).all()):
        raise NonFiniteLossError(f"{where}: loss is {float(loss.detach())}; training stopped")


def dist_info() -> tuple[int, int]:
    """(rank, world size) of the torch.distributed process group, (0, 1) without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _better(metric: str, new: float | None, best: float | None) -> bool:
    if new is None:
        return False
    if best is None:
        return True
    return new < best if metric.endswith("loss") else new > best


@dataclass(frozen=True)
class FitSettings:
    """:func:`fit`'s policy: how many epochs, how often it evaluates and checkpoints, the
    checkpoint file names (``{name}`` is the model's name), the metric that picks the best
    epoch (None: no best checkpoint) and the wall-clock budget in seconds."""

    epochs: int
    eval_every: int = 1
    checkpoint_every: int = 1
    checkpoint_name: str = "{name}_checkpoint.pt"
    best_name: str = "{name}_best.pt"
    select_metric: str | None = None
    time_budget_s: float | None = None


class _RunFiles:
    """Where :func:`fit` keeps a run: the metrics log and the last / best checkpoints in a
    folder, or (no folder) the records in memory and no checkpoint at all."""

    def __init__(
        self, out_dir: str | Path | None, name: str, checkpoint_name: str, best_name: str
    ) -> None:
        self.memory: list[dict[str, Any]] = []
        self.log = self.ckpt = self.best = None
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.log = out / f"{name}_metrics.jsonl"
            self.ckpt = out / checkpoint_name.format(name=name)
            self.best = out / best_name.format(name=name)

    def clear_log(self) -> None:
        if self.log is not None and self.log.exists():
            self.log.unlink()

    def append(self, record: dict[str, Any]) -> None:
        if self.log is None:
            self.memory.append(record)
        else:
            append_jsonl(self.log, record)

    def records(self) -> list[dict[str, Any]]:
        return self.memory if self.log is None else read_jsonl(self.log)

    def save_last(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: Any,
        epoch: int,
        config: Mapping[str, Any] | None,
        generators: Mapping[str, torch.Generator] | None,
        info: dict[str, Any],
    ) -> None:
        if self.ckpt is not None:
            save_checkpoint(
                self.ckpt,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                epoch=epoch,
                config=config,
                generators=generators,
                extra=info,
            )

    def save_best(
        self,
        model: nn.Module,
        epoch: int,
        config: Mapping[str, Any] | None,
        info: dict[str, Any],
        improved: bool,
    ) -> None:
        if self.best is not None and (improved or not self.best.exists()):
            save_checkpoint(self.best, model=model, epoch=epoch, config=config, extra=info)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_step: EpochStep,
    loop: FitSettings,
    *,
    out_dir: str | Path | None,
    name: str = "ats",
    eval_step: EpochStep | None = None,
    before_eval: Callable[[], Any] | None = None,
    device: torch.device | str = "cpu",
    scheduler: Any = None,
    config: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    extra: Mapping[str, Any] | None = None,
    resume_run: bool = False,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """The epoch loop: train, evaluate, checkpoint, log; resumable and DDP-aware. ``loop``
    holds its policy (epochs, cadences, file names, best-epoch metric, time budget).

    ``train_step(epoch)`` runs one training epoch and returns its ``train_*`` metrics;
    ``eval_step(epoch)`` returns evaluation metrics and runs every ``eval_every`` epochs and
    after the last one (a run stopped by ``time_budget_s`` ends evaluated). ``before_eval``
    runs before every evaluation and checkpoint (e.g. BatchNorm recalibration).
    :func:`loader_steps` makes both steps from DataLoaders.

    Files in ``out_dir``: ``{name}_metrics.jsonl`` (one record per epoch) and
    ``checkpoint_name`` (model / optimizer / scheduler state, epoch, ``config``, ``extra``,
    RNG states of torch and of ``generators``; written atomically before the epoch's log
    line, so a log line never refers to a lost state). With ``select_metric`` (a ``*loss``
    metric is minimised, anything else maximised) the best epoch is also kept as
    ``best_name``. With ``resume_run`` and an existing checkpoint, training goes on from the
    epoch after it and later log lines are dropped. ``scheduler.step()`` runs once per epoch.

    ``out_dir`` None trains in memory: no file is written or resumed, and the records are
    returned (benchmarks that train many models in worker processes).

    Under torch.distributed every rank runs the steps (they gather their own metrics); rank 0
    writes the files (the log is read by rank 0 alone), and all ranks meet at a barrier after
    resuming and after each epoch. Returns every record of the metrics log (earlier runs
    included; [] on other ranks).
    """
    rank, world = dist_info()
    core = model.module if hasattr(model, "module") else model
    files = _RunFiles(out_dir, name, loop.checkpoint_name, loop.best_name)
    start, best = 1, None
    if resume_run and files.ckpt is not None and files.ckpt.exists():
        state = resume(
            files.ckpt,
            model=core,
            optimizer=optimizer,
            scheduler=scheduler,
            log_path=files.log if rank == 0 else None,
            generators=generators,
            map_location=torch.device(device),
        )
        start, best = state.start_epoch, state.extra.get("best")
    elif rank == 0:
        files.clear_log()  # a fresh run must not inherit an old run's lines
    # Every rank has looked for (and read) the checkpoint before rank 0 may overwrite it.
    _barrier(world)
    t_start = time.perf_counter()
    for epoch in range(start, loop.epochs + 1):
        t0 = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, "model": name, "world_size": world}
        record["lr"] = float(optimizer.param_groups[0]["lr"])
        record.update(train_step(epoch))
        record["train_time_s"] = time.perf_counter() - t0
        if scheduler is not None:
            scheduler.step()
        # Decided before evaluating, so that a run stopped by its budget ends evaluated.
        budget = loop.time_budget_s
        out_of_time = budget is not None and time.perf_counter() - t_start > budget
        last = epoch == loop.epochs or out_of_time
        evaluate_now = eval_step is not None and (epoch % loop.eval_every == 0 or last)
        checkpoint_now = epoch % loop.checkpoint_every == 0 or last
        if before_eval is not None and (evaluate_now or checkpoint_now):
            before_eval()
        if evaluate_now:
            record.update(eval_step(epoch))
        record["epoch_time_s"] = time.perf_counter() - t0
        if rank == 0:
            improved = loop.select_metric is not None and _better(
                loop.select_metric, record.get(loop.select_metric), best
            )
            if improved:
                best = record[loop.select_metric]
            info = {**(extra or {}), "best": best, "select_metric": loop.select_metric}
            # Checkpoint before logging: a log line never refers to a state that was lost.
            if checkpoint_now:
                files.save_last(core, optimizer, scheduler, epoch, config, generators, info)
            if loop.select_metric is not None:
                files.save_best(core, epoch, config, info, improved)
                record["best"] = best
            files.append(record)
            if on_epoch_end is not None:
                on_epoch_end(epoch, record)
        _barrier(world)
        if out_of_time and epoch < loop.epochs:
            break
    return files.records() if rank == 0 else []


def loader_steps(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    eval_loader: Iterable[Any] | None = None,
    *,
    name: str = "ats",
    epochs: int | None = None,
    forward: ForwardFn | None = None,
    eval_forward: ForwardFn | None = None,
    device: torch.device | str = "cpu",
    entropy_lambda: float = 0.0,
    class_weights: Tensor | None = None,
    clip_norm: float | None = None,
    progress: bool | None = None,
    bn_loader: Iterable[Any] | None = None,
) -> dict[str, Any]:
    """:func:`fit`'s ``train_step``, ``eval_step`` and ``before_eval`` over DataLoaders.

    Training runs :func:`train_epoch`, evaluation :func:`evaluate` (with ``eval_forward``, else
    ``forward``); with ``bn_loader`` BatchNorm statistics are recomputed over it
    (:func:`recalibrate_batchnorm`) before every evaluation and checkpoint.
    """

    def train_step(epoch: int) -> dict[str, Any]:
        return train_epoch(
            model,
            train_loader,
            optimizer,
            forward=forward,
            device=device,
            entropy_lambda=entropy_lambda,
            class_weights=class_weights,
            clip_norm=clip_norm,
            progress=progress,
            desc=f"{name} epoch {epoch}/{epochs or '?'}",
        )

    def eval_step(epoch: int) -> dict[str, Any]:
        return evaluate(
            model,
            eval_loader,
            forward=eval_forward or forward,
            device=device,
            entropy_lambda=entropy_lambda,
            class_weights=class_weights,
            progress=progress,
        )

    def before_eval() -> None:
        recalibrate_batchnorm(model, bn_loader, forward=eval_forward or forward, device=device)

    return {
        "train_step": train_step,
        "eval_step": eval_step if eval_loader is not None else None,
        "before_eval": before_eval if bn_loader is not None else None,
    }


def summarise_history(history: list[dict[str, Any]], epochs: int, n_train: int) -> dict[str, Any]:
    """Final test metrics and the measured training time per sample from a :func:`fit` log."""
    evaluated = [r for r in history if "test_error" in r]
    last = evaluated[-1] if evaluated else {}
    train_s = sum(r["train_time_s"] for r in history)
    return {
        "epochs_planned": epochs,
        "epochs_completed": history[-1]["epoch"] if history else 0,
        "test_error": last.get("test_error"),
        "test_accuracy": last.get("test_accuracy"),
        "test_balanced_accuracy": last.get("test_balanced_accuracy"),
        "test_evaluated_at_epoch": last.get("epoch"),
        "best_test_error": min((r["test_error"] for r in evaluated), default=None),
        "final_train_loss": history[-1]["train_loss"] if history else None,
        "final_train_accuracy": history[-1]["train_accuracy"] if history else None,
        "train_wall_time_s": train_s,
        "train_time_per_sample_ms": 1e3 * train_s / max(1, n_train * len(history)),
    }
