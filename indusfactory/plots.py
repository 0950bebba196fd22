"""PNG plots of the evaluation (matplotlib, no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def metric_vs_fraction(result: dict) -> bytes:
    """mIoU and mask AP versus the fraction of real training data, one line per regime."""
    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in zip(axes, ("miou", "mask_ap"), ("mIoU", "mask AP")):
        for regime in ("real only", "synthetic + real"):
            rows = [r for r in result["results"] if r["regime"] == regime and r[key] is not None]
            ax.plot([100 * r["real_fraction"] for r in rows], [r[key] for r in rows], marker="o", label=regime)
        synthetic = [r[key] for r in result["results"] if r["regime"] == "synthetic only" and r[key] is not None]
        if synthetic:
            ax.axhline(synthetic[0], linestyle="--", color="grey", label="synthetic only")
        ax.set_xlabel("real training data (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    return _png(figure)


def adherence_histogram(result: dict) -> bytes:
    a = result["adherence"]
    figure, ax = plt.subplots(figsize=(5, 3.5))
    bins = a["histogram_bins"]
    ax.bar(bins[:-1], a["histogram"], width=bins[1] - bins[0], align="edge", edgecolor="black")
    ax.set_xlabel("IoU of real-data segmentor with conditioning mask")
    ax.set_ylabel("samples")
    ax.set_title(f"adherence (mean {a['mean']})")
    return _png(figure)


def mask_size_plot(result: dict) -> bytes:
    d = result["distributions"]
    bins = d["size_bins"]
    figure, ax = plt.subplots(figsize=(5, 3.5))
    for name in ("real", "synthetic"):
        counts = d[name]["mask_size_histogram"]
        total = max(1, sum(counts))
        ax.step(bins[:-1], [c / total for c in counts], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("mask area (fraction of image)")
    ax.set_ylabel("share of instances")
    ax.legend()
    return _png(figure)
