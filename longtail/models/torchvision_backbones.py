"""torchvision's ImageNet ResNets as longtail models: ResNet-50, ResNeXt-50 32x4d and ResNet-152, the
backbones of the seeds' ImageNet-LT, iNaturalist 2018 and Places-LT tables.

Built with ``weights=None`` (nothing is downloaded); ``pretrained_path`` loads a local torchvision
state dict (e.g. ``torch.save(torchvision.models.resnet152(weights=...).state_dict(), path)``), whose
``fc.`` keys are dropped because every model gets its own head.
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial
from typing import Callable

import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck

from longtail.models.classifier import Classifier, Trunk, load_pretrained, single_model
from longtail.registry import MODELS

__all__ = ["ARCHS", "torchvision_init", "torchvision_stage", "torchvision_trunk", "torchvision_resnet"]

ARCHS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet50": torchvision.models.resnet50,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
    "resnet152": torchvision.models.resnet152,
}
PLANES = (64, 128, 256, 512)


def torchvision_init(module: nn.Module) -> None:
    """torchvision ResNet's own init: He-normal (fan_out) convs, BN weight 1 and bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def torchvision_stage(in_channels: int, planes: int, blocks: int, stride: int, groups: int,
                      base_width: int) -> nn.Sequential:
    """A fresh stage of torchvision Bottlenecks, as ``ResNet._make_layer`` builds it (any width, for
    RIDE's reduced-width experts)."""
    out_channels = planes * Bottleneck.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(out_channels))
    layers = [Bottleneck(in_channels, planes, stride, downsample, groups=groups, base_width=base_width)]
    layers += [Bottleneck(out_channels, planes, groups=groups, base_width=base_width) for _ in range(blocks - 1)]
    stage = nn.Sequential(*layers)
    stage.apply(torchvision_init)
    return stage


def torchvision_trunk(arch: str, in_channels: int = 3, pretrained_path: str | None = None) -> Trunk:
    """The stem (conv1, bn1, relu, maxpool) and layer1-4 of a torchvision ResNet, optionally with
    local pretrained weights."""
    if arch not in ARCHS:
        raise ValueError(f"unknown torchvision architecture {arch!r}; allowed: {', '.join(ARCHS)}")
    net = ARCHS[arch](weights=None)
    net.fc = nn.Identity()
    if in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, net.conv1.out_channels, 7, stride=2, padding=3, bias=False)
        torchvision_init(net.conv1)
    if pretrained_path is not None:
        load_pretrained(net, pretrained_path, drop_prefixes=("fc.",))
    stages = [net.layer1, net.layer2, net.layer3, net.layer4]
    blocks = [len(stage) for stage in stages]
    groups, base_width = net.groups, net.base_width

    def make_stage(index: int, stage_in: int, planes: int) -> nn.Module:
        return torchvision_stage(stage_in, planes, blocks[index], 1 if index == 0 else 2, groups, base_width)

    stem = nn.Sequential(OrderedDict(conv1=net.conv1, bn1=net.bn1, relu=net.relu, maxpool=net.maxpool))
    return Trunk(stem=stem, stages=stages, planes=list(PLANES), expansion=Bottleneck.expansion, make_stage=make_stage)


def torchvision_resnet(arch: str, num_classes: int, in_channels: int = 3, head: str = "linear",
                       head_scale: float = 30.0, pretrained_path: str | None = None) -> Classifier:
    """torchvision ``arch`` with a ``linear`` or ``cosine`` head (registered under the arch's name)."""
    return single_model(torchvision_trunk(arch, in_channels, pretrained_path), num_classes, head, head_scale)


for _arch in ARCHS:
    MODELS.register(_arch)(partial(torchvision_resnet, _arch))
