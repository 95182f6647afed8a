"""Megapixel MNIST's GPU protocol (issue 16), the ``accel`` option of
:func:`ats_wsi.experiments.megapixel_mnist.run`: the pieces it uses when ``accel.device_data``
is set (this module has no ``run`` and no command line of its own).

* device-rendered batches: :class:`~ats_wsi.datasets.megapixel_mnist_device.
  DeviceMegapixelMNIST` renders each batch on the device from the placements
  (:func:`device_loaders`); ATS reads its patches from a
  :class:`~ats_wsi.datasets.megapixel_mnist_device.PlacementPatchSource`
  (:func:`source_forward`), so no canvas is built for it, and the CNNs get views / canvases
  rendered on the device (:func:`view_forward`);
* the nets can run under bf16 autocast, in channels_last and torch.compile'd
  (:func:`accelerate_`); on CPU all three are no-ops, so CPU results stay as they are;
* the paper's comparison, the same feature net applied convolutionally over the whole image
  (:class:`FullImageFeatureNet`), measured side by side with an ATS training step at the
  canvas sizes of ``accel.cost_sizes`` (:func:`compare_step_costs`, :func:`count_macs`);
* samples/s of every model (:func:`train_rates`) and a test-error-by-epoch figure
  (:func:`save_error_figure`).

Same pixels as the CPU path (tests/test_megapixel_mnist_device.py). Shuffling and sampling
use their own generators, so a run is deterministic given the seed on CPU, but its batches
are not the DataLoader path's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ats_wsi.benchmarking import PeakMemory, describe_machine, step_fn, time_interleaved
from ats_wsi.config import ConfigError
from ats_wsi.datasets.megapixel_mnist import MegapixelMNIST
from ats_wsi.datasets.megapixel_mnist_device import DeviceLoader, DeviceMegapixelMNIST
from ats_wsi.datasets.mnist import DigitPool, load_digit_pools
from ats_wsi.experiments.runner import LoaderFn, build_ats, build_baseline, write_attention_figures
from ats_wsi.model import ATSModel
from ats_wsi.nets import build_feature_net
from ats_wsi.training import ForwardFn, StepOutput, to_device_float

__all__ = [
    "ACCEL_CHOICES",
    "ACCEL_SCHEMA",
    "COST_MODELS",
    "FullImageFeatureNet",
    "accelerate_",
    "accelerate_ats_",
    "active_accel",
    "attach_step_costs",
    "build_full_image_features",
    "check_accel",
    "compare_step_costs",
    "configure_backends",
    "count_macs",
    "device_loaders",
    "format_costs",
    "save_device_figures",
    "save_error_figure",
    "source_forward",
    "step_cost_report",
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

COST_MODELS = ("ats", "full_image_features", "full_res_cnn", "low_res_cnn")


def check_accel(cfg: Mapping[str, Any], where: str) -> None:
    """The ``accel`` settings take effect only with ``device_data``: refuse them without it
    rather than ignore them."""
    a = cfg["accel"]
    if a["device_data"]:
        return
    changed = [k for k, (_, default) in ACCEL_SCHEMA.items() if a[k] != default]
    if changed:
        raise ConfigError(
            f"{where}: key 'accel.{changed[0]}' needs 'accel.device_data: true' "
            "(the accel settings apply to device-rendered data only)"
        )


# ----------------------------------------------------------------------------- nets


def active_accel(
    device: torch.device | str, accel: Mapping[str, Any], *, on_cpu: bool = False
) -> dict[str, Any]:
    """The settings :func:`accelerate_` puts in effect on ``device`` for the ``accel`` block
    (``amp``, ``channels_last``, ``compile``): all off unless on CUDA or ``on_cpu``."""
    on = torch.device(device).type == "cuda" or on_cpu
    return {
        "amp": accel["amp"] if on else None,
        "channels_last": bool(accel["channels_last"] and on),
        "compile": bool(accel["compile"] and on),
    }


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
    wanted = {"amp": amp, "channels_last": channels_last, "compile": compile}
    active = active_accel(device, wanted, on_cpu=on_cpu)
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


def device_loaders(
    train: DeviceMegapixelMNIST, test: DeviceMegapixelMNIST, **batch_kwargs: Any
) -> LoaderFn:
    """``(batch_size, shuffle generator) -> (train, test)`` :class:`DeviceLoader` s;
    ``batch_kwargs`` (``views``, ``patch_size``, ``high_dtype``) go to both."""

    def make(batch_size: int, generator: torch.Generator) -> tuple[DeviceLoader, DeviceLoader]:
        return (
            DeviceLoader(train, batch_size, shuffle=True, generator=generator, **batch_kwargs),
            DeviceLoader(test, batch_size, **batch_kwargs),
        )

    return make


# ----------------------------------------------------------------------------- costs


def _cost_model(
    name: str,
    cfg: Mapping[str, Any],
    data: DeviceMegapixelMNIST,
    idx: Tensor,
    device: torch.device,
    acc: Mapping[str, Any],
) -> tuple[nn.Module, Any, ForwardFn, int]:
    """Model ``name`` of :data:`COST_MODELS` on ``device`` with its batch (items ``idx``),
    forward function and the bytes of input it reads."""
    d = cfg["data"]
    if name == "ats":
        model: nn.Module = build_ats(cfg, 1, 10)
        accelerate_ats_(model.to(device), device, {**acc, "compile": False})
        gen = torch.Generator(device=device).manual_seed(0)
        batch = data.batch(idx, "ats", cfg["model"]["patch_size"], d["high_dtype"])
        return model, batch, source_forward(gen), batch[0].numel() * 4
    if name == "low_res_cnn":
        model = build_baseline(cfg["baselines"]["low_res_cnn"], 1, 10)
        accelerate_(model.to(device), device, **acc)
        batch = data.batch(idx, "low")
        return model, batch, view_forward(0), batch[0].numel() * 4
    if name == "full_res_cnn":
        model = build_baseline(cfg["baselines"]["full_res_cnn"], 1, 10)
    else:
        model = build_full_image_features(cfg)
    accelerate_(model.to(device), device, **acc)
    batch = data.batch(idx, "high", high_dtype="uint8")
    return model, batch, view_forward(1), batch[1].numel()


def _cost_rows(
    built: Mapping[str, tuple[nn.Module, Any, ForwardFn, int]],
    device: torch.device,
    lam: float,
    repeats: int,
    canvas: int,
    b: int,
) -> list[dict[str, Any]]:
    """Time the models of ``built`` interleaved; one row each, with ratios to ATS."""

    def steps(train: bool) -> dict[str, Any]:
        return {
            n: step_fn(m, bt, forward=f, device=device, train=train, entropy_lambda=lam)
            for n, (m, bt, f, _) in built.items()
        }

    train = time_interleaved(steps(True), repeats=repeats, device=device)
    infer = time_interleaved(steps(False), repeats=repeats, device=device)
    rows = []
    for name, (model, batch, fwd, nbytes) in built.items():
        with PeakMemory(device) as mem:
            step_fn(model, batch, forward=fwd, device=device, train=True, entropy_lambda=lam)()
        macs = count_macs(model, lambda m=model, bt=batch, f=fwd: f(m, bt, device))
        rows.append(
            {
                "model": name,
                "canvas": canvas,
                "batch": b,
                "train_ms_per_sample": train[name]["median_ms"] / b,
                "inference_ms_per_sample": infer[name]["median_ms"] / b,
                "train_peak_mb_per_sample": (mem.peak + nbytes) / b / 2**20,
                "forward_gmacs_per_sample": macs / b / 1e9,
                "params": int(sum(p.numel() for p in model.parameters())),
                "repeats": repeats,
            }
        )
    ats = next((r for r in rows if r["model"] == "ats"), None)
    keys = (
        "train_ms_per_sample",
        "inference_ms_per_sample",
        "train_peak_mb_per_sample",
        "forward_gmacs_per_sample",
    )
    for r in rows if ats is not None else []:
        for key in keys:
            r[f"{key}_vs_ats"] = r[key] / max(ats[key], 1e-12)
    return rows


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
    models: Sequence[str] = COST_MODELS,
) -> list[dict[str, Any]]:
    """Training-step and inference cost per sample of ATS, the feature net over the whole
    image and the two CNN baselines, timed interleaved (a, b, c, a, b, c, ...) per canvas
    size and batch size, with the run's nets and ``accel`` (amp, channels_last; never
    compile, so no model pays a compilation here).

    A training step is forward, loss (with the entropy term for ATS) and backward
    (:func:`~ats_wsi.benchmarking.step_fn`); memory is the tensor peak of one step
    (:class:`~ats_wsi.benchmarking.PeakMemory`) plus the input the model reads. Each row has
    ``*_vs_ats``: its cost over ATS's at the same size and batch.
    """
    device = torch.device(device)
    acc = {k: (accel or {}).get(k, d) for k, d in (("amp", None), ("channels_last", False))}
    d, lam = cfg["data"], float(cfg["train"]["entropy_lambda"])
    rows: list[dict[str, Any]] = []
    for size in sizes:
        ds = MegapixelMNIST(
            pool,
            max(batch_sizes),
            canvas_size=int(size),
            scale=d["scale"],
            n_noise=d["n_noise"],
            n_patterns=d["n_patterns"],
            noise_order=d["noise_order"],
            seed=cfg["seed"],
        )
        data = DeviceMegapixelMNIST(ds, device)
        for b in batch_sizes:
            torch.manual_seed(cfg["seed"])
            full_image = b <= full_image_max_batch  # the full-image nets only up to this batch
            built = {
                name: _cost_model(name, cfg, data, torch.arange(b), device, acc)
                for name in models
                if full_image or name not in ("full_image_features", "full_res_cnn")
            }
            rows += _cost_rows(built, device, lam, repeats, int(size), b)
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


def attach_step_costs(results: dict[str, Any], rows: Sequence[Mapping[str, Any]]) -> None:
    """Put the :func:`compare_step_costs` rows in ``results["step_costs"]`` and, at the first
    canvas size, in each trained model's ``cost`` with its ``step_samples_per_s``."""
    results["step_costs"] = list(rows)
    if not rows:
        return
    first = rows[0]["canvas"]
    for name, entry in results["models"].items():
        mine = [r for r in rows if r["model"] == name and r["canvas"] == first]
        if mine:
            entry["cost"] = mine
            entry["step_samples_per_s"] = {
                str(r["batch"]): 1e3 / r["train_ms_per_sample"] for r in mine
            }


def step_cost_report(
    cfg: Mapping[str, Any],
    device: torch.device,
    *,
    sizes: Sequence[int] | None = None,
    batch_sizes: Sequence[int] | None = None,
    repeats: int | None = None,
    config_path: str = "<dict>",
) -> dict[str, Any]:
    """The side-by-side step costs alone (``--costs-only``): ``accel`` settings unless
    overridden, on the training digits; the payload of ``step_costs.json``."""
    a = cfg["accel"]
    configure_backends(device)
    pool, _ = load_digit_pools(cfg["data"]["mnist_dir"], cfg["data"]["test_split_start"])
    rows = compare_step_costs(
        cfg,
        device,
        pool,
        sizes=sizes or a["cost_sizes"] or [cfg["data"]["canvas_size"]],
        batch_sizes=batch_sizes or a["cost_batch_sizes"],
        full_image_max_batch=a["cost_full_image_max_batch"],
        repeats=repeats or a["cost_repeats"],
        accel={k: a[k] for k in ("amp", "channels_last")},
    )
    payload = {"config": config_path, "device": str(device), "digits": pool.source, "rows": rows}
    return {"machine": describe_machine(), **payload}


# ----------------------------------------------------------------------------- run pieces


def configure_backends(device: torch.device) -> dict[str, Any]:
    """cuDNN autotuning and TF32 matmuls on CUDA (shapes are fixed); nothing on CPU."""
    if device.type != "cuda":
        return {}
    torch.backends.cudnn.benchmark = True
    torch.set_float32_matmul_precision("high")
    return {"cudnn_benchmark": True, "float32_matmul_precision": "high"}


def save_device_figures(
    model: ATSModel,
    data: DeviceMegapixelMNIST,
    out_dir: Path,
    cfg: Mapping[str, Any],
    device: torch.device,
    eval_kwargs: Mapping[str, Any],
) -> list[str]:
    """Attention figures for the first ``report.n_figures`` items of ``data``."""
    n = min(cfg["report"]["n_figures"], len(data))
    if n <= 0:
        return []
    p = cfg["model"]["patch_size"]
    x_low, source, y = data.batch(torch.arange(n), "ats", p, cfg["data"]["high_dtype"])
    model.eval()
    gen = torch.Generator(device=device).manual_seed(cfg["seed"])
    with torch.no_grad():
        out = source_forward(gen, **eval_kwargs)(model, (x_low, source, y), device).extra
    return write_attention_figures(out_dir, out, x_low.cpu(), y.cpu(), data.canvas_size, p)


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
