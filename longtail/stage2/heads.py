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

__all__ = ["LWSPlusHead", "NCMHead", "NCM_NORMS"]


@register_head
class LWSPlusHead(LWSHead):
    """LADC's LWS-Plus (Wang et al., AAAI 2022, eq. 14): ``f_i * Phi_i(x) + g_i``, learnable
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


NCM_NORMS = ("cl2n", "l2")


@register_head
class NCMHead(Head, nn.Module):
    """Nearest class mean (Kang et al. 2020): logits are minus the squared Euclidean distance between
    a normalised feature and each class's mean of normalised training features. ``norm="cl2n"``
    (default, as Kang et al.'s code: facebookresearch/classifier-balancing, models/KNNClassifier.py
    and run_networks.py) first subtracts the mean of all training features, then L2-normalises;
    ``norm="l2"`` only L2-normalises. Computed in float32 even under autocast (distances of unit
    vectors lose too much in bf16)."""

    kind = "ncm"

    def __init__(self, in_features: int, out_features: int, norm: str = "cl2n") -> None:
        super().__init__()
        if norm not in NCM_NORMS:
            raise ValueError(f"unknown NCM feature norm {norm!r}; allowed: cl2n (centre, then L2; Kang et al.) "
                             "or l2")
        self.in_features, self.out_features, self.norm = in_features, out_features, norm
        self.register_buffer("means", torch.zeros(out_features, in_features))
        self.register_buffer("centre", torch.zeros(in_features))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "norm": self.norm}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        return cls(in_features, out_features, spec["norm"])

    @classmethod
    def fit(cls, features: torch.Tensor, targets: torch.Tensor, num_classes: int, norm: str = "cl2n") -> "NCMHead":
        head = cls(features.shape[1], num_classes, norm).to(features.device)
        if norm == "cl2n":
            head.centre.copy_(features.float().mean(dim=0))
        normalised = head.normalise(features)
        sums = torch.zeros(num_classes, features.shape[1], device=features.device).index_add_(0, targets, normalised)
        counts = torch.bincount(targets, minlength=num_classes).clamp_min(1).unsqueeze(1)
        head.means.copy_(sums / counts)
        return head

    def normalise(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float() - self.centre, dim=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return -torch.cdist(self.normalise(features), self.means).pow(2)
