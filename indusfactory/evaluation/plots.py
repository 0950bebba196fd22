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


def _series(result: dict) -> dict[str, list[dict]]:
    """Rows of each line of the plot: every regime trained with real data (one line per synthetic ratio)."""
    lines: dict[str, list[dict]] = {}
    for r in result["results"]:
        if r["regime"] == "synthetic only":
            continue
        ratio = r.get("synthetic_ratio")
        lines.setdefault(r["regime"] + ("" if ratio is None else f" (ratio {ratio})"), []).append(r)
    return lines


def metric_vs_fraction(result: dict) -> bytes:
    """Defect IoU and mask AP versus the fraction of real training data: mean ± std over seeds per regime,
    on fixed 0..1 axes, with the synthetic-only level and (IoU) the chance level drawn."""
    figure, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("iou", "mask_ap"), ("defect IoU", "mask AP")):
        series = _series(result)
        for i, (name, rows) in enumerate(series.items()):
            rows = [r for r in rows if r[key] is not None]
            shift = 1.2 * (i - (len(series) - 1) / 2)  # side by side, so that error bars do not hide each other
            ax.errorbar(
                [100 * r["real_fraction"] + shift for r in rows],
                [r[key] for r in rows],
                yerr=[r.get(f"{key}_std") or 0.0 for r in rows],
                marker="o",
                capsize=3,
                label=name,
            )
        synthetic = [r for r in result["results"] if r["regime"] == "synthetic only" and r[key] is not None]
        if synthetic:
            mean, std = synthetic[0][key], synthetic[0].get(f"{key}_std") or 0.0
            ax.axhline(mean, linestyle="--", color="grey", label="synthetic only")
            ax.axhspan(mean - std, mean + std, color="grey", alpha=0.15)
        if key == "iou" and result.get("chance"):
            ax.axhline(result["chance"]["chance"], linestyle=":", color="red", label="chance (no image seen)")
        ax.set_ylim(0.0, 1.0)
        ax.set_xlim(-5, 110)
        ax.set_xlabel("real training data (%)")
        ax.set_title(f"{title} (mean ± std, {result['results'][0].get('seeds', 1)} seeds)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    figure.suptitle(f"verdict: {result.get('verdict', '—')}", fontsize=10)
    return _png(figure)


def adherence_histogram(result: dict) -> bytes:
    """Label AUC of each sample on the pixels against its chance pairing (another sample's mask)."""
    a = result["adherence"]
    figure, ax = plt.subplots(figsize=(5.5, 3.5))
    for key, name, colour in (("auc_histogram", "own label", "C0"), ("chance_histogram", "chance pairing", "grey")):
        counts = a[key]
        edges = [i / len(counts) for i in range(len(counts) + 1)]
        ax.stairs(counts, edges, label=name, color=colour, fill=key == "auc_histogram", alpha=0.6)
    ax.axvline(a["median_auc"], color="C0", linestyle="--")
    ax.axvline(a["chance_auc"], color="grey", linestyle=":")
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("label AUC (P(label pixel darker than the ring around it))")
    ax.set_ylabel("samples")
    ax.set_title(f"adherence on the pixels: {a['verdict']}", fontsize=10)
    ax.legend(fontsize=8)
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
