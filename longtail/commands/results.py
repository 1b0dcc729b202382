"""Writing a finished evaluation: ``metrics.json`` plus the plots people look at."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from longtail.calibration.diagrams import reliability_diagram, reliability_diagrams_by_group
from longtail.engine.rundir import (PER_CLASS_PLOT, PLOTS_DIR, RELIABILITY_BY_GROUP_PLOT, RELIABILITY_PLOT, metrics_file,
                                    write_output)
from longtail.report.plots import per_class_accuracy_plot

__all__ = ["write_results"]


def write_results(out_dir: Path, results: dict[str, Any], outputs: dict[str, torch.Tensor],
                  train_counts: list[int], metrics: dict[str, Any]) -> None:
    """metrics.json plus per-class accuracy against class size and reliability diagrams (overall and
    per shot group) of the test predictions ``outputs``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_output(metrics_file(out_dir), json.dumps(results, indent=2), exist="replace")
    plots = out_dir / PLOTS_DIR
    plots.mkdir(exist_ok=True)
    per_class_accuracy_plot(metrics["per_class_top1"], train_counts, plots / PER_CLASS_PLOT,
                            title=f"per-class top-1 (overall {100 * metrics['top1']:.2f}%)")
    reliability_diagram(outputs["logits"], outputs["targets"], plots / RELIABILITY_PLOT, title="test, last epoch")
    reliability_diagrams_by_group(outputs["logits"], outputs["targets"], train_counts,
                                  plots / RELIABILITY_BY_GROUP_PLOT)
