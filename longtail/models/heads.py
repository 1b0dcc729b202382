"""Classifier heads: features (B, D) -> logits (B, C).

Models build their heads with ``make_head``; stage 2 (cRT, LWS, tau-norm, ...) replaces or wraps
them. Every head kind is registered in ``HEADS`` under its ``kind`` and knows itself what stage 2
needs of it, so a new kind is one class in one file:

- ``spec()``: what rebuilds an empty head of this kind (saved with stage-2 checkpoints);
  ``from_spec(spec, in_features, out_features)`` rebuilds it;
- ``fresh()``: a newly initialised head of the same kind and size (cRT), if the kind has one;
- ``fold()``: the same function as a plain ``LinearHead`` where that is exact, else the head itself.

Every head exposes ``in_features`` and ``out_features``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from longtail.registry import HEADS

__all__ = ["Head", "LinearHead", "CosineHead", "LWSHead", "TauNormHead", "HEAD_KINDS", "make_head", "register_head",
           "head_spec", "head_from_spec", "fresh_like", "fold_head", "restore_heads"]

HEAD_KINDS = ("linear", "cosine")


def register_head(cls: type) -> type:
    """Register a head class under its ``kind``."""
    return HEADS.register(cls.kind)(cls)


class Head:
    """What every head kind provides (a mix-in of ``nn.Module`` subclasses)."""

    kind = ""
    in_features: int
    out_features: int

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        return cls(in_features, out_features)

    def fresh(self) -> nn.Module:
        raise TypeError(f"cannot re-initialise a {self.kind} head; cRT needs a linear or cosine head")

    def fold(self) -> nn.Module:
        return self  # type: ignore[return-value]


@register_head
class LinearHead(Head, nn.Linear):
    """The ordinary fully connected classifier ``W f + b``."""

    kind = "linear"

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "bias": self.bias is not None}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        return cls(in_features, out_features, bias=spec["bias"])

    def fresh(self) -> nn.Module:
        return LinearHead(self.in_features, self.out_features, bias=self.bias is not None).to(self.weight.device)

    @classmethod
    @torch.no_grad()
    def of(cls, weight: torch.Tensor, bias: torch.Tensor) -> "LinearHead":
        """A linear head with the given weight (C, D) and bias (C,)."""
        head = cls(weight.shape[1], weight.shape[0]).to(weight.device)
        head.weight.copy_(weight)
        head.bias.copy_(bias)
        return head


@register_head
class CosineHead(Head, nn.Module):
    """``scale * cos(f, w_c)``: features and class weights are L2-normalised, so every logit lies in
    [-scale, scale]. SHIKE, RIDE and LDAM-DRW use it with scale 30 (their ``NormedLinear`` times ``s``).

    Each class vector starts as a uniform(-1, 1) draw scaled to unit length, as the authors'
    ``NormedLinear`` (``uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)``). The forward pass sees only the
    direction, but training does not: the gradient of a normalised weight shrinks as 1 / |w|, so its
    angular step as lr / |w|^2, and the unrenormed draw (|w| about 4.6 for 64 features) learns ~20x
    slower. That cost SHIKE's 20-epoch classifier retraining 3.7 points (docs/FIDELITY.md)."""

    kind = "cosine"

    def __init__(self, in_features: int, out_features: int, scale: float = 30.0) -> None:
        super().__init__()
        if scale <= 0:
            raise ValueError(f"cosine head scale must be positive, got {scale}")
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.weight = nn.Parameter(F.normalize(torch.empty(out_features, in_features).uniform_(-1.0, 1.0), dim=1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.linear(F.normalize(features, dim=1), F.normalize(self.weight, dim=1))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        return cls(in_features, out_features, spec["scale"])

    def fresh(self) -> nn.Module:
        return CosineHead(self.in_features, self.out_features, self.scale).to(self.weight.device)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scale={self.scale}"


@register_head
class LWSHead(Head, nn.Module):
    """Learnable weight scaling (Kang et al. 2020): ``s_c * head(f)_c`` with one learnable scale per
    class, starting at 1. The wrapped head is frozen unless ``train_base`` (MiSLAS fine-tunes it at
    a smaller learning rate together with the scales)."""

    kind = "lws"

    def __init__(self, base: nn.Module, train_base: bool = False) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        base.requires_grad_(train_base)
        self.scales = nn.Parameter(torch.ones(base.out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.base(features) * self.scales

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "base": head_spec(self.base)}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        return cls(head_from_spec(spec["base"], in_features, out_features))

    def folded_bias(self) -> torch.Tensor:
        base = self.base
        return base.bias * self.scales if getattr(base, "bias", None) is not None else torch.zeros_like(self.scales)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        if not isinstance(self.base, nn.Linear):
            return self
        return LinearHead.of(self.base.weight * self.scales.unsqueeze(1), self.folded_bias())


@register_head
class TauNormHead(Head, nn.Module):
    """tau-normalised classifier (Kang et al. 2020): ``w_c / ||w_c||^tau`` applied to the features,
    bias dropped. It is post-hoc: the weights are a frozen copy (a buffer) of a linear head's."""

    kind = "tau_norm"

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

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "tau": self.tau}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        return cls(LinearHead(in_features, out_features), spec["tau"])

    @torch.no_grad()
    def fold(self) -> nn.Module:
        weight = self.weight / self.weight.norm(dim=1, keepdim=True).pow(self.tau)
        return LinearHead.of(weight, torch.zeros(weight.shape[0], device=weight.device))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tau={self.tau}"


def make_head(kind: str, in_features: int, num_classes: int, scale: float = 30.0) -> nn.Module:
    """A fresh head named by a model's ``head`` param: ``linear`` or ``cosine`` (with ``scale``)."""
    if kind == "linear":
        return LinearHead(in_features, num_classes)
    if kind == "cosine":
        return CosineHead(in_features, num_classes, scale)
    raise ValueError(f"unknown head {kind!r}; allowed: {', '.join(HEAD_KINDS)}")


def _as_head(head: nn.Module) -> Head:
    if not isinstance(head, Head):
        raise TypeError(f"{type(head).__name__} is not a registered head kind; derive it from "
                        "longtail.models.heads.Head and decorate it with @register_head")
    return head


def head_spec(head: nn.Module) -> dict[str, Any]:
    """What ``head_from_spec`` needs to rebuild an (empty) head of this kind before loading weights."""
    return _as_head(head).spec()


def head_from_spec(spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
    return HEADS.get(spec["kind"]).from_spec(spec, in_features, out_features)


def fresh_like(head: nn.Module) -> nn.Module:
    """A newly initialised head of the same kind and size (cRT's re-initialised classifier)."""
    return _as_head(head).fresh()


def fold_head(head: nn.Module) -> nn.Module:
    """The same function as a plain ``LinearHead`` where that is exact, else the head itself."""
    return _as_head(head).fold()


def restore_heads(model: nn.Module, specs: list[dict[str, Any]]) -> None:
    """Give ``model`` heads of the kinds in ``specs`` (from a stage-2 checkpoint's ``heads``), so
    ``model.load_state_dict(checkpoint["model"])`` fits."""
    if len(specs) != len(model.heads):
        raise ValueError(f"the checkpoint has {len(specs)} heads, the model {len(model.heads)}")
    device = next(model.parameters()).device
    for i, spec in enumerate(specs):
        old = model.heads[i]
        model.heads[i] = head_from_spec(spec, old.in_features, old.out_features).to(device)
