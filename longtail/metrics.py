"""Metrics of one split, the way the field reports them: top-1/top-5, many/medium/few-shot accuracy,
per-class accuracy, and calibration (ECE, MCE, adaptive and class-wise ECE, NLL, Brier) overall and
per shot group, as plain floats ready for ``metrics.json``.

It sits at the bottom of the package (it needs only ``longtail.functional``) because the trainer,
stage 2, calibration and the commands all report the same numbers.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from longtail.functional import adaptive_ece, brier, ece, mce, nll, per_class_ece, shot_groups

__all__ = ["calibration_report", "calibration_row", "compute_metrics", "per_class_accuracy", "shift_scores",
           "topk_correct", "summary"]

GROUPS = ("many", "medium", "few")


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


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)


def per_class_accuracy(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class (NaN for a class with no test sample)."""
    correct = torch.zeros(num_classes, device=targets.device).index_add_(0, targets, (predictions == targets).float())
    seen = torch.bincount(targets, minlength=num_classes).float()
    return torch.where(seen > 0, correct / seen.clamp(min=1), torch.full_like(seen, float("nan")))


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, train_counts: Sequence[int],
                    expert_logits: torch.Tensor | None = None) -> dict[str, Any]:
    """All metrics of one split as plain Python numbers (JSON-ready). Accuracies are fractions."""
    num_classes = logits.shape[1]
    predictions = logits.argmax(dim=1)
    class_acc = per_class_accuracy(predictions, targets, num_classes)
    metrics: dict[str, Any] = {
        "num_samples": int(targets.numel()),
        "top1": float((predictions == targets).float().mean()),
        "top5": float(topk_correct(logits, targets, 5).float().mean()),
    }
    for group, classes in shot_groups(train_counts).items():
        # mean over the group's samples; the test sets are balanced, so this is also the mean over classes
        mask = torch.isin(targets, torch.tensor(classes, dtype=targets.dtype))
        metrics[f"{group}_top1"] = float((predictions[mask] == targets[mask]).float().mean()) if mask.any() else None
        metrics[f"{group}_classes"] = len(classes)
    metrics["calibration"] = calibration_report(logits, targets, train_counts)
    for key in ("ece", "mce", "nll", "brier"):
        metrics[key] = metrics["calibration"][key]
    if expert_logits is not None:
        metrics["expert_top1"] = [float((e.argmax(dim=1) == targets).float().mean()) for e in expert_logits]
    metrics["per_class_top1"] = [None if torch.isnan(a) else float(a) for a in class_acc]
    metrics["train_counts"] = list(map(int, train_counts))
    return metrics


def shift_scores(logits: torch.Tensor, targets: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, Any]:
    """What ``eval --shifts`` reports of one (re-weighted) test set: top-1, ECE and each shot group's
    top-1 (``groups``: ``functional.shot_groups`` of the training counts), in float64 means."""
    correct = logits.argmax(1) == targets
    scores: dict[str, Any] = {"top1": float(correct.double().mean()), "ece": float(ece(logits, targets))}
    for group, classes in groups.items():
        mask = torch.isin(targets, torch.tensor(classes, dtype=torch.long))
        scores[f"{group}_top1"] = float(correct[mask].double().mean()) if bool(mask.any()) else None
    return scores


def calibration_row(report: dict[str, Any], logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """One row of ``longtail calibrate``'s table: top-1 of ``logits`` and the calibration numbers of its
    ``calibration_report``, with each shot group's ECE."""
    row = {"top1": float((logits.argmax(1) == targets).float().mean()),
           **{k: report[k] for k in ("ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier",
                                     "confidence_minus_accuracy")}}
    for group in GROUPS:
        if group in report.get("groups", {}):
            row[f"{group}_ece"] = report["groups"][group]["ece"]
    return row


def summary(metrics: dict[str, Any]) -> str:
    """One line a person reads at the end of a run."""
    def pct(value: float | None) -> str:
        return "  -  " if value is None else f"{100 * value:5.2f}"
    empty = [group for group in ("many", "medium", "few") if metrics.get(f"{group}_top1") is None]
    why = (f" ({'/'.join(empty)}: no class of that size — many > 100, medium 20-100, few < 20 training "
           "images — so nothing to score)") if empty else ""
    return (f"top-1 {pct(metrics['top1'])} | many {pct(metrics.get('many_top1'))} "
            f"medium {pct(metrics.get('medium_top1'))} few {pct(metrics.get('few_top1'))} | "
            f"ECE {pct(metrics['ece'])} NLL {metrics['nll']:.3f}{why}")
