"""PNG plots of results people would rather see than read."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from longtail.functional import shot_groups  # noqa: E402

GROUP_COLOURS = {"many": "#1f77b4", "medium": "#ff7f0e", "few": "#d62728"}


def _group_of(class_counts: Sequence[int]) -> list[str]:
    labels = [""] * len(class_counts)
    for group, classes in shot_groups(class_counts).items():
        for cls in classes:
            labels[cls] = group
    return labels


def class_histogram(class_counts: Sequence[int], path: str | Path, title: str = "training images per class") -> Path:
    """Bar chart of class sizes, largest first, coloured by shot group."""
    order = sorted(range(len(class_counts)), key=lambda c: -class_counts[c])
    groups = _group_of(class_counts)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(order)), [class_counts[c] for c in order], width=1.0,
           color=[GROUP_COLOURS[groups[c]] for c in order])
    for group, colour in GROUP_COLOURS.items():
        ax.bar([], [], color=colour, label=group)
    ax.set_yscale("log")
    ax.set_xlabel("class (sorted by size)")
    ax.set_ylabel("images (log scale)")
    ax.set_title(title)
    ax.legend(frameon=False)
    return _save(fig, path)


def per_class_accuracy_plot(per_class_accuracy: Sequence[float | None], class_counts: Sequence[int],
                            path: str | Path, title: str = "per-class accuracy") -> Path:
    """Accuracy of each class against its training size (log x), coloured by shot group: the
    picture of a head-biased model is a rising cloud."""
    groups = _group_of(class_counts)
    fig, ax = plt.subplots(figsize=(6, 4))
    for group, colour in GROUP_COLOURS.items():
        xs = [class_counts[c] for c in range(len(class_counts)) if groups[c] == group and per_class_accuracy[c] is not None]
        ys = [100 * per_class_accuracy[c] for c in range(len(class_counts)) if groups[c] == group and per_class_accuracy[c] is not None]
        if xs:
            ax.scatter(xs, ys, s=18, color=colour, label=f"{group} ({len(xs)})", alpha=0.8)
    _class_size_axes(ax)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    return _save(fig, path)


def _class_size_axes(ax: Any) -> None:
    """Accuracy (%) against the training size of the class, on a log axis."""
    ax.set_xscale("log")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy (%)")


def _save(fig: Any, path: str | Path, rect: tuple[float, float, float, float] | None = None) -> Path:
    """Lay out (within ``rect`` of the figure, when room is kept for a figure legend), write, close."""
    fig.tight_layout(rect=rect)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    array = np.asarray(values, dtype=float)
    return float(array.mean()), float(array.std(ddof=1)) if len(array) > 1 else 0.0


def _grouped_bars(series: Sequence[tuple[str, list[tuple[float, float]]]], ticks: Sequence[str], ylabel: str,
                  path: str | Path, width_inches: float, legend_size: int, rotate: bool = False) -> Path:
    """Bars of (mean, std) fractions in percent: one colour per series, one group of bars per tick."""
    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(width_inches, 4))
    for i, (label, stats) in enumerate(series):
        ax.bar([k + i * width for k in range(len(ticks))], [100 * m for m, _ in stats], width=width,
               yerr=[100 * s for _, s in stats], capsize=3, label=label)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(ticks))], list(ticks),
                  **({"rotation": 20, "ha": "right", "fontsize": 8} if rotate else {}))
    ax.set_ylabel(ylabel)
    ax.legend(frameon=False, fontsize=legend_size)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _stats(values: list[float]) -> tuple[float, float]:
    return _mean_std(values) if values else (np.nan, 0.0)


def shot_group_bars(groups: Sequence[Any], path: str | Path) -> Path:
    """Top-1 overall and per shot group, one bar per recipe, error bars ± one std over seeds
    (``groups``: longtail.report.aggregate.Group)."""
    metrics = [("top1", "overall"), ("many_top1", "many"), ("medium_top1", "medium"), ("few_top1", "few")]
    series = [(f"{g.label} (n={g.n})", [_stats(g.values(m)) for m, _ in metrics]) for g in groups]
    return _grouped_bars(series, [title for _, title in metrics], "test top-1 (%)", path,
                         max(6.5, 1.6 * len(metrics) + 0.35 * len(groups)), legend_size=7)


def accuracy_by_class_size(groups: Sequence[Any], path: str | Path) -> Path:
    """Each recipe's per-class accuracy (mean over seeds) against the class's training size: the head
    bias of a model is the slope of its line."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for group in groups:
        rows = [r for r in group.rows if r.get("per_class_top1") and r.get("train_counts")]
        if not rows:
            continue
        counts = np.mean([r["train_counts"] for r in rows], axis=0)
        accuracy = np.array([[np.nan if a is None else a for a in r["per_class_top1"]] for r in rows], dtype=float)
        order = np.argsort(-counts)
        ax.plot(counts[order], 100 * np.nanmean(accuracy, axis=0)[order], marker="o", markersize=3,
                label=f"{group.label} (n={len(rows)})")
    _class_size_axes(ax)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=7)
    return _save(fig, path)


def calibration_bars(groups: Sequence[Any], path: str | Path) -> Path:
    """Test ECE of each recipe before and after each calibrator (mean ± std over seeds)."""
    methods = sorted({m for g in groups for m in g.calibrators()})
    series = [("uncalibrated", [_stats(g.values("ece")) for g in groups])]
    series += [(m, [_stats(g.calibrated_ece(m)) for g in groups]) for m in methods]
    return _grouped_bars(series, [g.label for g in groups], "test ECE (%)", path,
                         max(6.5, 1.2 * len(groups) + 2), legend_size=8, rotate=True)


def learning_curves(curves: dict[str, dict[str, list[float]]], path: str | Path,
                    split: str = "test") -> Path | None:
    """Top-1 overall and per shot group against epoch, one line per run (``curves``: label ->
    ``report.records.learning_curve``), on one figure of four panels. None when no run was evaluated
    at two epochs or more (``train.eval_every=0`` evaluates the last epoch only: no curve)."""
    curves = {label: curve for label, curve in curves.items() if len(curve.get("epoch", [])) > 1}
    if not curves:
        return None
    panels = [("top1", "overall"), ("many_top1", "many"), ("medium_top1", "medium"), ("few_top1", "few")]
    # a colour per run (tab10 repeats after ten; past twenty the line style changes too), and one legend
    # below the panels, where it hides no curve
    colours = plt.get_cmap("tab10" if len(curves) <= 10 else "tab20").colors
    columns = min(len(curves), 6)
    rows = -(-len(curves) // columns)
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.8 + 0.22 * rows), sharex=True)
    for ax, (key, title) in zip(axes, panels):
        for index, (label, curve) in enumerate(curves.items()):
            ax.plot(curve["epoch"], curve.get(key, [np.nan] * len(curve["epoch"])), label=label, linewidth=1.2,
                    color=colours[index % len(colours)], linestyle="-" if index < len(colours) else "--")
        ax.set_title(f"{title} ({split} top-1, %)")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=columns, frameon=False, fontsize=8)
    return _save(fig, path, rect=(0, 0.07 * rows, 1, 1))
