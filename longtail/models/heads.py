"""Classifier heads: features (B, D) -> logits (B, C).

Models build their heads with ``make_head``; stage 2 (cRT, LWS, tau-norm) replaces or wraps them.
Every head exposes ``in_features`` and ``out_features`` so stage 2 can build a fresh one of the
same size.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["LinearHead", "CosineHead", "LWSHead", "TauNormHead", "HEAD_KINDS", "make_head"]

HEAD_KINDS = ("linear", "cosine")


class LinearHead(nn.Linear):
    """The ordinary fully connected classifier ``W f + b``."""


class CosineHead(nn.Module):
    """``scale * cos(f, w_c)``: features and class weights are L2-normalised, so every logit lies in
    [-scale, scale]. SHIKE and RIDE use it with scale 30 (their ``NormedLinear`` times ``s``); the
    weights start from the authors' uniform(-1, 1) draw (only their direction matters)."""

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine head scale must be positive, got {scale}")
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.weight = nn.Parameter(torch.empty(out_features, in_features).uniform_(-1.0, 1.0))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


class LWSHead(nn.Module):
    """Learnable weight scaling (Kang et al. 2020): ``s_c * head(f)_c`` with one learnable scale per
    class, starting at 1. The wrapped head is frozen unless ``train_base`` (MiSLAS fine-tunes it at
    a smaller learning rate together with the scales)."""

    def __init__(self, base: nn.Module, train_base: bool = False) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        base.requires_grad_(train_base)
        self.scales = nn.Parameter(torch.ones(base.out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.base(features) * self.scales


class TauNormHead(nn.Module):
    """tau-normalised classifier (Kang et al. 2020): ``w_c / ||w_c||^tau`` applied to the features,
    bias dropped. It is post-hoc: the weights are a frozen copy (a buffer) of a linear head's."""

    def __init__(self, base: nn.Module, tau: float = 1.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"tau-norm rescales a linear classifier's weights; got {type(base).__name__}. "
                            "Use it on a model with head: linear")
        self.in_features, self.out_features, self.tau = base.in_features, base.out_features, float(tau)
        self.register_buffer("weight", base.weight.detach().clone())

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        norms = self.weight.norm(dim=1, keepdim=True)
        return F.linear(features, self.weight / norms.pow(self.tau))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tau={self.tau}"


def make_head(kind: str, in_features: int, num_classes: int, scale: float = 30.0) -> nn.Module:
    """A fresh head named by a model's ``head`` param: ``linear`` or ``cosine`` (with ``scale``)."""
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    raise ValueError(f"unknown head {kind!r}; allowed: {', '.join(HEAD_KINDS)}")
