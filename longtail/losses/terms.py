"""How per-sample losses become the batch loss the trainer steps on, with its named terms.

A registered loss returns either a per-sample tensor (B,) or ``LossTerms`` (a total and its weighted
parts). ``batch_loss`` takes the batch mean of both and mixes the two label sets of a mixed batch
(mixup, Remix, BBN's paired batches); ``ExpertSum`` applies one loss to every expert's logits and
sums them (SHIKE's stage 2, Jin et al., CVPR 2023, eq. 11).
"""
from __future__ import annotations

import torch
from torch import nn

from longtail.types import Batch, LossTerms, ModelOutput

__all__ = ["as_terms", "batch_loss", "ExpertSum"]


def as_terms(value: torch.Tensor | LossTerms) -> LossTerms:
    """A loss's result as ``LossTerms`` (a bare tensor has no named parts)."""
    return value if isinstance(value, LossTerms) else LossTerms(total=value, terms={})


def batch_loss(loss_fn: nn.Module, output: ModelOutput, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(batch-mean loss, batch-mean of each named term).

    A mixed batch weighs its label sets per sample, ``w L(targets) + (1 - w) L(mix_targets)``, and so
    does every term. A loss without terms of its own then reports the two weighted parts as
    ``targets`` and ``mix_targets`` (for BBN: the uniform and the reversed sampler's labels).
    """
    first = as_terms(loss_fn(output, batch.targets, batch))
    if batch.mix_targets is None:
        return first.total.mean(), {name: term.mean() for name, term in first.terms.items()}
    if batch.mix_weight is None:
        raise ValueError("a batch with mix_targets needs mix_weight (set by the augmentation or the paired loader)")
    second = as_terms(loss_fn(output, batch.mix_targets, batch))
    weight = batch.mix_weight.to(first.total.dtype)
    total = weight * first.total + (1 - weight) * second.total
    if first.terms:
        terms = {name: (weight * term + (1 - weight) * second.terms[name]).mean() for name, term in first.terms.items()}
    else:
        terms = {"targets": (weight * first.total).mean(), "mix_targets": ((1 - weight) * second.total).mean()}
    return total.mean(), terms


class ExpertSum(nn.Module):
    """``base`` on each expert's logits (and features), summed over experts; with several experts each
    expert's part is a term (``expert0``, ``expert1``, ...). A single-head model is the one-term case."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> LossTerms:
        experts = output.expert_logits if output.expert_logits is not None else output.logits.unsqueeze(0)
        features = output.expert_features if output.expert_features is not None else output.features.unsqueeze(0)
        parts = [as_terms(self.base(ModelOutput(logits=logits, features=feats), targets, batch)).total
                 for logits, feats in zip(experts, features)]
        terms = {f"expert{i}": part for i, part in enumerate(parts)} if len(parts) > 1 else {}
        return LossTerms(total=torch.stack(parts).sum(0), terms=terms)
