"""The report's figures, drawn from numbers the report has already gathered (grid/report.py): the paper's
Figs. 3 and 5 (per-epoch validation and training loss), 6 (long tail) and 7 (sensitivity to alpha and k2).
Each is written whole: a half-drawn PNG never takes the place of the last one."""
from __future__ import annotations

import io
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display: the report is written by a command, often on a server
import matplotlib.pyplot as plt  # noqa: E402

from alterrec_dist.common.files import atomic_write_bytes  # noqa: E402


def per_epoch(runs: list[dict], get) -> tuple[list[int], list[float]]:
    """Mean over seeds of a per-epoch quantity (epochs every seed reached)."""
    n = min(len(r["epochs"]) for r in runs)
    return list(range(n)), [statistics.mean(get(r["epochs"][e]) for r in runs) for e in range(n)]


def save(fig, path: Path) -> None:
    """The figure as a PNG, written whole (`atomic_write_bytes`: a killed report left `NAME.png.tmp.png` beside
    the figures, a fixed name that no writer swept)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, png.getvalue())


def training_curves(runs: list[dict], losses: dict[str, str], title: str, path: Path) -> None:
    """Figs. 3 and 5: validation Hits@20 of the id, text and fused scores, and training losses, per epoch."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind, style in (("id", "-o"), ("text", "-s"), ("fused", "-^")):
        x, y = per_epoch(runs, lambda e, k=kind: e["valid"][k]["hit@20"])
        a.plot(x, y, style, ms=3, label=kind)
    a.set(xlabel="epoch", ylabel="valid Hits@20", title=f"{title}: validation")
    a.legend()
    for key, label in losses.items():
        x, y = per_epoch(runs, lambda e, k=key: e.get(k, float("nan")))
        b.plot(x, y, "-o", ms=3, label=label)
    if "network" in runs[0]["epochs"][0] and len(losses) == 1:  # AlterRec: shade which network trained
        for e in runs[0]["epochs"]:
            if e["network"] == "text":
                b.axvspan(e["epoch"] - 0.5, e["epoch"] + 0.5, color="0.9", lw=0)
        b.text(0.99, 0.97, "shaded: text network trained", transform=b.transAxes, ha="right", va="top", fontsize=8)
    b.set(xlabel="epoch", ylabel="training loss", title=f"{title}: training loss")
    b.legend()
    save(fig, path)


def longtail_figure(groups, ratios, counts, metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(len(ratios), 1)
    for i, (label, vals) in enumerate(ratios.items()):
        ax.bar([g + i * width for g in range(len(groups))], vals, width, label=label)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([g + width * (len(ratios) - 1) / 2 for g in range(len(groups))],
                  [f"{g}\n(n={counts[g]})" for g in groups])
    ax.set(xlabel="target popularity (train occurrences)", ylabel=f"test {metric} / ID only",
           title="Long tail: relative to ID only")
    ax.legend(fontsize=8)
    save(fig, path)


def sensitivity_figure(alphas, alpha_vals, k2s, k2_vals, path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    color = {"hit@10": "C0", "ndcg@10": "C1"}  # one colour per metric; test solid, valid dashed
    for (split, m), ys in alpha_vals.items():
        axes[0].plot(alphas, ys, "-o" if split == "test" else "--", color=color[m], ms=3, label=f"{split} {m}")
    axes[0].set(xlabel="alpha (weight of the ID score)", ylabel="metric", title="AlterRec: sensitivity to alpha")
    axes[0].legend(fontsize=8)
    for (split, m), ys in k2_vals.items():
        axes[1].plot(k2s, ys, "-o" if split == "test" else "--", color=color[m], ms=3, label=f"{split} {m}")
    axes[1].set(xscale="log", xlabel="k2 (hard negatives are ranks k1..k2)", ylabel="metric",
                title="AlterRec: sensitivity to k2 (seed 0)")
    axes[1].legend(fontsize=8)
    save(fig, path)
