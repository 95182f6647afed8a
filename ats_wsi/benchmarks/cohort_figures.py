"""Figures of the ``cohort`` benchmark (:mod:`ats_wsi.benchmarks.cohort`): test AUC against
tiles read, and ATS attention heatmaps with the lesion outlines (small PNGs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ats_wsi.benchmarks.cohort_tasks import TILE_PX, _pool

__all__ = ["write_figures"]


def write_figures(
    out: Path, payload: dict[str, Any], cohort: Any, results: dict[str, Any], args: Any
) -> list[str]:
    """AUC vs tiles read, and attention heatmaps with lesion outlines (small PNGs)."""
    import matplotlib

    matplotlib.use("Agg")

    out.mkdir(parents=True, exist_ok=True)
    files = [_auc_figure(out, payload["results"])]
    attention = _attention_figure(out, cohort, results, args)
    if attention is not None:
        files.append(attention)
    return files


def _auc_figure(out: Path, table: list[dict[str, Any]]) -> str:
    """Test AUC (95 % CI) against tiles decoded per slide; exhaustive methods as lines."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=110)
    labels = {"ats": "ATS", "ats-plain": "ATS, no distillation", "random": "random-N"}
    for method, colour in (("ats", "tab:red"), ("ats-plain", "tab:orange"), ("random", "tab:blue")):
        rs = sorted((r for r in table if r["method"] == method), key=lambda r: r["N"])
        if not rs:
            continue
        x = [r["tiles_per_slide"] for r in rs]
        y = [r["auc"] for r in rs]
        err = np.array([[r["auc"] - r["auc_ci"][0], r["auc_ci"][1] - r["auc"]] for r in rs]).T
        ax.errorbar(
            x,
            y,
            yerr=err,
            marker="o",
            capsize=3,
            color=colour,
            label=labels[method],
        )
    for method, style in (("abmil", "-"), ("abmil-lr2e-3", "-."), ("mean", "--"), ("lowres", ":")):
        r = next(r for r in table if r["method"] == method)
        ax.axhline(
            r["auc"],
            color="k",
            ls=style,
            lw=1,
            label=f"{method} ({r['tiles_per_slide']:.0f} tiles)",
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tiles decoded per slide (N)")
    ax.set_ylabel("test ROC AUC (95 % CI)")
    ax.set_ylim(0.3, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "cohort_auc_vs_tiles.png"
    fig.savefig(path)
    plt.close(fig)
    return str(path)


def _attention_figure(out: Path, cohort: Any, results: dict[str, Any], args: Any) -> str | None:
    """ATS attention (N = 16, or the first N run) on up to four positive test slides: heatmap,
    tiles read, lesion outlines. None when no such slide was tested."""
    import matplotlib.pyplot as plt

    from ats_wsi.io.prefetch import LowResLoader

    n_show = 16 if 16 in args.n_values else args.n_values[0]
    rows = [r for r in results[f"ats_{n_show}"]["rows"] if "attention" in r][:4]
    if not rows:
        return None
    loader = LowResLoader(mpp=args.attention_mpp, tissue=False)
    pool = _pool(args.attention_mpp)
    fig, axes = plt.subplots(1, len(rows), figsize=(2.8 * len(rows), 3.0), dpi=100)
    for ax, r in zip(np.atleast_1d(axes), rows, strict=False):
        item = loader(cohort.slide_path(r["slide_id"]))
        att = np.asarray(r["attention"])
        h, w = item.image.shape[:2]
        ax.imshow(item.image)
        ax.imshow(np.kron(att, np.ones((pool, pool)))[:h, :w], cmap="magma", alpha=0.55)
        data = json.loads(cohort.lesion_path(r["slide_id"]).read_text())
        s = 1.0 / item.scale[1]
        for f in data["features"]:
            ring = np.asarray(f["geometry"]["coordinates"][0]) * s
            ax.plot(ring[:, 0], ring[:, 1], color="lime", lw=1)
        for yy, xx in r["top_left"]:
            ax.add_patch(
                plt.Rectangle(
                    (xx * s, yy * s), TILE_PX * s, TILE_PX * s, fill=False, ec="cyan", lw=0.6
                )
            )
        ax.set_title(f"{r['slide_id']} p={r['p']:.2f}", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    path = out / "cohort_attention.png"
    fig.savefig(path)
    plt.close(fig)
    return str(path)
