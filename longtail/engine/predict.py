"""Predictions of a model over an evaluation split, gathered over ranks (the metrics of them are
``longtail.metrics``)."""
from __future__ import annotations

from typing import Iterable

import torch

from longtail.engine.distributed import DistInfo, gather_rows
from longtail.types import ModelOutput, expert_features_of


@torch.no_grad()
def predict(model: torch.nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], dist_info: DistInfo,
            total: int, amp_dtype: torch.dtype | None = None, keep_features: bool = False,
            expert_features: bool = False) -> dict[str, torch.Tensor]:
    """Run ``model`` over an evaluation loader (this rank's shard) and gather everything on every rank.

    Returns float32 CPU tensors: logits (N, C), targets (N,), and when present expert_logits (M, N, C),
    features (N, D) (``keep_features``) and expert_features (M, N, D) (``expert_features``: each expert's,
    or the single model's as one expert; what ``model.logits_from_features`` takes). Predictions stay on
    the device until the end: one host copy, no per-batch sync.
    """
    was_training = model.training
    model.eval()
    chunks: dict[str, list[torch.Tensor]] = {"logits": [], "targets": [], "expert_logits": [], "features": [],
                                             "expert_features": []}
    for images, targets in loader:
        with torch.autocast(dist_info.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            output: ModelOutput = model(images)
        chunks["logits"].append(output.logits.float())
        chunks["targets"].append(targets)
        if output.expert_logits is not None:
            chunks["expert_logits"].append(output.expert_logits.float().transpose(0, 1))  # (B, M, C)
        if keep_features:
            chunks["features"].append(output.features.float())
        if expert_features:
            chunks["expert_features"].append(expert_features_of(output).float().transpose(0, 1))  # (B, M, D)
    model.train(was_training)
    result = {}
    for key, parts in chunks.items():
        if parts:
            result[key] = gather_rows(torch.cat(parts), total).cpu()
    for key in ("expert_logits", "expert_features"):
        if key in result:
            result[key] = result[key].transpose(0, 1).contiguous()
    return result
