"""PNG plots of results people would rather see than read."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

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
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


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
    ax.set_xscale("log")
    ax.set_ylim(-2, 102)
    ax.set_xlabel("training images of the class (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
