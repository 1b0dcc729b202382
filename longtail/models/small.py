"""Tiny models for the offline Digits-LT example (8x8 grey images) and quick experiments: they
train in seconds on a CPU and have the same interface as the big ones.

``pretrained_path`` takes a state dict of the model's backbone (``model.backbone.state_dict()``).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from longtail.models.classifier import Classifier, StagedBackbone, load_pretrained
from longtail.models.heads import make_head
from longtail.registry import MODELS

__all__ = ["MLPBackbone", "mlp", "small_cnn"]


class MLPBackbone(nn.Module):
    """Flattened pixels -> (Linear, BatchNorm, ReLU) per hidden width; one feature vector (1, B, D)."""

    def __init__(self, in_features: int, hidden: Sequence[int]) -> None:
        super().__init__()
        if not hidden or any(width < 1 for width in hidden):
            raise ValueError(f"hidden must list at least one positive layer width, got {list(hidden)}")
        layers: list[nn.Module] = [nn.Flatten()]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
            in_features = width
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.layers(x).unsqueeze(0), None


@MODELS.register("mlp")
def mlp(num_classes: int, in_channels: int = 3, image_size: int = 32, hidden: Sequence[int] = (128, 128),
        head: str = "linear", head_scale: float = 30.0, pretrained_path: str | None = None) -> Classifier:
    """A multilayer perceptron on the flattened image (the Digits-LT default)."""
    backbone = MLPBackbone(in_channels * image_size * image_size, hidden)
    if pretrained_path is not None:
        load_pretrained(backbone, pretrained_path)
    return Classifier(backbone, [make_head(head, hidden[-1], num_classes, head_scale)])


def _conv_bn_relu(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


@MODELS.register("small_cnn")
def small_cnn(num_classes: int, in_channels: int = 3, width: int = 32, head: str = "linear",
              head_scale: float = 30.0, pretrained_path: str | None = None) -> Classifier:
    """Three 3x3 conv-BN-ReLU layers (``width``, 2x, 4x channels; the last two stride 2) and global
    pooling: 8x8 -> 2x2 maps, 4 * ``width`` features."""
    if width < 1:
        raise ValueError(f"width must be positive, got {width}")
    backbone = StagedBackbone(_conv_bn_relu(in_channels, width, 1), [_conv_bn_relu(width, 2 * width, 2)],
                              [_conv_bn_relu(2 * width, 4 * width, 2)])
    if pretrained_path is not None:
        load_pretrained(backbone, pretrained_path)
    return Classifier(backbone, [make_head(head, 4 * width, num_classes, head_scale)])
