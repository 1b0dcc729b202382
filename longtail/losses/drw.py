"""LDAM with deferred re-weighting (Cao et al. 2019), the LDAM-DRW baseline of SHIKE (Jin et al.
2023) and IKL."""
from __future__ import annotations

from typing import Literal, Sequence

import torch
from torch import nn

from longtail.functional import (WEIGHT_NORMALIZATIONS, checked_class_counts, class_balanced_weights, ldam_logits,
                                 ldam_loss, normalize_weighted_losses)
from longtail.registry import LOSSES
from longtail.types import Batch, ModelOutput

__all__ = ["LDAMDRW", "as_weighted_mean"]


def as_weighted_mean(weighted_losses: torch.Tensor, sample_weights: torch.Tensor) -> torch.Tensor:
    """Rescale per-sample weighted losses so their plain batch mean is ``sum(w l) / sum(w)``
    (``normalize_weighted_losses(..., "weight_sum")``).

    That is ``F.cross_entropy(weight=w)``'s mean, which Cao et al.'s and RIDE's code train with;
    the trainer only ever takes a plain mean of what a loss returns.
    """
    return normalize_weighted_losses(weighted_losses, sample_weights, "weight_sum")


@LOSSES.register("ldam_drw")
class LDAMDRW(nn.Module):
    """LDAM loss (``ldam_loss``) with class-balanced weights switched on at ``drw_epoch``.

    Until ``drw_epoch`` (0-based; default: 80 % of the run, i.e. 160 of 200 as Cao et al.) every
    class weighs 1; from then on ``class_balanced_weights(counts, beta)``. The weighted batch mean
    divides by the summed weights, as Cao et al.'s ``F.cross_entropy(weight=...)`` and RIDE's ``RIDELoss``
    (``normalize="weight_sum"``, the default; ``normalize="batch"`` divides by the batch size, Cui et
    al.'s normalisation; ``longtail.functional.normalize_weighted_losses``). ``scale`` multiplies
    the margin-shifted logits; for a head that already scales its cosine logits by s, set ``scale=1``
    and ``max_margin=0.5 * s``.
    """

    def __init__(self, class_counts: Sequence[int], num_classes: int, max_margin: float = 0.5, scale: float = 30.0,
                 drw_epoch: int | None = None, beta: float = 0.9999,
                 normalize: Literal["weight_sum", "batch"] = "weight_sum") -> None:
        super().__init__()
        counts = checked_class_counts(class_counts, num_classes)
        if normalize not in WEIGHT_NORMALIZATIONS:
            raise ValueError(f"ldam_drw normalize must be one of {WEIGHT_NORMALIZATIONS}, got {normalize!r}")
        self.max_margin, self.scale, self.drw_epoch, self.normalize = max_margin, scale, drw_epoch, normalize
        self.register_buffer("class_counts", counts, persistent=False)
        self.register_buffer("balanced_weight", class_balanced_weights(counts, beta), persistent=False)
        self.register_buffer("weight", torch.ones(num_classes), persistent=False)

    def drw_starts_at(self, total_epochs: int) -> int:
        return self.drw_epoch if self.drw_epoch is not None else int(0.8 * total_epochs)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        balanced = epoch >= self.drw_starts_at(total_epochs)
        self.weight.copy_(self.balanced_weight if balanced else torch.ones_like(self.weight))

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        losses = ldam_loss(output.logits, targets, self.class_counts, self.max_margin, self.scale,
                           weight=self.weight, reduction="none")
        return normalize_weighted_losses(losses, self.weight[targets], self.normalize)

    def adjust_logits(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The logits this loss's softmax sees: margin at the target, then ``scale`` (for IKL's ICL)."""
        return ldam_logits(logits, targets, self.class_counts, self.max_margin, self.scale)
