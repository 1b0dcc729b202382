"""The label-shift plot: each metric against the test imbalance, backward-LT on the left, balanced in
the middle, forward-LT on the right (SADE's test-agnostic protocol)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["shift_position", "label_shift_plot"]

PANELS = (("top1", "top-1 (%)"), ("many_top1", "many-shot top-1 (%)"), ("medium_top1", "medium-shot top-1 (%)"),
          ("few_top1", "few-shot top-1 (%)"), ("ece", "ECE (%)"))


def shift_position(direction: str, imbalance_factor: float) -> float:
    """x of a test set: -log IF for backward-LT, 0 for balanced, +log IF for forward-LT."""
    return 0.0 if direction == "balanced" else math.copysign(math.log(imbalance_factor), 1 if direction == "forward" else -1)


def label_shift_plot(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """``rows``: one per (test set, model variant) with direction, imbalance_factor, variant and the
    metrics of :data:`PANELS` as fractions (None where a shot group has no test image; a panel with
    no value at all, e.g. many-shot on Digits-LT, is left out)."""
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    bases = list(dict.fromkeys(variant.split(" + ")[0] for variant in variants))
    panels = [(key, label) for key, label in PANELS if any(row.get(key) is not None for row in rows)]
    sets = sorted({(row["direction"], row["imbalance_factor"]) for row in rows}, key=lambda s: shift_position(*s))
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.8), sharex=True, squeeze=False)
    axes = axes[0]
    for ax, (key, label) in zip(axes, panels):
        for variant in variants:
            points = sorted((shift_position(row["direction"], row["imbalance_factor"]), 100 * row[key])
                            for row in rows if row["variant"] == variant and row.get(key) is not None)
            # colour: the calibrator; line: the prior correction (dotted none, solid EM, dashed true prior)
            style = "--" if "true prior" in variant else ("-" if "EM" in variant else ":")
            ax.plot([x for x, _ in points], [y for _, y in points], style, marker="o", markersize=3, label=variant,
                    color=f"C{bases.index(variant.split(' + ')[0])}")
        ax.set_title(label, fontsize=10)
        ax.set_xticks([shift_position(*s) for s in sets])
        ax.set_xticklabels(["bal" if d == "balanced" else f"{'F' if d == 'forward' else 'B'}{f:g}" for d, f in sets],
                           fontsize=7, rotation=90)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{title}  (B = backward-LT, F = forward-LT test set, number = its imbalance)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
