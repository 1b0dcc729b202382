"""ResNets for 32x32 images (He et al. 2016, sec. 4.2): a 3x3 stem and three stages of n
BasicBlocks at 16/32/64 channels, depth 6n + 2 -> ResNet-20/32/44/56 (0.27M/0.46M/0.66M/0.85M
parameters). The seeds' CIFAR-LT backbone.

Shortcuts where the shape changes: option A (parameter-free subsample + zero channel padding, the
paper's CIFAR choice and LDAM-DRW/MiSLAS/RIDE's code) or option B (1x1 conv + BN, SHIKE's and
BBN-style code). Conv and linear weights get He (Kaiming) normal init, as those codes'
``_weights_init``. Layer names follow LDAM-DRW's ``resnet_cifar.py`` (conv1, bn1, layer1-3; blocks
conv1/bn1/conv2/bn2/shortcut), so its state dicts load with ``pretrained_path`` (``linear.``/``fc.``
keys are dropped).
"""
from __future__ import annotations

from collections import OrderedDict
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from longtail.models.classifier import Classifier, Trunk, load_pretrained, single_model
from longtail.registry import MODELS

__all__ = ["SHORTCUTS", "PLANES", "init_weights", "PadShortcut", "BasicBlock", "cifar_stage", "cifar_trunk",
           "cifar_resnet"]

SHORTCUTS = ("A", "B")
PLANES = (16, 32, 64)


def init_weights(module: nn.Module) -> None:
    """He-normal init of conv and linear weights (LDAM-DRW / MiSLAS / SHIKE ``_weights_init``)."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)


class PadShortcut(nn.Module):
    """Option A: subsample by the stride and zero-pad the extra channels evenly on both sides."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        if planes < in_planes or (planes - in_planes) % 2:
            raise ValueError(f"option-A shortcut pads {in_planes} channels evenly to {planes}; that needs an even, "
                             "non-negative difference. Use shortcut: B")
        self.stride, self.pad = stride, (planes - in_planes) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual shortcut (He et al. 2016, Fig. 2 left)."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: str = "A") -> None:
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"unknown shortcut {shortcut!r}; allowed: A (zero padding), B (1x1 conv)")
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        if stride == 1 and in_planes == planes:
            self.shortcut: nn.Module = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def cifar_stage(in_planes: int, planes: int, blocks: int, stride: int, shortcut: str) -> nn.Sequential:
    """One stage of ``blocks`` BasicBlocks, the first with ``stride``; freshly initialised."""
    stage = nn.Sequential(*[BasicBlock(in_planes if i == 0 else planes, planes, stride if i == 0 else 1, shortcut)
                            for i in range(blocks)])
    stage.apply(init_weights)
    return stage


def cifar_trunk(depth: int, in_channels: int = 3, shortcut: str = "A", pretrained_path: str | None = None) -> Trunk:
    """The ResNet-``depth`` stem and its three stages, optionally loaded from an LDAM-DRW-style state dict."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet has depth 6n + 2 (20, 32, 44, 56, 110, ...), got {depth}")
    if shortcut not in SHORTCUTS:
        raise ValueError(f"unknown shortcut {shortcut!r}; allowed: A (zero padding), B (1x1 conv)")
    blocks = (depth - 2) // 6

    def make_stage(index: int, in_planes: int, planes: int) -> nn.Module:
        return cifar_stage(in_planes, planes, blocks, 1 if index == 0 else 2, shortcut)

    net = nn.Sequential(OrderedDict(
        conv1=nn.Conv2d(in_channels, PLANES[0], 3, stride=1, padding=1, bias=False),
        bn1=nn.BatchNorm2d(PLANES[0]),
        relu=nn.ReLU(inplace=True),
        layer1=make_stage(0, PLANES[0], PLANES[0]),
        layer2=make_stage(1, PLANES[0], PLANES[1]),
        layer3=make_stage(2, PLANES[1], PLANES[2]),
    ))
    init_weights(net.conv1)
    if pretrained_path is not None:
        load_pretrained(net, pretrained_path, drop_prefixes=("linear.", "fc."))
    return Trunk(stem=net[:3], stages=[net.layer1, net.layer2, net.layer3], planes=list(PLANES), expansion=1,
                 make_stage=make_stage)


def cifar_resnet(depth: int, num_classes: int, in_channels: int = 3, head: str = "linear", head_scale: float = 30.0,
                 shortcut: str = "A", pretrained_path: str | None = None) -> Classifier:
    """ResNet-``depth`` for small images with a ``linear`` or ``cosine`` head (registered as resnet20/32/44/56).

    ``head_scale`` is the cosine head's scale; ``pretrained_path`` a local state dict of the plain
    network in LDAM-DRW's naming.
    """
    model = single_model(cifar_trunk(depth, in_channels, shortcut, pretrained_path), num_classes, head, head_scale)
    model.heads.apply(init_weights)
    return model


for _depth in (20, 32, 44, 56):
    MODELS.register(f"resnet{_depth}")(partial(cifar_resnet, _depth))
