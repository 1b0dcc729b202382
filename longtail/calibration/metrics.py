"""One calibration report per split: every metric overall and per many/medium/few-shot group, as
plain floats ready for ``metrics.json``."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from longtail.functional import adaptive_ece, brier, ece, mce, nll, per_class_ece, shot_groups

__all__ = ["calibration_report"]


def _top_label_metrics(logits: torch.Tensor, targets: torch.Tensor, n_bins: int) -> dict[str, float]:
    confidence, prediction = logits.double().softmax(dim=1).max(dim=1)
    return {
        "ece": float(ece(logits, targets, n_bins)),
        "mce": float(mce(logits, targets, n_bins)),
        "adaptive_ece": float(adaptive_ece(logits, targets, n_bins)),
        "nll": float(nll(logits, targets)),
        "brier": float(brier(logits, targets)),
        # > 0: over-confident, < 0: under-confident
        "confidence_minus_accuracy": float(confidence.mean() - (prediction == targets).double().mean()),
        "num_samples": int(targets.numel()),
    }


def calibration_report(logits: torch.Tensor, targets: torch.Tensor, class_counts: Sequence[int],
                       n_bins: int = 15) -> dict[str, Any]:
    """ece, mce, adaptive_ece, classwise_ece, nll, brier and confidence_minus_accuracy (fractions /
    nats), overall at the top level and per shot group under ``groups`` (``longtail.functional.
    shot_groups`` of the training ``class_counts``; a group with no test sample is left out).

    Per group, every top-label metric is computed on the test samples whose true class is in the
    group; ``classwise_ece`` is the mean over the group's classes of the per-class ECE, which uses all
    test samples (a class's probability is calibrated against its negatives too).
    """
    if len(class_counts) != logits.shape[1]:
        raise ValueError(f"class_counts has {len(class_counts)} entries but logits have {logits.shape[1]} "
                         "classes; pass the training class counts of this model")
    targets = targets.long()
    class_ece = per_class_ece(logits, targets, n_bins)
    report: dict[str, Any] = {**_top_label_metrics(logits, targets, n_bins),
                              "classwise_ece": float(class_ece.mean()), "groups": {}}
    for group, classes in shot_groups(class_counts).items():
        in_group = torch.isin(targets, torch.tensor(classes, dtype=torch.long, device=targets.device))
        if not bool(in_group.any()):
            continue
        report["groups"][group] = {**_top_label_metrics(logits[in_group], targets[in_group], n_bins),
                                   "classwise_ece": float(class_ece[classes].mean()),
                                   "num_classes": len(classes)}
    return report
