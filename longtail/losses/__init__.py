"""Loss modules (registered in ``longtail.registry.LOSSES``): thin ``nn.Module`` wrappers of
``longtail.functional`` that hold what a method needs between steps (class counts, the DRW switch,
IKL's stored predictions). ``forward(output, targets, batch=None)`` returns the per-sample loss (B,), or
``LossTerms`` (its total and named parts) for a loss of several terms; ``longtail.losses.terms`` turns
either into the batch loss. A loss that is not a function of one prediction (it reads every expert,
or keeps per-sample state) says so with ``single_prediction = False``, so no wrapper applies it per
expert."""
from longtail.losses.basic import (BalancedSoftmax, ClassBalanced, CrossEntropy, Focal, LabelSmoothing,
                                   LogitAdjustment)
from longtail.losses.drw import LDAMDRW
from longtail.losses.experts import RIDELoss, SHIKELoss
from longtail.losses.ikl import IKLLoss

__all__ = ["CrossEntropy", "LabelSmoothing", "Focal", "ClassBalanced", "BalancedSoftmax", "LogitAdjustment",
           "LDAMDRW", "SHIKELoss", "RIDELoss", "IKLLoss"]
