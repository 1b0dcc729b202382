"""Feature caching: one pass of the frozen backbone over a split, so classifier retraining on the
features takes seconds instead of epochs of backbone passes.

Features are the un-augmented images' (the evaluation view), per expert (M, N, D) in float32 on the
training device; under DDP each rank extracts its evaluation shard and the shards are gathered, so
every rank holds the whole set in the dataset's order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from longtail.engine.distributed import DistInfo, gather_rows
from longtail.types import ModelOutput

__all__ = ["FeatureSet", "expert_features", "extract_features"]


@dataclass
class FeatureSet:
    """features (M, N, D) float32: each expert's pooled features of the N images; targets (N,) int64."""

    features: torch.Tensor
    targets: torch.Tensor

    def __len__(self) -> int:
        return len(self.targets)


def expert_features(output: ModelOutput) -> torch.Tensor:
    """(M, B, D) features that ``model.logits_from_features`` takes: the experts' own, or the single
    model's features as one expert."""
    return output.expert_features if output.expert_features is not None else output.features.unsqueeze(0)


@torch.no_grad()
def extract_features(model: torch.nn.Module, loader: Any, dist_info: DistInfo, total: int,
                     amp_dtype: torch.dtype | None = None) -> FeatureSet:
    """Run the model in eval mode over an evaluation loader (this rank's shard) and gather the
    features of all ``total`` images on every rank."""
    was_training = model.training
    model.eval()
    features, targets = [], []
    for images, labels in loader:
        with torch.autocast(dist_info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output: ModelOutput = model(images)
        features.append(expert_features(output).float().transpose(0, 1))  # (B, M, D): rows first to gather
        targets.append(labels)
    model.train(was_training)
    gathered = gather_rows(torch.cat(features), total).transpose(0, 1).contiguous()
    return FeatureSet(gathered, gather_rows(torch.cat(targets), total))
