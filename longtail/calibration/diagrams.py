"""Reliability diagrams (Guo et al., ICML 2017): accuracy per confidence
bin against the diagonal of perfect calibration, the gap to the bin's mean confidence shaded, and the
number of samples per bin below (a bar of 3 samples should not be read like one of 3,000)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from longtail.functional import calibration_bins, ece, shot_groups  # noqa: E402

__all__ = ["reliability_diagram", "reliability_diagrams_by_group"]

PANEL_SIZE = (4.0, 5.0)  # inches per diagram (reliability + counts); PNGs are written at DPI
DPI = 100


def _draw(ax_reliability: plt.Axes, ax_counts: plt.Axes, logits: torch.Tensor, targets: torch.Tensor,
          n_bins: int, title: str) -> None:
    bins = calibration_bins(logits, targets, n_bins)
    accuracy = torch.nan_to_num(bins.accuracy).cpu().numpy()
    confidence = bins.confidence.cpu().numpy()
    count = bins.count.cpu().numpy()
    width = 1.0 / n_bins
    centres = (np.arange(n_bins) + 0.5) * width
    filled = count > 0
    ax_reliability.bar(centres, accuracy, width=width, color="#1f77b4", edgecolor="black", linewidth=0.5,
                       label="accuracy")
    # the gap: from the bin's accuracy up (or down) to its mean confidence
    ax_reliability.bar(centres[filled], confidence[filled] - accuracy[filled], bottom=accuracy[filled], width=width,
                       color="#d62728", alpha=0.3, hatch="//", edgecolor="#d62728", linewidth=0.5,
                       label="gap to confidence")
    ax_reliability.plot([0, 1], [0, 1], "--", color="grey", linewidth=1, label="perfect calibration")
    ax_reliability.set_xlim(0, 1)
    ax_reliability.set_ylim(0, 1)
    ax_reliability.set_ylabel("accuracy")
    ax_reliability.set_title(f"{title}\nECE {100 * float(ece(logits, targets, n_bins)):.2f}%", fontsize=10)
    ax_reliability.legend(loc="upper left", fontsize=7, frameon=False)
    ax_reliability.tick_params(labelbottom=False)
    ax_counts.bar(centres, count, width=width, color="grey", edgecolor="black", linewidth=0.5)
    ax_counts.set_xlim(0, 1)
    if count.max() > 100 * count[filled].min():  # a few bins hold nearly everything: log scale shows the rest
        ax_counts.set_yscale("log")
        ax_counts.set_ylim(bottom=0.5)
    ax_counts.set_xlabel("confidence")
    ax_counts.set_ylabel("samples")


def _figure(columns: int) -> tuple[plt.Figure, np.ndarray]:
    figure, axes = plt.subplots(2, columns, figsize=(PANEL_SIZE[0] * columns, PANEL_SIZE[1]), squeeze=False,
                                gridspec_kw={"height_ratios": [3, 1]})
    return figure, axes


def _save(figure: plt.Figure, path: str | Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=DPI)
    plt.close(figure)
    return Path(path)


def reliability_diagram(logits: torch.Tensor, targets: torch.Tensor, path: str | Path, title: str | None = None,
                        n_bins: int = 15) -> Path:
    """One reliability diagram with its per-bin sample counts, ECE in the title, written as a PNG of
    ``PANEL_SIZE * DPI`` pixels."""
    figure, axes = _figure(1)
    _draw(axes[0, 0], axes[1, 0], logits, targets, n_bins, title or "reliability diagram")
    return _save(figure, path)


def reliability_diagrams_by_group(logits: torch.Tensor, targets: torch.Tensor, class_counts: Sequence[int],
                                  path: str | Path, n_bins: int = 15) -> Path:
    """Overall, many-, medium- and few-shot diagrams side by side in one PNG (groups by training
    ``class_counts`` via ``longtail.functional.shot_groups``); a group without test samples gets an
    empty panel that says so."""
    targets = targets.long()
    figure, axes = _figure(4)
    _draw(axes[0, 0], axes[1, 0], logits, targets, n_bins, f"all classes ({targets.numel()} samples)")
    for column, (group, classes) in enumerate(shot_groups(class_counts).items(), start=1):
        in_group = torch.isin(targets, torch.tensor(classes, dtype=torch.long, device=targets.device))
        if bool(in_group.any()):
            _draw(axes[0, column], axes[1, column], logits[in_group], targets[in_group], n_bins,
                  f"{group}-shot ({len(classes)} classes, {int(in_group.sum())} samples)")
        else:
            axes[0, column].text(0.5, 0.5, f"{group}-shot: no test samples", ha="center", va="center")
            axes[0, column].set_axis_off()
            axes[1, column].set_axis_off()
    return _save(figure, path)
