"""The head kinds only stage 2 makes (registered like every head kind, see ``longtail.models.heads``):
LADC's LWS-Plus and the nearest-class-mean classifier. After stage 2 a head that equals a plain linear
layer is folded into one, so the checkpoint loads into the stage-1 architecture; the others are saved
with their spec and rebuilt from it (``longtail.models.heads.restore_heads``)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from longtail.models.heads import Head, LWSHead, head_from_spec, register_head

__all__ = ["LWSPlusHead", "NCMHead"]


@register_head
class LWSPlusHead(LWSHead):
    """LADC's LWS-Plus (seed 002_6b2bba2c1b62b163.txt, eq. 14): ``f_i * Phi_i(x) + g_i``, learnable
    per-class scale f (from 1) and bias g (from 0) on the frozen stage-1 head Phi."""

    kind = "lws_plus"

    def __init__(self, base: nn.Module, train_base: bool = False) -> None:
        super().__init__(base, train_base)
        self.bias = nn.Parameter(torch.zeros(base.out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features) + self.bias

    def folded_bias(self) -> torch.Tensor:
        return super().folded_bias() + self.bias

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        return cls(head_from_spec(spec["base"], in_features, out_features))


@register_head
class NCMHead(Head, nn.Module):
    """Nearest class mean (Kang et al. 2020): logits are minus the squared Euclidean distance between
    the L2-normalised feature and each class's mean of L2-normalised training features. Computed in
    float32 even under autocast (distances of unit vectors lose too much in bf16)."""

    kind = "ncm"

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("means", torch.zeros(out_features, in_features))

    @classmethod
    def fit(cls, features: torch.Tensor, targets: torch.Tensor, num_classes: int) -> "NCMHead":
        head = cls(features.shape[1], num_classes).to(features.device)
        normalised = F.normalize(features.float(), dim=1)
        sums = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, targets, normalised)
        counts = torch.bincount(targets, minlength=num_classes).clamp_min(1).unsqueeze(1)
        head.means.copy_(sums / counts)
        return head

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return -torch.cdist(F.normalize(features.float(), dim=1), self.means).pow(2)


