"""Multi-expert models: shared early stages, M experts that each own a fresh copy of the last
stage(s) and a head; the model's logits are the sum or mean of the expert logits.

- SHIKE (Jin et al., CVPR 2023, Sec. 3.1-3.2; code jinyan-06/SHIKE ``networks.py``): only
  the last stage is exclusive, and Depth-wise Knowledge Fusion (eq. 3) multiplies each expert's
  deep map by an aligned intermediate map of the shared stages; cosine heads with scale 30; the
  logits are summed.
- RIDE (Wang et al., ICLR 2021; code frank-xwang/RIDE-LongTailRecognition):
  plain experts, optionally at 3/4 width (``reduce_dimension``), cosine heads with scale 30, the
  logits averaged. Its code shares only stage 1 of the CIFAR ResNet-32 (stages 2-3 per expert) and
  layers 1-2 of ResNet-50 (layers 3-4 per expert); those are our defaults. The router is not built.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from longtail.models.cifar_resnet import cifar_trunk, init_weights
from longtail.models.classifier import Classifier, StagedBackbone, Trunk
from longtail.models.heads import make_head
from longtail.models.torchvision_backbones import torchvision_trunk
from longtail.registry import MODELS

__all__ = ["DepthwiseKnowledgeFusion", "dkf_alignment", "shike_sources", "multi_expert",
           "shike_resnet32", "ride_resnet32", "shike_resnet50", "ride_resnet50"]

RIDE_WIDTH = 0.75  # RIDE's reduce_dimension: 32/64 -> 24/48 planes (CIFAR), 256/512 -> 192/384 (ResNet-50)


def dkf_alignment(channels: Sequence[int]) -> nn.Sequential:
    """Stride-2 3x3 conv + BN steps through ``channels`` (one per stage between the source map
    and the expert's output), aligning a shallow map to the expert's deep map. As the authors'
    ``ShallowExpert`` (``use_relu = k != 1``) every step but the second ends in a ReLU, and the
    convs keep PyTorch's default init (the authors build them after their He init)."""
    steps = []
    for k, (c_in, c_out) in enumerate(zip(channels[:-1], channels[1:])):
        step = [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out)]
        if k != 1:
            step.append(nn.ReLU(inplace=True))
        steps.append(nn.Sequential(*step))
    return nn.Sequential(*steps)


class DepthwiseKnowledgeFusion(nn.Module):
    """SHIKE's DKF (Jin et al. 2023, eq. 3): expert m's deep map f^m_{S+1} is fused with the map f_s of the
    shared stage assigned to it, aligned to the same shape: ``align_m(f_s) * f^m_{S+1}`` (Hadamard
    product), which the model then pools and classifies, ``z^m = phi^m(f_hat_s (x) f^m_{S+1})``.

    sources: for each expert, the 1-based index of its shared stage.
    channel_paths: for each expert, the channels from that stage's output to the expert's output.
    """

    def __init__(self, sources: Sequence[int], channel_paths: Sequence[Sequence[int]]) -> None:
        super().__init__()
        self.sources = list(sources)
        self.alignments = nn.ModuleList([dkf_alignment(path) for path in channel_paths])

    def align(self, shared_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each expert's shared-stage map after alignment (the shape of the expert's deep map)."""
        return [align(shared_maps[source - 1]) for align, source in zip(self.alignments, self.sources)]

    def forward(self, expert_maps: Sequence[torch.Tensor], shared_maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return [deep * aligned for deep, aligned in zip(expert_maps, self.align(shared_maps))]


def shike_sources(dkf: bool, dkf_sources: Sequence[int] | None, num_experts: int, shared_stages: int) -> list[int] | None:
    """Which shared stage each expert fuses: ``dkf_sources`` if given, else the authors' rule
    (expert m takes stage ``m mod S + 1``: [1, 2, 1] for three experts on ResNet-32's two shared
    stages, [1, 2, 3] on ResNet-50's three); None when DKF is off (the plain-MoE ablation)."""
    if not dkf:
        if dkf_sources is not None:
            raise ValueError("dkf_sources is set but dkf is false; drop dkf_sources or set dkf: true")
        return None
    if dkf_sources is None:
        return [m % shared_stages + 1 for m in range(num_experts)]
    return list(dkf_sources)


def _expert_branch(trunk: Trunk, shared_stages: int, planes: Sequence[int], copy_trunk_weights: bool) -> nn.Sequential:
    stages, in_channels = [], trunk.channels[shared_stages - 1]
    for index, width in zip(range(shared_stages, len(trunk.stages)), planes):
        stage = trunk.make_stage(index, in_channels, width)
        if copy_trunk_weights:
            stage.load_state_dict(trunk.stages[index].state_dict())
        stages.append(stage)
        in_channels = width * trunk.expansion
    return nn.Sequential(*stages)


def multi_expert(trunk: Trunk, num_classes: int, num_experts: int, shared_stages: int, width_factor: float = 1.0,
                 dkf_sources: Sequence[int] | None = None, head: str = "cosine", head_scale: float = 30.0,
                 aggregate: str = "sum", copy_trunk_weights: bool = False) -> Classifier:
    """Shared stem + ``shared_stages`` stages of ``trunk``; each of ``num_experts`` experts gets
    fresh copies of the remaining stages (``width_factor`` x planes), optional DKF and its head.

    copy_trunk_weights: start every expert from the trunk's (pretrained) last stages.
    """
    total = len(trunk.stages)
    if not 1 <= shared_stages < total:
        raise ValueError(f"shared_stages must be 1 to {total - 1} (the network has {total} stages), got {shared_stages}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be at least 1, got {num_experts}")
    planes = [round(p * width_factor) for p in trunk.planes[shared_stages:]]
    if copy_trunk_weights and planes != trunk.planes[shared_stages:]:
        raise ValueError("pretrained weights cannot initialise reduced-width experts; set reduce_width: false "
                         "or drop model.pretrained_path")
    branches = [_expert_branch(trunk, shared_stages, planes, copy_trunk_weights) for _ in range(num_experts)]
    feature_dim = planes[-1] * trunk.expansion
    fusion = None
    if dkf_sources is not None:
        if len(dkf_sources) != num_experts or not all(1 <= s <= shared_stages for s in dkf_sources):
            raise ValueError(f"dkf_sources needs one shared stage (1 to {shared_stages}) per expert "
                             f"({num_experts}), got {list(dkf_sources)}")
        paths = [trunk.channels[s - 1:total - 1] + [feature_dim] for s in dkf_sources]
        fusion = DepthwiseKnowledgeFusion(dkf_sources, paths)
    backbone = StagedBackbone(trunk.stem, trunk.stages[:shared_stages], branches, fusion)
    heads = [make_head(head, feature_dim, num_classes, head_scale) for _ in range(num_experts)]
    return Classifier(backbone, heads, aggregate)


@MODELS.register("shike_resnet32")
def shike_resnet32(num_classes: int, in_channels: int = 3, num_experts: int = 3, dkf: bool = True,
                   dkf_sources: list[int] | None = None, head: str = "cosine", head_scale: float = 30.0,
                   aggregate: str = "mean", shortcut: str = "B", pretrained_path: str | None = None) -> Classifier:
    """SHIKE's CIFAR model: ResNet-32 stages 1-2 shared, one stage 3 per expert, DKF from stage 1
    (experts 0 and 2, two alignment convs) and stage 2 (expert 1, one conv). The authors' code uses
    option-B shortcuts, hence the default. ``dkf: false`` is the paper's plain-MoE ablation. The
    output is the mean of the expert logits, as the authors' code (jinyan-06/SHIKE ``cifarTrain.py``:
    ``sum(outputs) / len(outputs)``); ``aggregate: sum`` is the paper's "summed" (M times the scale)."""
    trunk = cifar_trunk(32, in_channels, shortcut, pretrained_path)
    model = multi_expert(trunk, num_classes, num_experts, shared_stages=2,
                         dkf_sources=shike_sources(dkf, dkf_sources, num_experts, 2), head=head,
                         head_scale=head_scale, aggregate=aggregate, copy_trunk_weights=pretrained_path is not None)
    model.heads.apply(init_weights)
    return model


@MODELS.register("ride_resnet32")
def ride_resnet32(num_classes: int, in_channels: int = 3, num_experts: int = 3, shared_stages: int = 1,
                  reduce_width: bool = True, head: str = "cosine", head_scale: float = 30.0, aggregate: str = "mean",
                  shortcut: str = "A", pretrained_path: str | None = None) -> Classifier:
    """RIDE's CIFAR model (its ``cifar100_lt_ride`` config): stage 1 shared, stages 2-3 per expert at
    3/4 width (24/48 planes), cosine heads, mean of the expert logits."""
    trunk = cifar_trunk(32, in_channels, shortcut, pretrained_path)
    model = multi_expert(trunk, num_classes, num_experts, shared_stages, RIDE_WIDTH if reduce_width else 1.0,
                         head=head, head_scale=head_scale, aggregate=aggregate,
                         copy_trunk_weights=pretrained_path is not None)
    model.heads.apply(init_weights)
    return model


@MODELS.register("shike_resnet50")
def shike_resnet50(num_classes: int, in_channels: int = 3, num_experts: int = 3, dkf: bool = True,
                   dkf_sources: list[int] | None = None, head: str = "cosine", head_scale: float = 30.0,
                   aggregate: str = "mean", pretrained_path: str | None = None) -> Classifier:
    """SHIKE on torchvision ResNet-50: layers 1-3 shared, one layer 4 per expert, experts fusing
    layer 1, 2 and 3 outputs (the paper's "shallow to deep" assignment on ImageNet-LT). With
    ``pretrained_path`` every expert starts from the pretrained layer 4."""
    trunk = torchvision_trunk("resnet50", in_channels, pretrained_path)
    return multi_expert(trunk, num_classes, num_experts, shared_stages=3,
                        dkf_sources=shike_sources(dkf, dkf_sources, num_experts, 3), head=head,
                        head_scale=head_scale, aggregate=aggregate, copy_trunk_weights=pretrained_path is not None)


@MODELS.register("ride_resnet50")
def ride_resnet50(num_classes: int, in_channels: int = 3, num_experts: int = 3, shared_stages: int = 2,
                  reduce_width: bool = True, head: str = "cosine", head_scale: float = 30.0, aggregate: str = "mean",
                  pretrained_path: str | None = None) -> Classifier:
    """RIDE on torchvision ResNet-50: layers 1-2 shared, layers 3-4 per expert at 3/4 width
    (192/384 planes), cosine heads, mean of the expert logits."""
    trunk = torchvision_trunk("resnet50", in_channels, pretrained_path)
    return multi_expert(trunk, num_classes, num_experts, shared_stages, RIDE_WIDTH if reduce_width else 1.0,
                        head=head, head_scale=head_scale, aggregate=aggregate,
                        copy_trunk_weights=pretrained_path is not None)
