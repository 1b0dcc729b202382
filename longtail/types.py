"""The small data types every part shares, so losses never depend on a model class."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class ModelOutput:
    """What every model returns.

    logits: (B, C) the prediction used for evaluation (for multi-expert models the sum or mean
        of the expert logits, as the model is configured).
    features: (B, D) pooled features in front of the classifier (for multi-expert models the
        experts' features concatenated, or averaged, as the model documents).
    expert_logits: (M, B, C) per-expert logits of multi-expert models.
    expert_features: (M, B, D) per-expert pooled features.
    intermediate: per-stage feature maps (shallow to deep), for methods that distil or fuse them.
    extras: anything method-specific (e.g. BBN's per-branch logits).
    """

    logits: torch.Tensor
    features: torch.Tensor
    expert_logits: torch.Tensor | None = None
    expert_features: torch.Tensor | None = None
    intermediate: list[torch.Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def float32(self) -> "ModelOutput":
        """The same output with logits, features and tensor extras in float32 (differentiably), so a
        loss computed after a bfloat16/float16 autocast forward runs in float32. The intermediate
        feature maps stay as they are: no loss reads them, and casting them would cost memory."""
        def up(value: Any) -> Any:
            return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        return ModelOutput(logits=up(self.logits), features=up(self.features),
                           expert_logits=up(self.expert_logits), expert_features=up(self.expert_features),
                           intermediate=self.intermediate, extras={k: up(v) for k, v in self.extras.items()})


def expert_features_of(output: ModelOutput) -> torch.Tensor:
    """(M, B, D) features that ``model.logits_from_features`` takes: the experts' own, or the single
    model's features as one expert."""
    return output.expert_features if output.expert_features is not None else output.features.unsqueeze(0)


@dataclass
class Batch:
    """One training batch after augmentation, on the training device.

    images: (B, C, H, W) float, normalised.
    targets: (B,) int64 labels.
    indices: (B,) int64 positions of the samples in the training set (IKL keeps per-sample state).
    mix_targets / mix_weight: set when the batch is mixed (mixup, Remix, BBN): the loss is
        ``mix_weight * L(targets) + (1 - mix_weight) * L(mix_targets)`` per sample; mix_weight is (B,).
    """

    images: torch.Tensor
    targets: torch.Tensor
    indices: torch.Tensor
    mix_targets: torch.Tensor | None = None
    mix_weight: torch.Tensor | None = None


@dataclass
class LossTerms:
    """What a loss with several parts returns instead of a bare per-sample tensor, so every part is
    logged: ``total`` (B,) is what is trained, ``terms`` its named, already weighted parts (each (B,),
    summing to ``total``; e.g. SHIKE's ``ce``, ``dkt``, ``mutual``)."""

    total: torch.Tensor
    terms: dict[str, torch.Tensor]
