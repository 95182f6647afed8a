"""Megapixel MNIST's GPU protocol (issue 16): data rendered on the device, fast nets, costs.

What differs from :func:`ats_wsi.experiments.megapixel_mnist.run` (which calls :func:`run`
when ``accel.device_data`` is set):

* no DataLoader: :class:`~ats_wsi.datasets.megapixel_mnist_device.DeviceMegapixelMNIST`
  renders each batch on the device from the placements; ATS reads its patches from a
  :class:`~ats_wsi.datasets.megapixel_mnist_device.PlacementPatchSource`, so no canvas is
  built for it, and the CNNs get views / canvases rendered on the device;
* the nets can run under bf16 autocast, in channels_last and torch.compile'd
  (:func:`accelerate_`); on CPU all three are no-ops, so CPU results stay as they are;
* the paper's comparison, the same feature net applied convolutionally over the whole image
  (:class:`FullImageFeatureNet`), is measured side by side with an ATS training step at the
  canvas sizes of ``accel.cost_sizes`` (:func:`compare_step_costs`);
* results also give samples/s of every model and a test-error-by-epoch figure.

Same pixels as the CPU path (tests/test_megapixel_mnist_device.py). Shuffling and sampling
use their own generators, so a run is deterministic given the seed on CPU, but its batches
are not the DataLoader path's.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ats_wsi.benchmarking import PeakMemory, describe_machine, time_interleaved, write_json
from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST
from ats_wsi.datasets.megapixel_mnist_device import DeviceLoader, DeviceMegapixelMNIST
from ats_wsi.datasets.mnist import DigitPool, load_digit_pools
from ats_wsi.experiments.runner import (
    build_ats,
    build_baseline,
    finish_run,
    fit_loaders,
    new_results,
    start_run,
    write_attention_figures,
)
from ats_wsi.model import ATSModel
from ats_wsi.nets import build_feature_net
from ats_wsi.training import (
    ForwardFn,
    StepOutput,
    compute_loss,
    param_groups,
    seed_everything,
    summarise_history,
    to_device_float,
)

__all__ = [
    "ACCEL_CHOICES",
    "ACCEL_SCHEMA",
    "FullImageFeatureNet",
    "accelerate_",
    "compare_step_costs",
    "count_macs",
    "run",
    "source_forward",
    "view_forward",
]

_OPT_STR = (str, type(None))

ACCEL_SCHEMA: dict[str, Any] = {
    # Render batches on the device from the placements (this module); false: DataLoaders.
    "device_data": ((bool,), False),
    "amp": (_OPT_STR, None),  # "bf16": autocast the nets (CUDA only)
    "channels_last": ((bool,), False),  # CUDA only
    "compile": ((bool,), False),  # torch.compile the nets (CUDA only)
    # Side-by-side step costs (ATS vs the feature net over the whole image vs the CNNs).
    "cost_sizes": ((list,), []),  # canvas sizes; [] = the run's canvas only
    "cost_batch_sizes": ((list,), [8]),  # every model at each of these...
    "cost_full_image_max_batch": ((int,), 8),  # ...the full-image nets only up to this
    "cost_repeats": ((int,), 5),
}
ACCEL_CHOICES: dict[tuple[str, ...], tuple[Any, ...]] = {("accel", "amp"): (None, "bf16")}


# ----------------------------------------------------------------------------- nets


def accelerate_(
    module: nn.Module,
    device: torch.device | str,
    *,
    amp: str | None = None,
    channels_last: bool = False,
    compile: bool = False,
    on_cpu: bool = False,
) -> dict[str, Any]:
    """Make ``module`` fast on a GPU, in place; returns the settings in effect.

    ``amp="bf16"`` runs its forward under bf16 autocast and returns float32 (the estimators,
    softmax and loss stay in float32); ``channels_last`` converts its parameters and inputs;
    ``compile`` calls ``module.compile()``. Parameter names and the state dict are unchanged,
    so checkpoints load either way. Off the GPU nothing is done unless ``on_cpu`` (tests).
    """
    kind = torch.device(device).type
    on = kind == "cuda" or on_cpu
    active = {
        "amp": amp if on else None,
        "channels_last": bool(channels_last and on),
        "compile": bool(compile and on),
    }
    if active["amp"] not in (None, "bf16"):
        raise ValueError(f"amp must be None or 'bf16', got {amp!r}")
    if active["channels_last"]:
        module.to(memory_format=torch.channels_last)
    if active["amp"] or active["channels_last"]:
        inner = module.forward
        use_amp, use_cl = active["amp"] == "bf16", active["channels_last"]

        def forward(x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
            if use_cl and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            if not use_amp:
                return inner(x, *args, **kwargs)
            with torch.autocast(kind, dtype=torch.bfloat16):
                out = inner(x, *args, **kwargs)
            return out.float()

        # An instance attribute, not a wrapper module: parameter names stay as they are.
        module.forward = forward  # type: ignore[method-assign]
    if active["compile"]:
        module.compile(dynamic=False)
    return active


def accelerate_ats_(model: ATSModel, device: torch.device | str, accel: Mapping[str, Any]) -> dict:
    """:func:`accelerate_` on the attention and feature nets (sampling and estimator stay
    eager float32)."""
    kw = {k: accel[k] for k in ("amp", "channels_last", "compile")}
    accelerate_(model.attention_net, device, **kw)
    return accelerate_(model.feature_net, device, **kw)


class FullImageFeatureNet(nn.Module):
    """The paper's comparison: ATS's feature net applied convolutionally over the whole
    image (its global pool then covers the full canvas), then a linear head.

    Args:
        feature_net: (B, C, H, W) -> (B, D) L2-normalised, with ``out_dim`` (any ATS feature
            net whose convs work on a full image).
        num_classes: outputs of the head.
    """

    def __init__(self, feature_net: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.features = feature_net
        self.head = nn.Linear(int(feature_net.out_dim), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def build_full_image_features(cfg: Mapping[str, Any], num_classes: int = 10) -> FullImageFeatureNet:
    """:class:`FullImageFeatureNet` with the run's feature net (``model.feature_net*``)."""
    m = cfg["model"]
    net = build_feature_net(m["feature_net"], in_channels=1, **m["feature_net_args"])
    return FullImageFeatureNet(net, num_classes)


def count_macs(model: nn.Module, fn: Any) -> int:
    """Multiply-accumulates of the Conv2d and Linear layers of ``model`` while ``fn()`` runs."""
    total = [0]

    def hook(mod: nn.Module, inp: tuple[Tensor, ...], out: Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            k = mod.weight[0].numel()  # in_channels / groups * kh * kw
            total[0] += out.numel() * k
        else:
            total[0] += out.numel() * mod.in_features

    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return total[0]


# ----------------------------------------------------------------------------- forwards


def source_forward(generator: torch.Generator | None = None, **model_kwargs: Any) -> ForwardFn:
    """Forward function for ``(x_low, patch source, y)`` batches and an :class:`ATSModel`."""

    def forward(model: nn.Module, batch: Any, device: torch.device) -> StepOutput:
        x_low, source, y = batch[0], batch[1], batch[2]
        gen = generator
        if gen is not None and gen.device.type != device.type:
            gen = None  # a CPU generator cannot drive CUDA sampling
        out = model(to_device_float(x_low, device), source, generator=gen, **model_kwargs)
        return StepOutput(out.logits.float(), y.to(device), out.probs.float(), out)

    return forward


def view_forward(view: int) -> ForwardFn:
    """Forward function feeding batch element ``view`` (0: low-res view, 1: canvas) to a CNN;
    a uint8 canvas becomes [0, 1] floats on the device."""

    def forward(model: nn.Module, batch: Any, device: torch.device) -> StepOutput:
        logits = model(to_device_float(batch[view], device))
        return StepOutput(logits.float(), batch[-1].to(device))

    return forward


# ----------------------------------------------------------------------------- costs


def _train_step_fn(
    model: nn.Module, batch: Any, forward: ForwardFn, device: torch.device, lam: float
):
    def step() -> None:
        model.train()
        loss, _ = compute_loss(forward(model, batch, device), lam)
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def _infer_fn(model: nn.Module, batch: Any, forward: ForwardFn, device: torch.device):
    def step() -> None:
        model.eval()
        with torch.inference_mode():
            forward(model, batch, device)

    return step


def compare_step_costs(
    cfg: Mapping[str, Any],
    device: torch.device | str,
    pool: DigitPool,
    *,
    sizes: Sequence[int],
    batch_sizes: Sequence[int] = (8,),
    full_image_max_batch: int = 8,
    repeats: int = 5,
    accel: Mapping[str, Any] | None = None,
    models: Sequence[str] = ("ats", "full_image_features", "full_res_cnn", "low_res_cnn"),
) -> list[dict[str, Any]]:
    """Training-step and inference cost per sample of ATS, the feature net over the whole
    image and the two CNN baselines, timed interleaved (a, b, c, a, b, c, ...) per canvas
    size and batch size, with the run's nets and ``accel`` (amp, channels_last; never
    compile, so no model pays a compilation here).

    A training step is forward, loss (with the entropy term for ATS) and backward; memory is
    the tensor peak of one step (:class:`~ats_wsi.benchmarking.PeakMemory`) plus the input
    the model reads. Each row has ``*_vs_ats``: its cost over ATS's at the same size and batch.
    """
    device = torch.device(device)
    acc = {k: (accel or {}).get(k, d) for k, d in (("amp", None), ("channels_last", False))}
    d, lam = cfg["data"], float(cfg["train"]["entropy_lambda"])
    rows: list[dict[str, Any]] = []
    for size in sizes:
        nmax = max(batch_sizes)
        ds = MegapixelMNIST(
            pool,
            nmax,
            canvas_size=int(size),
            scale=d["scale"],
            n_noise=d["n_noise"],
            n_patterns=d["n_patterns"],
            noise_order=d["noise_order"],
            seed=cfg["seed"],
        )
        data = DeviceMegapixelMNIST(ds, device)
        for b in batch_sizes:
            idx = torch.arange(b)
            built: dict[str, tuple[nn.Module, Any, ForwardFn, int]] = {}
            torch.manual_seed(cfg["seed"])
            for name in models:
                if name in ("full_image_features", "full_res_cnn") and b > full_image_max_batch:
                    continue
                if name == "ats":
                    model: nn.Module = build_ats(cfg, 1, 10)
                    accelerate_ats_(model.to(device), device, {**acc, "compile": False})
                    gen = torch.Generator(device=device).manual_seed(0)
                    batch = data.batch(idx, "ats", cfg["model"]["patch_size"], d["high_dtype"])
                    fwd = source_forward(gen)
                    nbytes = batch[0].numel() * 4
                elif name == "low_res_cnn":
                    model = build_baseline(cfg["baselines"]["low_res_cnn"], 1, 10)
                    accelerate_(model.to(device), device, **acc)
                    batch = data.batch(idx, "low")
                    fwd, nbytes = view_forward(0), batch[0].numel() * 4
                else:
                    if name == "full_res_cnn":
                        model = build_baseline(cfg["baselines"]["full_res_cnn"], 1, 10)
                    else:
                        model = build_full_image_features(cfg)
                    accelerate_(model.to(device), device, **acc)
                    batch = data.batch(idx, "high", high_dtype="uint8")
                    fwd, nbytes = view_forward(1), batch[1].numel()
                built[name] = (model, batch, fwd, nbytes)
            train = time_interleaved(
                {n: _train_step_fn(m, bt, f, device, lam) for n, (m, bt, f, _) in built.items()},
                repeats=repeats,
                device=device,
            )
            infer = time_interleaved(
                {n: _infer_fn(m, bt, f, device) for n, (m, bt, f, _) in built.items()},
                repeats=repeats,
                device=device,
            )
            size_rows = []
            for name, (model, batch, fwd, nbytes) in built.items():
                with PeakMemory(device) as mem:
                    _train_step_fn(model, batch, fwd, device, lam)()
                macs = count_macs(model, lambda m=model, bt=batch, f=fwd: f(m, bt, device))
                size_rows.append(
                    {
                        "model": name,
                        "canvas": int(size),
                        "batch": b,
                        "train_ms_per_sample": train[name]["median_ms"] / b,
                        "inference_ms_per_sample": infer[name]["median_ms"] / b,
                        "train_peak_mb_per_sample": (mem.peak + nbytes) / b / 2**20,
                        "forward_gmacs_per_sample": macs / b / 1e9,
                        "params": int(sum(p.numel() for p in model.parameters())),
                        "repeats": repeats,
                    }
                )
            ats = next((r for r in size_rows if r["model"] == "ats"), None)
            for r in size_rows:
                if ats is not None:
                    for key in (
                        "train_ms_per_sample",
                        "inference_ms_per_sample",
                        "train_peak_mb_per_sample",
                        "forward_gmacs_per_sample",
                    ):
                        r[f"{key}_vs_ats"] = r[key] / max(ats[key], 1e-12)
            rows += size_rows
            del built
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def format_costs(rows: Sequence[Mapping[str, Any]]) -> str:
    """The :func:`compare_step_costs` rows as a plain-text table."""
    lines = [
        f"{'canvas':>6} {'B':>4} {'model':<20} {'train ms':>9} {'x ATS':>7} {'infer ms':>9} "
        f"{'MB':>8} {'x ATS':>7} {'GMAC':>8}"
    ]
    for r in rows:
        ratio = r.get("train_ms_per_sample_vs_ats")
        mem = r.get("train_peak_mb_per_sample_vs_ats")
        lines.append(
            f"{r['canvas']:>6} {r['batch']:>4} {r['model']:<20} {r['train_ms_per_sample']:>9.2f} "
            f"{'-' if ratio is None else f'{ratio:.1f}x':>7} "
            f"{r['inference_ms_per_sample']:>9.2f} {r['train_peak_mb_per_sample']:>8.1f} "
            f"{'-' if mem is None else f'{mem:.1f}x':>7} {r['forward_gmacs_per_sample']:>8.2f}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- run


def _configure_backends(device: torch.device) -> dict[str, Any]:
    """cuDNN autotuning and TF32 matmuls on CUDA (shapes are fixed); nothing on CPU."""
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    return {"cudnn_benchmark": True, "float32_matmul_precision": "high"}


def _train(
    name: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    train_loader: DeviceLoader,
    test_loader: DeviceLoader,
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
) -> dict[str, Any]:
    """:func:`fit_loaders` over device loaders; the results entry with samples/s."""
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
        **step_kwargs,
    )
    n_train = len(train_loader.data)
    entry = summarise_history(history, epochs, n_train)
    times = [r["train_time_s"] for r in history]
    entry["train_samples_per_s"] = n_train * len(times) / max(sum(times), 1e-9)
    # The first epoch of a call pays warm-up (cuDNN autotuning, compilation): the median
    # epoch is the steady rate.
    entry["median_epoch_train_s"] = statistics.median(times) if times else None
    entry["steady_train_samples_per_s"] = n_train / statistics.median(times) if times else None
    return entry


def save_error_figure(out_dir: Path, names: Sequence[str]) -> str | None:
    """``figures/test_error.png``: test error by epoch of every model that has a log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ats_wsi.checkpoint import read_jsonl

    fig, ax = plt.subplots(figsize=(6, 4))
    drawn = False
    for name in names:
        path = out_dir / f"{name}_metrics.jsonl"
        if not path.exists():
            continue
        recs = [r for r in read_jsonl(path) if "test_error" in r]
        if recs:
            ax.plot([r["epoch"] for r in recs], [100 * r["test_error"] for r in recs], label=name)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(90, color="grey", lw=0.8, ls=":", label="chance")
    ax.set(xlabel="epoch", ylabel="test error (%)", ylim=(0, 100), title="Megapixel MNIST")
    ax.legend()
    path = out_dir / "figures" / "test_error.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return str(path.relative_to(out_dir))


def run(
    cfg: dict[str, Any],
    out_dir: Path,
    *,
    config_path: str = "<dict>",
    resume_run: bool = False,
    progress: bool | None = None,
) -> dict[str, Any]:
    """The Megapixel MNIST experiment on device-rendered data; writes ``results.json``.

    Files as :func:`ats_wsi.experiments.megapixel_mnist.run` writes them, plus
    ``figures/test_error.png``; ``results.json`` adds ``accel`` (settings in effect),
    ``step_costs`` (:func:`compare_step_costs` rows) and samples/s per model.
    """
    from ats_wsi.experiments.megapixel_mnist import build_datasets

    t_run = time.perf_counter()
    device = start_run(cfg, out_dir, resume_run)
    a, t, m = cfg["accel"], cfg["train"], cfg["model"]
    backends = _configure_backends(device)
    train_ds, test_ds = build_datasets(cfg)
    t0 = time.perf_counter()
    train_dev = DeviceMegapixelMNIST(train_ds, device)
    test_dev = DeviceMegapixelMNIST(test_ds, device)
    tables_s = time.perf_counter() - t0
    results = new_results(
        "megapixel_mnist",
        config_path,
        cfg,
        device,
        train_dev,
        test_dev,
        noise_order=train_ds.noise_order,
        canvas_size=list(train_ds.canvas_size),
        low_size=list(train_ds.low_size),
        rendering="device (placements as tensors)",
        placement_tables_s=tables_s,
    )
    hd, p, bs = cfg["data"]["high_dtype"], m["patch_size"], t["batch_size"]

    # ---- ATS
    seed_everything(cfg["seed"])
    model = build_ats(cfg, 1, 10).to(device)
    results["accel"] = {**accelerate_ats_(model, device, a), **backends}
    opt = torch.optim.Adam(param_groups(model, t["lr"], t["head_lr_multiplier"]), lr=t["lr"])
    shuffle_gen = torch.Generator().manual_seed(cfg["seed"])
    sample_gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 1)
    eval_gen = torch.Generator(device=device).manual_seed(cfg["seed"] + 2)
    eval_kwargs = {"sampler": m["eval_sampler"]} if m["eval_sampler"] else {}
    results["models"]["ats"] = _train(
        "ats",
        model,
        opt,
        DeviceLoader(
            train_dev, bs, shuffle=True, generator=shuffle_gen, patch_size=p, high_dtype=hd
        ),
        DeviceLoader(test_dev, bs, patch_size=p, high_dtype=hd),
        cfg=cfg,
        out_dir=out_dir,
        device=device,
        epochs=t["epochs"],
        budget_minutes=t["time_budget_minutes"],
        generators={"shuffle": shuffle_gen, "sample": sample_gen, "eval": eval_gen},
        resume_run=resume_run,
        progress=progress,
        forward=source_forward(sample_gen),
        eval_forward=source_forward(eval_gen, **eval_kwargs),
        entropy_lambda=t["entropy_lambda"],
    )
    n_fig = min(cfg["report"]["n_figures"], len(test_dev))
    if n_fig > 0:
        x_low, source, y = test_dev.batch(torch.arange(n_fig), "ats", p, hd)
        model.eval()
        gen = torch.Generator(device=device).manual_seed(cfg["seed"])
        with torch.no_grad():
            out = source_forward(gen, **eval_kwargs)(model, (x_low, source, y), device).extra
        results["models"]["ats"]["figures"] = write_attention_figures(
            out_dir, out, x_low.cpu(), y.cpu(), train_dev.canvas_size, p
        )
    del model, opt

    # ---- baselines: CNNs on the low-res view and on the full canvas
    for name, view in (("low_res_cnn", 0), ("full_res_cnn", 1)):
        b = cfg["baselines"][name]
        if not b["enabled"]:
            continue
        seed_everything(cfg["seed"])
        cnn = build_baseline(b, 1, 10).to(device)
        accelerate_(
            cnn, device, amp=a["amp"], channels_last=a["channels_last"], compile=a["compile"]
        )
        gen = torch.Generator().manual_seed(cfg["seed"])
        views = "low" if view == 0 else "high"
        b_bs = b["batch_size"] or bs
        results["models"][name] = _train(
            name,
            cnn,
            torch.optim.Adam(param_groups(cnn, b["lr"], t["head_lr_multiplier"]), lr=b["lr"]),
            DeviceLoader(train_dev, b_bs, shuffle=True, generator=gen, views=views),
            DeviceLoader(test_dev, b_bs, views=views),
            cfg=cfg,
            out_dir=out_dir,
            device=device,
            epochs=b["epochs"] or t["epochs"],
            budget_minutes=b["time_budget_minutes"],
            generators={"shuffle": gen},
            resume_run=resume_run,
            progress=progress,
            forward=view_forward(view),
        )
        del cnn

    # ---- side-by-side step costs, the feature net over the whole image included
    sizes = a["cost_sizes"] or [train_ds.canvas_size[0]]
    rows = compare_step_costs(
        cfg,
        device,
        train_ds.pool,
        sizes=sizes,
        batch_sizes=a["cost_batch_sizes"],
        full_image_max_batch=a["cost_full_image_max_batch"],
        repeats=a["cost_repeats"],
        accel=results["accel"],
    )
    results["step_costs"] = rows
    for entry_name, entry in results["models"].items():
        mine = [r for r in rows if r["model"] == entry_name and r["canvas"] == sizes[0]]
        if mine:
            entry["cost"] = mine
            entry["step_samples_per_s"] = {
                str(r["batch"]): 1e3 / r["train_ms_per_sample"] for r in mine
            }
    fig = save_error_figure(out_dir, list(results["models"]))
    results["figures"] = [fig] if fig else []
    print(format_costs(rows))
    return finish_run(results, out_dir, t_run)


# ----------------------------------------------------------------------------- CLI


def load_config(path: str) -> dict[str, Any]:
    """The Megapixel MNIST config at ``path`` with the ``accel`` block (:data:`ACCEL_SCHEMA`)."""
    from ats_wsi.experiments import megapixel_mnist as mm
    from ats_wsi.experiments.runner import load_checked_config

    schema = dict(mm.SCHEMA)
    schema.setdefault("accel", ACCEL_SCHEMA)
    return load_checked_config(path, schema, {**mm.CHOICES, **ACCEL_CHOICES})


def main(argv: Sequence[str] | None = None) -> int:
    """Run the experiment of ``--config`` on device-rendered data (``accel.device_data`` is
    forced on), or with ``--costs-only`` only the side-by-side step-cost table."""
    from ats_wsi.experiments.cli import base_parser, load_or_report, run_and_report

    p = base_parser("python -m ats_wsi.experiments.megapixel_mnist_gpu", __doc__)
    p.add_argument("--mnist-dir", help="folder with MNIST IDX files (overrides data.mnist_dir)")
    p.add_argument(
        "--costs-only",
        action="store_true",
        help="measure step costs only; writes OUT/step_costs.json",
    )
    p.add_argument("--sizes", type=int, nargs="+", help="--costs-only canvas sizes")
    p.add_argument("--batch", type=int, nargs="+", help="--costs-only batch sizes")
    p.add_argument("--repeats", type=int, default=None, help="--costs-only timed calls")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_or_report(load_config, args.config)
    if cfg is None:
        return 2
    if args.mnist_dir:
        cfg["data"]["mnist_dir"] = args.mnist_dir
    cfg["accel"]["device_data"] = True
    if not args.costs_only:
        return run_and_report(run, cfg, args)
    from ats_wsi.training import pick_device

    device = pick_device(args.device or cfg["device"])
    a = cfg["accel"]
    accel = {k: a[k] for k in ("amp", "channels_last")}
    _configure_backends(device)
    pool, _ = load_digit_pools(cfg["data"]["mnist_dir"], cfg["data"]["test_split_start"])
    rows = compare_step_costs(
        cfg,
        device,
        pool,
        sizes=args.sizes or a["cost_sizes"] or [cfg["data"]["canvas_size"]],
        batch_sizes=args.batch or a["cost_batch_sizes"],
        full_image_max_batch=a["cost_full_image_max_batch"],
        repeats=args.repeats or a["cost_repeats"],
        accel=accel,
    )
    print(format_costs(rows))
    out = Path(args.out or "runs/step_costs") / "step_costs.json"
    payload = {"config": args.config, "device": str(device), "digits": pool.source, "rows": rows}
    write_json(out, {"machine": describe_machine(), **payload})
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
