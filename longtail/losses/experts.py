"""Losses of multi-expert models: SHIKE's stage 1 (Jin et al., CVPR 2023, eq. 10) and RIDE's
(Wang et al., ICLR 2021).

Both read ``output.expert_logits`` (M, B, C); a single-head model is an error naming the fix.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from longtail.functional import (DKT_FORMS, checked_class_counts, ride_class_temperatures, ride_diversity_loss,
                                 shike_dkt_loss, shike_mutual_loss)
from longtail.losses.terms import as_terms
from longtail.registry import LOSSES
from longtail.types import Batch, LossTerms, ModelOutput

__all__ = ["SHIKELoss", "RIDELoss"]


def _expert_logits(output: ModelOutput, loss_name: str) -> torch.Tensor:
    if output.expert_logits is None:
        raise ValueError(f"loss {loss_name!r} needs a multi-expert model (output.expert_logits is None); "
                         "use a model with several experts (e.g. shike or ride) or another loss")
    return output.expert_logits


@LOSSES.register("shike")
class SHIKELoss(nn.Module):
    """SHIKE's representation-learning loss ``L_ce + alpha L_nt + beta L_mu`` (Jin et al. 2023, eq. 10).

    ``L_ce`` is the cross-entropy of every expert, summed (the authors' soft CE on one-hot labels;
    mixed labels come from the trainer); ``L_nt`` is ``shike_dkt_loss`` (eq. 5-9) and ``L_mu``
    ``shike_mutual_loss`` (eq. 4), both with batch-mean KL. The authors' code weighs them 10 and 1
    with ``F.kl_div(reduction="mean")``, which also averages over the C classes, so the defaults
    here are ``alpha = 10 / C`` and ``beta = 1 / C`` (docs/FIDELITY.md, SHIKE loss weights). The terms are logged as
    ``ce``, ``dkt`` (alpha L_nt) and ``mutual`` (beta L_mu). ``dkt_form`` picks the authors' code
    (``code``, default: the target column kept in the softmaxes) or the paper's eq. 8 (``paper``).
    """

    single_prediction = False  # reads every expert's logits: never a per-expert base loss

    def __init__(self, class_counts: Sequence[int], num_classes: int, alpha: float | None = None,
                 beta: float | None = None, temperature: float = 1.0, dkt_form: str = "code") -> None:
        super().__init__()
        checked_class_counts(class_counts, num_classes)
        if dkt_form not in DKT_FORMS:
            raise ValueError(f"loss.params.dkt_form must be one of {DKT_FORMS}, got {dkt_form!r}")
        self.dkt_form = dkt_form
        self.alpha = alpha if alpha is not None else 10.0 / num_classes
        self.beta = beta if beta is not None else 1.0 / num_classes
        self.temperature = temperature

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> LossTerms:
        experts = _expert_logits(output, "shike")
        terms = {"ce": sum(F.cross_entropy(logits, targets, reduction="none") for logits in experts),
                 "dkt": self.alpha * shike_dkt_loss(experts, targets, self.temperature, reduction="none",
                                                     form=self.dkt_form),
                 "mutual": self.beta * shike_mutual_loss(experts, self.temperature, reduction="none")}
        return LossTerms(total=terms["ce"] + terms["dkt"] + terms["mutual"], terms=terms)


@LOSSES.register("ride")
class RIDELoss(nn.Module):
    """RIDE's loss: a distribution-aware loss per expert plus ``diversity_factor`` x diversity.

    ``base`` is any registered single-prediction loss applied to each expert's logits and summed
    (RIDE: ``ldam_drw``; ``balanced_softmax`` also works); its ``on_epoch_start`` (the DRW switch)
    is forwarded. The diversity term is ``ride_diversity_loss`` with a negative factor (RIDELoss's
    default -0.2; the authors' CIFAR configs use -0.45).
    From ``reweight_epoch`` (default: 80 % of the run, 160 of 200 as RIDE) the diversity temperature
    becomes per-class, ``ride_class_temperatures(counts, T, reweight_factor)`` (Wang et al. 2021, eq. 13-14);
    ``reweight_factor=0`` keeps it uniform. The terms are logged as ``base`` (the experts' losses
    summed) and ``diversity`` (``diversity_factor`` x the diversity loss).
    """

    single_prediction = False  # reads every expert's logits: never a per-expert base loss

    def __init__(self, class_counts: Sequence[int], num_classes: int, base: str = "ldam_drw",
                 base_params: dict[str, Any] | None = None, diversity_factor: float = -0.2,
                 diversity_temperature: float = 1.0, reweight_factor: float = 0.05,
                 reweight_epoch: int | None = None) -> None:
        super().__init__()
        counts = checked_class_counts(class_counts, num_classes)
        self.base = LOSSES.build(base, base_params, where="loss.params.base_params",
                                 class_counts=list(class_counts), num_classes=num_classes)
        if not getattr(self.base, "single_prediction", True):
            raise ValueError(f"ride's base must be a single-prediction loss (e.g. ldam_drw, balanced_softmax), "
                             f"got {base!r}")
        self.diversity_factor = diversity_factor
        self.diversity_temperature = diversity_temperature
        self.reweight_epoch = reweight_epoch
        self.register_buffer("class_temperature",
                             ride_class_temperatures(counts, diversity_temperature, reweight_factor), persistent=False)
        self.register_buffer("temperature", torch.full((num_classes,), float(diversity_temperature)),
                             persistent=False)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        hook = getattr(self.base, "on_epoch_start", None)
        if callable(hook):
            hook(epoch, total_epochs)
        start = self.reweight_epoch if self.reweight_epoch is not None else int(0.8 * total_epochs)
        if epoch >= start:
            self.temperature.copy_(self.class_temperature)
        else:
            self.temperature.fill_(self.diversity_temperature)

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> LossTerms:
        experts = _expert_logits(output, "ride")
        base = sum(as_terms(self.base(ModelOutput(logits=logits, features=output.features), targets, batch)).total
                   for logits in experts)
        diversity = self.diversity_factor * ride_diversity_loss(experts, self.temperature, reduction="none")
        return LossTerms(total=base + diversity, terms={"base": base, "diversity": diversity})
