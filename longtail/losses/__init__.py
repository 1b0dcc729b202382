"""Loss modules (registered in ``longtail.registry.LOSSES``): thin ``nn.Module`` wrappers of
``longtail.functional`` that hold what a method needs between steps (class counts, the DRW switch,
IKL's stored predictions). ``forward(output, targets, batch=None)`` returns the per-sample loss (B,)."""
from longtail.losses.basic import (BalancedSoftmax, ClassBalanced, CrossEntropy, Focal, LabelSmoothing,
                                   LogitAdjustment)
from longtail.losses.drw import LDAMDRW
from longtail.losses.experts import RIDELoss, SHIKELoss
from longtail.losses.ikl import IKLLoss

__all__ = ["CrossEntropy", "LabelSmoothing", "Focal", "ClassBalanced", "BalancedSoftmax", "LogitAdjustment",
           "LDAMDRW", "SHIKELoss", "RIDELoss", "IKLLoss"]
