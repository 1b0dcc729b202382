"""Feature caching: one pass of the frozen backbone over a split, so classifier retraining on the
features takes seconds instead of epochs of backbone passes.

Features are the un-augmented images' (the evaluation view), per expert (M, N, D) in float32 on the
training device; ``Stage2Context.features`` extracts them with the one evaluation
(``engine.evaluation.evaluate``, ``expert_features=True``): under DDP each rank extracts its evaluation
shard and the shards are gathered, so every rank holds the whole set in the dataset's order.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from longtail.types import expert_features_of

__all__ = ["FeatureSet", "expert_features"]


@dataclass
class FeatureSet:
    """features (M, N, D) float32: each expert's pooled features of the N images; targets (N,) int64."""

    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


# the (M, B, D) features that ``model.logits_from_features`` takes (kept under its stage-2 name)
expert_features = expert_features_of
