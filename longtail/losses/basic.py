"""Single-prediction losses: cross-entropy and its long-tailed re-weighted / re-balanced variants.

Each is ``cls(class_counts, num_classes, **params)`` and returns the per-sample loss (B,) of
``output.logits``; the trainer takes the batch mean (docs/ARCHITECTURE.md, "Losses").
"""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from longtail.functional import (WEIGHT_NORMALIZATIONS, balanced_softmax_logits, balanced_softmax_loss,
                                 checked_class_counts, class_balanced_weights, focal_loss, label_smoothing_loss,
                                 logit_adjusted_logits, logit_adjusted_loss, normalize_weighted_losses)
from longtail.registry import LOSSES
from longtail.types import Batch, ModelOutput

__all__ = ["CrossEntropy", "LabelSmoothing", "Focal", "ClassBalanced", "BalancedSoftmax",
           "LogitAdjustment"]


@LOSSES.register("ce")
class CrossEntropy(nn.Module):
    """Plain softmax cross-entropy, the baseline of every reproduced paper's tables."""

    def __init__(self, class_counts: Sequence[int], num_classes: int) -> None:
        super().__init__()
        checked_class_counts(class_counts, num_classes)

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return F.cross_entropy(output.logits, targets, reduction="none")


@LOSSES.register("label_smoothing")
class LabelSmoothing(nn.Module):
    """Cross-entropy with uniform label smoothing ``epsilon`` (``label_smoothing_loss``)."""

    def __init__(self, class_counts: Sequence[int], num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        checked_class_counts(class_counts, num_classes)
        self.epsilon = epsilon

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return label_smoothing_loss(output.logits, targets, self.epsilon, reduction="none")


@LOSSES.register("focal")
class Focal(nn.Module):
    """Focal loss with focusing parameter ``gamma`` (``focal_loss``), unweighted."""

    def __init__(self, class_counts: Sequence[int], num_classes: int, gamma: float = 2.0) -> None:
        super().__init__()
        checked_class_counts(class_counts, num_classes)
        self.gamma = gamma

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return focal_loss(output.logits, targets, self.gamma, reduction="none")


@LOSSES.register("class_balanced")
class ClassBalanced(nn.Module):
    """Class-balanced re-weighting (Cui et al. 2019) of cross-entropy (``base="ce"``) or focal loss.

    Weights ``class_balanced_weights(counts, beta)`` (normalised to sum C, as Cui et al.'s and Cao et
    al.'s code). ``normalize`` says how the weighted batch is averaged
    (``longtail.functional.normalize_weighted_losses``): ``batch`` (default) divides the weighted sum by
    the batch size, as Cui et al.'s own code (richardaecn/class-balanced-loss), which produced the
    seeds' CB-focal numbers; ``weight_sum`` divides by the batch's summed weights, as
    ``nn.CrossEntropyLoss(weight=w)`` in Cao et al.'s ``cifar_train.py`` (docs/FIDELITY.md, CB row).
    """

    def __init__(self, class_counts: Sequence[int], num_classes: int, base: Literal["ce", "focal"] = "ce",
                 beta: float = 0.9999, gamma: float = 2.0,
                 normalize: Literal["batch", "weight_sum"] = "batch") -> None:
        super().__init__()
        if base not in ("ce", "focal"):
            raise ValueError(f"class_balanced base must be 'ce' or 'focal', got {base!r}")
        if normalize not in WEIGHT_NORMALIZATIONS:
            raise ValueError(f"class_balanced normalize must be one of {WEIGHT_NORMALIZATIONS}, got {normalize!r}")
        self.gamma = gamma if base == "focal" else 0.0
        self.normalize = normalize
        self.register_buffer("weight", class_balanced_weights(checked_class_counts(class_counts, num_classes), beta),
                             persistent=False)

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        losses = focal_loss(output.logits, targets, self.gamma, weight=self.weight, reduction="none")
        return normalize_weighted_losses(losses, self.weight[targets], self.normalize)


@LOSSES.register("balanced_softmax")
class BalancedSoftmax(nn.Module):
    """Balanced softmax cross-entropy (``balanced_softmax_loss``; Jin et al. 2023, eq. 11)."""

    def __init__(self, class_counts: Sequence[int], num_classes: int) -> None:
        super().__init__()
        self.register_buffer("class_counts", checked_class_counts(class_counts, num_classes), persistent=False)

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return balanced_softmax_loss(output.logits, targets, self.class_counts, reduction="none")

    def adjust_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The logits this loss's softmax sees (a wrapping loss, e.g. IKL's ICL, may train on them too)."""
        return balanced_softmax_logits(logits, self.class_counts)


@LOSSES.register("logit_adjustment")
class LogitAdjustment(nn.Module):
    """Logit-adjusted cross-entropy with strength ``tau`` (``logit_adjusted_loss``)."""

    def __init__(self, class_counts: Sequence[int], num_classes: int, tau: float = 1.0) -> None:
        super().__init__()
        self.register_buffer("class_counts", checked_class_counts(class_counts, num_classes), persistent=False)
        self.tau = tau

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return logit_adjusted_loss(output.logits, targets, self.class_counts, self.tau, reduction="none")

    def adjust_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The logits this loss's softmax sees (a wrapping loss, e.g. IKL's ICL, may train on them too)."""
        return logit_adjusted_logits(logits, self.class_counts, self.tau)
