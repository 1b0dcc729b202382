"""The one model wrapper every architecture uses: a backbone gives each expert's pooled features,
one head per expert turns them into logits, and the expert logits are summed or averaged.

A single network is the one-expert case, so losses, stage 2 and calibration see the same
interface everywhere (docs/ARCHITECTURE.md, "Models").
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from longtail.models.heads import make_head
from longtail.types import ModelOutput

__all__ = ["AGGREGATES", "Trunk", "StagedBackbone", "run_shared_stages", "Classifier", "single_model", "global_pool",
           "expert_head_logits", "parameters_outside", "load_pretrained",
           "read_state_file", "load_state_strictly"]

AGGREGATES = ("sum", "mean")


@dataclass
class Trunk:
    """A plain single-branch network cut into its stem and residual stages, with a way to build a
    fresh stage, so multi-expert models can give each expert its own copy of the last stage(s).

    make_stage(index, in_channels, planes) returns a newly initialised stage ``index`` (0-based)
    whose blocks have ``planes`` planes (``planes * expansion`` output channels).
    """

    stem: nn.Module
    stages: list[nn.Module]
    planes: list[int]
    expansion: int
    make_stage: Callable[[int, int, int], nn.Module]

    @property
    def channels(self) -> list[int]:
        """Output channels of each stage."""
        return [p * self.expansion for p in self.planes]


def global_pool(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C) global average pooling."""
    return F.adaptive_avg_pool2d(maps, 1).flatten(1)


def run_shared_stages(stem: nn.Module, stages: Sequence[nn.Module],
                      x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """stem then each stage in turn: the last map (the branches' input) and every stage's output map
    (what multi-expert fusions and distillation read), for every model built from shared stages."""
    h = stem(x)
    maps = []
    for stage in stages:
        h = stage(h)
        maps.append(h)
    return h, maps


class StagedBackbone(nn.Module):
    """stem -> shared stages -> M branches (each the exclusive stages of one expert) -> optional
    fusion of branch and shared maps -> global average pooling.

    ``forward`` returns the branches' pooled features (M, B, D) and ``intermediate``: the shared
    stages' output maps followed by each branch's final (fused) map, shallow to deep. A single
    network is M = 1 with its last stage as the branch.
    """

    def __init__(self, stem: nn.Module, shared: Sequence[nn.Module], branches: Sequence[nn.Module],
                 fusion: nn.Module | None = None) -> None:
        super().__init__()
        self.stem = stem
        self.shared = nn.ModuleList(shared)
        self.branches = nn.ModuleList(branches)
        self.fusion = fusion

    def shared_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The input of the branches and the output map of every shared stage."""
        return run_shared_stages(self.stem, self.shared, x)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        h, maps = self.shared_maps(x)
        deep = [branch(h) for branch in self.branches]
        if self.fusion is not None:
            deep = self.fusion(deep, maps)
        return torch.stack([global_pool(m) for m in deep]), maps + deep


def expert_head_logits(heads: nn.ModuleList, expert_features: torch.Tensor,
                       aggregate: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each head on its expert's features (M, B, D) -> (aggregated logits (B, C), expert logits (M, B, C))."""
    if expert_features.dim() != 3 or expert_features.shape[0] != len(heads):
        raise ValueError(f"expected expert features of shape (M={len(heads)}, B, D), got "
                         f"{tuple(expert_features.shape)}; a single-head model takes features.unsqueeze(0)")
    expert_logits = torch.stack([head(features) for head, features in zip(heads, expert_features)])
    logits = expert_logits.sum(0) if aggregate == "sum" else expert_logits.mean(0)
    return logits, expert_logits


def parameters_outside(model: nn.Module, part: nn.Module) -> list[nn.Parameter]:
    """``model``'s parameters that are not ``part``'s (the backbone's, when ``part`` is the heads)."""
    inside = {id(p) for p in part.parameters()}
    return [p for p in model.parameters() if id(p) not in inside]


class Classifier(nn.Module):
    """Backbone + one head per expert; ``forward(x) -> ModelOutput``.

    For M > 1 experts, ``logits`` is the mean (SHIKE's and RIDE's code) or the sum of the expert logits,
    ``features`` the experts' features concatenated (B, M*D), and ``expert_logits`` /
    ``expert_features`` are set. For one expert they are None and ``features`` is (B, D).
    """

    def __init__(self, backbone: nn.Module, heads: Sequence[nn.Module], aggregate: str = "sum") -> None:
        super().__init__()
        if aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {aggregate!r}; allowed: {', '.join(AGGREGATES)}")
        self.backbone = backbone
        self.heads = nn.ModuleList(heads)
        self.aggregate = aggregate

    def forward(self, x: torch.Tensor) -> ModelOutput:
        expert_features, intermediate = self.backbone(x)
        logits, expert_logits = self.logits_from_features(expert_features)
        if len(self.heads) == 1:
            return ModelOutput(logits=logits, features=expert_features[0], intermediate=intermediate)
        return ModelOutput(logits=logits, features=torch.cat(list(expert_features), dim=1),
                           expert_logits=expert_logits, expert_features=expert_features,
                           intermediate=intermediate)

    def logits_from_features(self, expert_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (B, C), expert_logits (M, B, C)) from cached features (M, B, D), as ``forward``."""
        return expert_head_logits(self.heads, expert_features, self.aggregate)

    def backbone_parameters(self) -> list[nn.Parameter]:
        """Every parameter not in ``heads`` (what stage 2 freezes)."""
        return parameters_outside(self, self.heads)


def single_model(trunk: Trunk, num_classes: int, head: str, head_scale: float) -> Classifier:
    """A plain network: the trunk's stages in a row, one head on the last stage's pooled features."""
    backbone = StagedBackbone(trunk.stem, trunk.stages[:-1], [trunk.stages[-1]])
    return Classifier(backbone, [make_head(head, trunk.channels[-1], num_classes, head_scale)])


def read_state_file(path: str | Path, unwrap: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A state dict (a dict of tensors) from a local file, read with ``torch.load(weights_only=True)``
    (``.safetensors`` files with safetensors). A checkpoint that wraps it under one of the ``unwrap``
    keys (a library's ``{"state_dict": ...}``) is unwrapped. Nothing is downloaded."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist; model.weights must name a local file "
                                "(this never downloads weights; model.pretrained=true asks timm/open_clip for theirs)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"cannot read {path} as weights with torch.load(weights_only=True): {err}. "
                         "Save weights with torch.save(model.state_dict(), path)") from err
    for key in unwrap:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = f"a dict with keys {sorted(state)[:5]}" if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path} holds {found}, not a state dict (a dict of tensors); save "
                         "model.state_dict() itself, not a checkpoint that wraps it")
    return state


def load_state_strictly(module: nn.Module, state: dict[str, torch.Tensor], source: str,
                        drop_prefixes: tuple[str, ...] = (), hint: str = "the plain network's state dict") -> None:
    """Load ``state`` into ``module``: every key and shape must match (keys starting with
    ``drop_prefixes``, the source network's classifier, are ignored); otherwise ValueError listing the
    first missing, unexpected and reshaped keys. Never a partial load."""
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    own = module.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    reshaped = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}"
                for k in sorted(own.keys() & state.keys()) if state[k].shape != own[k].shape]
    if missing or unexpected or reshaped:
        problems = [f"{name} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                    for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", reshaped))
                    if keys]
        raise ValueError(f"{source} does not fit this architecture; " + "; ".join(problems)
                         + f". Expected keys like {', '.join(list(own)[:3])} ({hint})")
    module.load_state_dict(state)


def load_pretrained(module: nn.Module, path: str | Path, drop_prefixes: tuple[str, ...] = ()) -> None:
    """Load a local state-dict file into ``module`` (strictly: every key and shape must match).

    Keys starting with ``drop_prefixes`` (the source network's classifier) are ignored. Nothing is
    downloaded; the file is read with ``torch.load(weights_only=True)``.
    """
    load_state_strictly(module, read_state_file(path), str(path), drop_prefixes)
