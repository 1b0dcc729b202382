"""IKL, Implicit Knowledge Learning (seed 004_8d58af53471ab459.txt), as a plug-in around any loss.

``L = (1 - alpha) L_base + alpha (L_IUR + L_ICL)`` (eq. 9). The loss keeps, per training sample,
last epoch's prediction and whether it was right, and per class a soft label built from last
epoch's class-median features; the trainer's hooks fill and roll this state.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F

from longtail.functional import (ikl_alpha, ikl_class_medians, ikl_correlation_labels, ikl_uncertainty_loss,
                                 soft_target_cross_entropy)
from longtail.losses.basic import checked_counts
from longtail.losses.terms import as_terms
from longtail.registry import LOSSES
from longtail.types import Batch, LossTerms, ModelOutput

__all__ = ["IKLLoss"]

_EPOCH_STATE = ("cur_values", "cur_indices", "cur_correct", "cur_targets", "cur_features")


def _call_hook(module: nn.Module, hook: str, *args: Any) -> None:
    method = getattr(module, hook, None)
    if callable(method):
        method(*args)


@LOSSES.register("ikl")
class IKLLoss(nn.Module):
    """IKL around the registered loss ``base`` (built with ``base_params``).

    - IUR (eq. 2-5): ``ikl_uncertainty_loss`` between last epoch's prediction of the sample,
      softened with ``tau``, and the current one, on the samples last epoch got right (CKS). The
      per-sample values are scaled by ``B / #selected`` so that their batch mean is eq. 5's mean
      over the selected samples.
    - ICL (eq. 6-8): cross-entropy of the current (unsoftened) prediction against
      ``ikl_correlation_labels`` of last epoch's class-median features.
    - alpha: ``max_alpha * ikl_alpha(epoch, total_epochs, alpha_schedule)``, 0 in the first epoch
      (no previous predictions yet), so that epoch trains with the base loss only.

    Storage (the paper pre-saves past predictions; we keep them on the loss's device): with
    ``topk=k`` each sample keeps its k largest softened probabilities (fp16) and their classes
    (int32), the remaining mass spread evenly over the other classes when read back; ``topk=None``
    keeps all C probabilities (fp16). Class medians are exact: each sample's features of the
    current epoch are kept in fp16 (N x D, not saved in checkpoints) and reduced at the epoch's end.
    Under torch.distributed every rank records its own samples and ``on_epoch_end`` merges them.
    """

    single_prediction = False  # keeps per-sample state: never a per-expert base loss

    def __init__(self, class_counts: Sequence[int], num_classes: int, num_samples: int | None = None,
                 base: str = "ce", base_params: dict[str, Any] | None = None, tau: float = 2.0,
                 alpha_schedule: str = "parabolic", max_alpha: float = 1.0, topk: int | None = 32) -> None:
        super().__init__()
        checked_counts(class_counts, num_classes)
        if num_samples is None or num_samples < 1:
            raise ValueError("ikl keeps one prediction per training sample and needs num_samples (the number "
                             "of training images); the trainer passes it, or give LOSSES.build(..., num_samples=N)")
        if base == "ikl":
            raise ValueError("ikl cannot wrap itself; set base to another registered loss (e.g. ce, balanced_softmax)")
        if topk is not None and topk < 1:
            raise ValueError(f"topk must be >= 1 or None (keep all classes), got {topk}")
        if not 0.0 <= max_alpha <= 1.0:
            raise ValueError(f"max_alpha must be in [0, 1], got {max_alpha}")
        ikl_alpha(0, 1, alpha_schedule)  # an unknown schedule fails now, not after the first epoch
        self.base = LOSSES.build(base, base_params, where="loss.params.base_params",
                                 class_counts=list(class_counts), num_classes=num_classes, num_samples=num_samples)
        self.num_classes, self.tau = num_classes, tau
        self.alpha_schedule, self.max_alpha = alpha_schedule, max_alpha
        self.dense = topk is None
        self.k = num_classes if topk is None else min(topk, num_classes)
        self.alpha = 0.0
        # last epoch's state, saved with checkpoints
        self.register_buffer("prev_values", torch.zeros(num_samples, self.k, dtype=torch.float16))
        indices = None if self.dense else torch.zeros(num_samples, self.k, dtype=torch.int32)
        self.register_buffer("prev_indices", indices)
        self.register_buffer("prev_correct", torch.zeros(num_samples, dtype=torch.bool))
        self.register_buffer("soft_labels", torch.eye(num_classes))
        self.register_buffer("has_previous", torch.tensor(False))
        # this epoch's records; rolled into the above at the epoch's end, before any checkpoint
        self.register_buffer("cur_values", torch.zeros_like(self.prev_values), persistent=False)
        self.register_buffer("cur_indices", None if self.dense else torch.zeros_like(self.prev_indices),
                             persistent=False)
        self.register_buffer("cur_correct", torch.zeros(num_samples, dtype=torch.bool), persistent=False)
        self.register_buffer("cur_seen", torch.zeros(num_samples, dtype=torch.bool), persistent=False)
        self.register_buffer("cur_targets", torch.zeros(num_samples, dtype=torch.int64), persistent=False)
        self.register_buffer("cur_features", None, persistent=False)  # (N, D) fp16, allocated at the first step

    # ------------------------------------------------------------------------------------ hooks
    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        _call_hook(self.base, "on_epoch_start", epoch, total_epochs)
        ready = bool(self.has_previous)
        self.alpha = self.max_alpha * ikl_alpha(epoch, total_epochs, self.alpha_schedule) if ready else 0.0

    @torch.no_grad()
    def on_step_end(self, output: ModelOutput, batch: Batch) -> None:
        _call_hook(self.base, "on_step_end", output, batch)
        indices = self._indices(output, batch)
        logits = output.logits.float()
        probs = F.softmax(logits / self.tau, dim=-1)
        if self.dense:
            self.cur_values[indices] = probs.half()
        else:
            values, classes = probs.topk(self.k, dim=-1)
            self.cur_values[indices] = values.half()
            self.cur_indices[indices] = classes.int()
        targets = batch.targets.to(indices.device)
        self.cur_correct[indices] = logits.argmax(dim=-1) == targets
        self.cur_seen[indices] = True
        self.cur_targets[indices] = targets
        if self.cur_features is None:
            self.cur_features = output.features.new_zeros(len(self.cur_seen), output.features.shape[1],
                                                          dtype=torch.float16)
        self.cur_features[indices] = output.features.half()

    @torch.no_grad()
    def on_epoch_end(self, epoch: int) -> None:
        _call_hook(self.base, "on_epoch_end", epoch)
        self._merge_ranks()
        seen = self.cur_seen
        if not bool(seen.any()):
            return
        centers = ikl_class_medians(self.cur_features[seen], self.cur_targets[seen], self.num_classes)
        self.soft_labels.copy_(ikl_correlation_labels(centers))
        self.prev_values, self.cur_values = self.cur_values, self.prev_values
        if not self.dense:
            self.prev_indices, self.cur_indices = self.cur_indices, self.prev_indices
        self.prev_correct.copy_(self.cur_correct)
        self.cur_correct.zero_()
        self.cur_seen.zero_()
        self.has_previous.fill_(True)

    # ---------------------------------------------------------------------------------- forward
    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> LossTerms:
        """Per-sample ``(1 - alpha) L_base + alpha (L_IUR + L_ICL)`` with its three weighted parts as the
        terms ``base``, ``iur`` and ``icl`` (the last two are 0 while alpha is 0)."""
        base = as_terms(self.base(output, targets, batch)).total
        if self.alpha == 0.0:
            zero = torch.zeros_like(base)
            return LossTerms(total=base, terms={"base": base, "iur": zero, "icl": zero})
        if batch is None:
            raise ValueError("ikl needs the batch (its indices) to find each sample's previous prediction")
        indices = self._indices(output, batch)
        logits = output.logits
        selected = self.prev_correct[indices]
        iur = ikl_uncertainty_loss(self.previous_probs(indices), logits, selected, self.tau, reduction="none")
        iur = iur * (len(indices) / selected.sum().clamp_min(1))
        icl = soft_target_cross_entropy(logits, self.soft_labels[targets], reduction="none")
        terms = {"base": (1.0 - self.alpha) * base, "iur": self.alpha * iur, "icl": self.alpha * icl}
        return LossTerms(total=terms["base"] + terms["iur"] + terms["icl"], terms=terms)

    def previous_probs(self, indices: torch.Tensor) -> torch.Tensor:
        """Last epoch's softened predictions (B, C) of the samples at ``indices``, as float32."""
        values = self.prev_values[indices].float()
        if self.dense:
            return values
        rest = (1.0 - values.sum(dim=1, keepdim=True)).clamp_min(0.0) / max(self.num_classes - self.k, 1)
        probs = rest.expand(-1, self.num_classes).clone()
        return probs.scatter_(1, self.prev_indices[indices].long(), values)

    # -------------------------------------------------------------------------------- internals
    def _indices(self, output: ModelOutput, batch: Batch) -> torch.Tensor:
        indices = batch.indices.to(self.prev_correct.device)
        if len(indices) != len(output.logits):
            raise ValueError(f"ikl needs one batch index per prediction, got {len(indices)} indices for "
                             f"{len(output.logits)} predictions (paired or model-mixed batches are not supported)")
        return indices

    def _merge_ranks(self) -> None:
        """Give every rank every sample's record of this epoch (each rank saw only its shard)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        rank = dist.get_rank()
        owner = self.cur_seen.long() * (rank + 1)
        dist.all_reduce(owner, op=dist.ReduceOp.MAX)  # a sample seen on several ranks keeps the highest one's
        mine = owner == rank + 1
        for name in _EPOCH_STATE:
            record = getattr(self, name)
            if record is None:
                continue
            wide = record.to(torch.float32 if record.is_floating_point() else torch.int64)
            wide = wide * mine.view(-1, *([1] * (wide.ndim - 1)))
            dist.all_reduce(wide)
            record.copy_(wide)
        self.cur_seen.copy_(owner > 0)
