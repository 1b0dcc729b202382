"""Evaluation the way the field reports it: top-1/top-5, many/medium/few-shot accuracy,
per-class accuracy, calibration (ECE, MCE, NLL, Brier, ...), per-expert accuracy."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from longtail.engine.distributed import DistInfo, gather_rows
from longtail.functional import shot_groups
from longtail.types import ModelOutput


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Any, dist_info: DistInfo, total: int,
            amp_dtype: torch.dtype | None = None, keep_features: bool = False) -> dict[str, torch.Tensor]:
    """Run ``model`` over an evaluation loader (this rank's shard) and gather everything on every rank.

    Returns float32 CPU tensors: logits (N, C), targets (N,), and when present expert_logits (M, N, C)
    and features (N, D). Predictions stay on the device until the end: one host copy, no per-batch sync.
    """
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {"logits": [], "targets": [], "expert_logits": [], "features": []}
    for images, targets in loader:
        with torch.autocast(dist_info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output: ModelOutput = model(images)
        chunks["logits"].append(output.logits.float())
        chunks["targets"].append(targets)
        if output.expert_logits is not None:
            chunks["expert_logits"].append(output.expert_logits.float().transpose(0, 1))  # (B, M, C)
        if keep_features:
            chunks["features"].append(output.features.float())
    model.train(was_training)
    result = {}
    for key, parts in chunks.items():
        if parts:
            result[key] = gather_rows(torch.cat(parts), total).cpu()
    if "expert_logits" in result:
        result["expert_logits"] = result["expert_logits"].transpose(0, 1).contiguous()
    return result


def topk_correct(logits: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == targets[:, None]).any(dim=1)


def per_class_accuracy(predictions: torch.Tensor, targets: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Accuracy of each class (NaN for a class with no test sample)."""
    correct = torch.zeros(num_classes, device=targets.device).index_add_(0, targets, (predictions == targets).float())
    seen = torch.bincount(targets, minlength=num_classes).float()
    return torch.where(seen > 0, correct / seen.clamp(min=1), torch.full_like(seen, float("nan")))


def compute_metrics(logits: torch.Tensor, targets: torch.Tensor, train_counts: Sequence[int],
                    expert_logits: torch.Tensor | None = None,
                    calibration_report: Callable[..., dict[str, Any]] | None = None) -> dict[str, Any]:
    """All metrics of one split as plain Python numbers (JSON-ready). Accuracies are fractions."""
    if calibration_report is None:
        from longtail.calibration.metrics import calibration_report
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


def summary(metrics: dict[str, Any]) -> str:
    """One line a person reads at the end of a run."""
    def pct(value: float | None) -> str:
        return "  -  " if value is None else f"{100 * value:5.2f}"
    return (f"top-1 {pct(metrics['top1'])} | many {pct(metrics.get('many_top1'))} "
            f"medium {pct(metrics.get('medium_top1'))} few {pct(metrics.get('few_top1'))} | "
            f"ECE {pct(metrics['ece'])} NLL {metrics['nll']:.3f}")
