"""Stage-2 classifier heads and how they are saved.

Stage 2 replaces each expert's head (``model.heads[i]``) by a fresh head (cRT), a wrapper that
learns per-class scales (LWS, MiSLAS), scales and biases (LADC's LWS-Plus, eq. 14), a tau-normalised
copy, or class means (NCM). After training, a head that equals a plain linear layer is folded into
one, so the stage-2 checkpoint loads into the stage-1 architecture (``longtail eval`` works on it);
the others are saved with a spec (``head_spec``) from which ``restore_heads`` rebuilds them.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from longtail.models.heads import CosineHead, LinearHead, LWSHead, TauNormHead

__all__ = ["LWSPlusHead", "NCMHead", "fresh_like", "fold_head", "head_spec", "head_from_spec", "restore_heads"]


class LWSPlusHead(LWSHead):
    """LADC's LWS-Plus (seed 002_6b2bba2c1b62b163.txt, eq. 14): ``f_i * Phi_i(x) + g_i``, learnable
    per-class scale f (from 1) and bias g (from 0) on the frozen stage-1 head Phi."""

    def __init__(self, base: nn.Module, train_base: bool = False) -> None:
        super().__init__(base, train_base)
        self.bias = nn.Parameter(torch.zeros(base.out_features))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return super().forward(features) + self.bias


class NCMHead(nn.Module):
    """Nearest class mean (Kang et al. 2020): logits are minus the squared Euclidean distance between
    the L2-normalised feature and each class's mean of L2-normalised training features. Computed in
    float32 even under autocast (distances of unit vectors lose too much in bf16)."""

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


def fresh_like(head: nn.Module) -> nn.Module:
    """A newly initialised head of the same kind and size (cRT's re-initialised classifier)."""
    if isinstance(head, nn.Linear):
        return LinearHead(head.in_features, head.out_features, bias=head.bias is not None).to(head.weight.device)
    if isinstance(head, CosineHead):
        return CosineHead(head.in_features, head.out_features, head.scale).to(head.weight.device)
    raise TypeError(f"cannot re-initialise a {type(head).__name__} head; cRT needs a linear or cosine head")


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> LinearHead:
    head = LinearHead(weight.shape[1], weight.shape[0]).to(weight.device)
    with torch.no_grad():
        head.weight.copy_(weight)
        head.bias.copy_(bias)
    return head


@torch.no_grad()
def fold_head(head: nn.Module) -> nn.Module:
    """The same function as a plain ``LinearHead`` where that is exact (LWS / LWS-Plus / tau-norm on a
    linear head), else the head itself."""
    if isinstance(head, LWSHead) and isinstance(head.base, nn.Linear):
        base, scales = head.base, head.scales
        bias = base.bias * scales if base.bias is not None else torch.zeros_like(scales)
        if isinstance(head, LWSPlusHead):
            bias = bias + head.bias
        return _linear(base.weight * scales.unsqueeze(1), bias)
    if isinstance(head, TauNormHead):
        weight = head.weight / head.weight.norm(dim=1, keepdim=True).pow(head.tau)
        return _linear(weight, torch.zeros(weight.shape[0], device=weight.device))
    return head


def head_spec(head: nn.Module) -> dict[str, Any]:
    """What ``head_from_spec`` needs to rebuild an (empty) head of this kind before loading weights."""
    if isinstance(head, nn.Linear):
        return {"kind": "linear", "bias": head.bias is not None}
    if isinstance(head, CosineHead):
        return {"kind": "cosine", "scale": head.scale}
    if isinstance(head, NCMHead):
        return {"kind": "ncm"}
    if isinstance(head, LWSHead):
        return {"kind": "lws_plus" if isinstance(head, LWSPlusHead) else "lws", "base": head_spec(head.base)}
    if isinstance(head, TauNormHead):
        return {"kind": "tau_norm", "tau": head.tau}
    raise TypeError(f"no spec for a {type(head).__name__} head")


def head_from_spec(spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
    kind = spec["kind"]
    if kind == "linear":
        return LinearHead(in_features, out_features, bias=spec["bias"])
    if kind == "cosine":
        return CosineHead(in_features, out_features, spec["scale"])
    if kind == "ncm":
        return NCMHead(in_features, out_features)
    if kind in ("lws", "lws_plus"):
        base = head_from_spec(spec["base"], in_features, out_features)
        return (LWSPlusHead if kind == "lws_plus" else LWSHead)(base)
    if kind == "tau_norm":
        return TauNormHead(LinearHead(in_features, out_features), spec["tau"])
    raise ValueError(f"unknown head kind {kind!r} in a stage-2 checkpoint")


def restore_heads(model: nn.Module, specs: list[dict[str, Any]]) -> None:
    """Give ``model`` heads of the kinds in ``specs`` (from a stage-2 checkpoint's ``heads``), so
    ``model.load_state_dict(checkpoint["model"])`` fits."""
    if len(specs) != len(model.heads):
        raise ValueError(f"the checkpoint has {len(specs)} heads, the model {len(model.heads)}")
    device = next(model.parameters()).device
    for i, spec in enumerate(specs):
        old = model.heads[i]
        model.heads[i] = head_from_spec(spec, old.in_features, old.out_features).to(device)
