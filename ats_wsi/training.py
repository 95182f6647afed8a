"""Shared training engine: seeding, epoch loops, metrics log, atomic checkpoints, resume.

Generic over what a batch is: a *forward function* turns ``(model, batch, device)`` into a
:class:`StepOutput` (logits, targets and, for attention models, the attention distribution
used by the entropy regulariser). :func:`ats_forward` handles ``(x_low, x_high, y)`` batches
for :class:`ats_wsi.model.ATSModel`; whole-slide pipelines pass their own.

Files written by :func:`fit` in ``out_dir`` (``name`` distinguishes models trained in the same
run):

* ``{name}_metrics.jsonl``: one JSON object per epoch;
* ``{name}_checkpoint.pt``: model / optimizer / scheduler state, epoch, config, library
  versions and RNG states, written atomically and loadable with ``weights_only=True``.
"""

from __future__ import annotations

import json
import os
import platform
import random
import sys
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from ats_wsi.attention import entropy_regulariser

__all__ = [
    "PeakMemory",
    "ResumeState",
    "StepOutput",
    "ats_forward",
    "append_jsonl",
    "class_balanced_weights",
    "compute_loss",
    "evaluate",
    "fit",
    "library_versions",
    "load_checkpoint",
    "measure_step_cost",
    "param_groups",
    "pick_device",
    "read_jsonl",
    "recalibrate_batchnorm",
    "resume",
    "save_checkpoint",
    "seed_everything",
    "summarise_history",
    "to_device_float",
    "train_epoch",
    "truncate_jsonl",
]

CHECKPOINT_FORMAT = 1


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


def library_versions() -> dict[str, str]:
    """Versions recorded in checkpoints and results."""
    import sklearn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit-learn": sklearn.__version__,
        "ats_wsi": _ats_version(),
    }


def _ats_version() -> str:
    from ats_wsi import __version__

    return __version__


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


class _BytePatchSource:
    """:class:`ats_wsi.patches.PatchSource` over a uint8 (B, C, H, W) tensor: patches come out
    as float in [0, 1]."""

    def __init__(self, x_high: Tensor, patch_size: int) -> None:
        from ats_wsi.patches import TensorPatchSource

        self._inner = TensorPatchSource(x_high, patch_size)
        self.shape = self._inner.shape
        self.patch_size = self._inner.patch_size

    def extract(self, top_left: Tensor) -> Tensor:
        return self._inner.extract(top_left).float().div_(255.0)


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
        if x_high.dtype == torch.uint8:
            # Cut patches from the bytes and convert only them: the full image is never
            # materialised as floats (4x its size), which is the point of attention sampling.
            source: Any = _BytePatchSource(x_high, model.patch_size)
        else:
            source = x_high.float()
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
    for batch in _progress(loader, progress, desc):
        step = forward(model, batch, device)
        loss, _ = compute_loss(step, entropy_lambda, class_weights)
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


# ----------------------------------------------------------------------------- JSON lines


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> None:
    """Append one JSON object as a line (flushed and fsynced: a crash loses at most it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(dict(record)) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """All records of a JSON-lines file ([] if it does not exist; a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines) - 1:
                break  # interrupted while writing the last line
            raise ValueError(f"{path}: line {n + 1} is not JSON") from None
    return out


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write via a temp file in the same folder and ``os.replace`` (atomic on POSIX)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp creates 0600 files; give the result the permissions open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def truncate_jsonl(path: str | Path, max_epoch: int) -> int:
    """Drop records whose ``epoch`` is greater than ``max_epoch`` (atomically); return kept."""
    path = Path(path)
    records = read_jsonl(path)
    kept = [r for r in records if int(r.get("epoch", -1)) <= max_epoch]
    if len(kept) != len(records) or path.exists():
        text = "".join(json.dumps(r) + "\n" for r in kept).encode("utf-8")
        _atomic_write_bytes(path, lambda fh: fh.write(text))
    return len(kept)


# ----------------------------------------------------------------------------- checkpoints


def _plain(obj: Any, where: str = "state") -> Any:
    """Copy ``obj`` keeping only what ``torch.load(weights_only=True)`` accepts.

    Dict subclasses (e.g. the ``Counter`` in ``MultiStepLR``'s state) become dicts, subclasses
    of str / int / float their base type, sets sorted lists; anything else unknown is an
    error naming where it was found.
    """
    if obj is None or type(obj) in (bool, int, float, str, torch.dtype, torch.Size):
        return obj
    if isinstance(obj, Tensor):
        return obj
    # Subclasses (torch.__version__ is a str subclass, IntEnum an int one) are not allowed.
    for base in (bool, int, float, str):
        if isinstance(obj, base):
            return base(obj)
    if isinstance(obj, Mapping):
        return {k: _plain(v, f"{where}[{k!r}]") for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))
    if isinstance(obj, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    raise TypeError(f"{where}: {type(obj).__name__} cannot be stored in a weights-only checkpoint")


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    epoch: int,
    config: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a weights-only-loadable checkpoint after ``epoch`` (1-based).

    Stored: model, optimizer and scheduler ``state_dict``s, ``epoch``, ``config`` (plain
    data), library versions, torch's global CPU RNG state and the states of ``generators``
    (e.g. the DataLoader's shuffling generator), plus ``extra``.
    """
    path = Path(path)
    payload = _plain(
        {
            "format": CHECKPOINT_FORMAT,
            "epoch": int(epoch),
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "config": dict(config or {}),
            "versions": library_versions(),
            "rng": {
                "torch": torch.get_rng_state(),
                **{k: g.get_state() for k, g in (generators or {}).items()},
            },
            "extra": dict(extra or {}),
        }
    )
    _atomic_write_bytes(path, lambda fh: torch.save(payload, fh))
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with a format check."""
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an ats_wsi checkpoint (format {CHECKPOINT_FORMAT})")
    return ckpt


@dataclass
class ResumeState:
    """Where to continue: the next epoch (1-based) and what the checkpoint carried."""

    start_epoch: int
    config: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def resume(
    path: str | Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    log_path: str | Path | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    map_location: Any = "cpu",
) -> ResumeState:
    """Restore states from ``path`` and return the epoch to start from.

    Log lines written after the checkpoint (by a run that died before its next checkpoint)
    are dropped from ``log_path``, so the resumed run does not duplicate them.
    """
    ckpt = load_checkpoint(path, map_location)
    model.load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt["optimizer"] is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt["scheduler"] is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    rng = ckpt.get("rng", {})
    if "torch" in rng:
        torch.set_rng_state(rng["torch"])
    for name, gen in (generators or {}).items():
        if name in rng:
            gen.set_state(rng[name])
    epoch = int(ckpt["epoch"])
    if log_path is not None:
        truncate_jsonl(log_path, epoch)
    return ResumeState(epoch + 1, ckpt.get("config", {}), ckpt.get("extra", {}))


# ----------------------------------------------------------------------------- fit


def param_groups(model: nn.Module, lr: float, head_lr_multiplier: float) -> list[dict[str, Any]]:
    """Optimizer groups: the ``head`` module at ``lr * head_lr_multiplier``, the rest at ``lr``."""
    head = list(model.head.parameters())
    ids = {id(p) for p in head}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return [{"params": rest, "lr": lr}, {"params": head, "lr": lr * head_lr_multiplier}]


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader: Iterable[Any],
    *,
    epochs: int,
    out_dir: str | Path,
    name: str = "ats",
    eval_loader: Iterable[Any] | None = None,
    eval_every: int = 1,
    forward: ForwardFn | None = None,
    eval_forward: ForwardFn | None = None,
    device: torch.device | str = "cpu",
    scheduler: Any = None,
    entropy_lambda: float = 0.0,
    class_weights: Tensor | None = None,
    clip_norm: float | None = None,
    config: Mapping[str, Any] | None = None,
    generators: Mapping[str, torch.Generator] | None = None,
    checkpoint_every: int = 1,
    resume_run: bool = False,
    time_budget_s: float | None = None,
    progress: bool | None = None,
    on_epoch_end: Callable[[int, dict[str, Any]], None] | None = None,
    bn_loader: Iterable[Any] | None = None,
) -> list[dict[str, Any]]:
    """Train for ``epochs`` epochs (or until ``time_budget_s``), logging and checkpointing.

    With ``resume_run`` and an existing checkpoint, states are restored and training goes on
    from the epoch after it. ``scheduler.step()`` is called once per epoch. The final epoch
    is always checkpointed. With ``bn_loader``, BatchNorm statistics are recomputed over it
    (:func:`recalibrate_batchnorm`, with ``eval_forward``) before every evaluation and
    checkpoint. Returns every record of the metrics log (earlier runs included).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / f"{name}_metrics.jsonl"
    ckpt_path = out_dir / f"{name}_checkpoint.pt"
    device = torch.device(device)
    start = 1
    if resume_run and ckpt_path.exists():
        state = resume(
            ckpt_path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            log_path=log_path,
            generators=generators,
            map_location=device,
        )
        start = state.start_epoch
    elif log_path.exists():
        log_path.unlink()  # a fresh run must not inherit an old run's lines
    t_start = time.perf_counter()
    for epoch in range(start, epochs + 1):
        t0 = time.perf_counter()
        record: dict[str, Any] = {"epoch": epoch, "model": name}
        record["lr"] = float(optimizer.param_groups[0]["lr"])
        record.update(
            train_epoch(
                model,
                train_loader,
                optimizer,
                forward=forward,
                device=device,
                entropy_lambda=entropy_lambda,
                class_weights=class_weights,
                clip_norm=clip_norm,
                progress=progress,
                desc=f"{name} epoch {epoch}/{epochs}",
            )
        )
        record["train_time_s"] = time.perf_counter() - t0
        if scheduler is not None:
            scheduler.step()
        # Decided before evaluating, so that a run stopped by its budget ends evaluated.
        out_of_time = time_budget_s is not None and time.perf_counter() - t_start > time_budget_s
        last = epoch == epochs or out_of_time
        evaluate_now = eval_loader is not None and (epoch % eval_every == 0 or last)
        checkpoint_now = epoch % checkpoint_every == 0 or last
        if bn_loader is not None and (evaluate_now or checkpoint_now):
            recalibrate_batchnorm(model, bn_loader, forward=eval_forward or forward, device=device)
        if evaluate_now:
            record.update(
                evaluate(
                    model,
                    eval_loader,
                    forward=eval_forward or forward,
                    device=device,
                    entropy_lambda=entropy_lambda,
                    class_weights=class_weights,
                    progress=progress,
                )
            )
        record["epoch_time_s"] = time.perf_counter() - t0
        if checkpoint_now:
            # Checkpoint before logging: a log line never refers to a state that was lost.
            save_checkpoint(
                ckpt_path,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                epoch=epoch,
                config=config,
                generators=generators,
            )
        append_jsonl(log_path, record)
        if on_epoch_end is not None:
            on_epoch_end(epoch, record)
        if out_of_time and epoch < epochs:
            break
    return read_jsonl(log_path)


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


# ----------------------------------------------------------------------------- costs


class PeakMemory:
    """Peak bytes of tensors allocated inside the ``with`` block.

    CUDA: from the allocator's peak statistics. CPU: a dispatch-mode hook that counts every
    new tensor storage and releases it when the storage is freed (torch has no CPU allocator
    statistics). Tensors that existed before the block (parameters, inputs) are not counted.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak = 0
        self._live = 0
        self._seen: set[int] = set()
        self._mode: Any = None
        self._base = 0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = _StorageCounter(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._base
        else:
            self._mode.__exit__(*exc)

    def _track(self, t: Tensor, inputs: set[int]) -> None:
        if t.device.type != "cpu":
            return
        st = t.untyped_storage()
        key = st.data_ptr()
        # Views and in-place results share an input's storage: nothing new was allocated.
        if key in inputs or key in self._seen or st.nbytes() == 0:
            return
        self._seen.add(key)
        self._live += st.nbytes()
        self.peak = max(self.peak, self._live)
        # torch keeps a storage's Python object alive as long as the storage, so this fires
        # when the memory is actually released.
        weakref.finalize(st, self._release, key, st.nbytes())

    def _release(self, key: int, nbytes: int) -> None:
        self._seen.discard(key)
        self._live -= nbytes


class _StorageCounter(TorchDispatchMode):
    """Reports every tensor an op returns to a :class:`PeakMemory`."""

    def __init__(self, owner: PeakMemory) -> None:
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, Tensor) and t.device.type == "cpu"
        }
        for t in tree_flatten(out)[0]:
            if isinstance(t, Tensor):
                self.owner._track(t, inputs)
        return out


def measure_step_cost(
    model: nn.Module,
    batch: Any,
    *,
    forward: ForwardFn,
    device: torch.device | str = "cpu",
    train: bool = True,
    repeats: int = 3,
    input_bytes: int | None = None,
) -> dict[str, float]:
    """Time and peak memory of one forward (+ backward when ``train``) pass, per sample.

    ``peak_memory_per_sample_mb`` counts tensors created during the step plus
    ``input_bytes`` (the batch's tensors unless given), divided by the batch size. Timing is
    the median over ``repeats`` after one warm-up call; parameters are not updated.
    """
    import statistics

    device = torch.device(device)
    model.train(train)
    n = len(batch[-1])
    if input_bytes is None:
        input_bytes = sum(t.numel() * t.element_size() for t in batch if isinstance(t, Tensor))

    def step() -> None:
        with torch.set_grad_enabled(train):
            out = forward(model, batch, device)
            if train:
                loss, _ = compute_loss(out)
                loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up (allocator, cuDNN autotuning)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
    with PeakMemory(device) as mem:
        step()
    return {
        "time_per_sample_ms": statistics.median(times) * 1e3 / n,
        "peak_memory_per_sample_mb": (mem.peak + input_bytes) / n / 2**20,
        "batch_size": n,
        "mode": "train" if train else "inference",
    }
