"""``longtail`` command line with one extra test-only model, for the torchrun tests of test_ddp.py.

``test_plain_mlp`` is the Digits-LT MLP without BatchNorm. BatchNorm normalises each process's half
batch on its own under DDP (no SyncBatchNorm), so only a model without it makes one process and two
processes at the same global batch compute the same gradients, and so the same weights."""
import sys

import torch
from torch import nn

from longtail.cli import main
from longtail.models.classifier import Classifier
from longtail.models.heads import LinearHead
from longtail.registry import MODELS


class PlainBackbone(nn.Module):
    def __init__(self, in_features: int, width: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Flatten(), nn.Linear(in_features, width), nn.ReLU())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.layers(x).unsqueeze(0), None


@MODELS.register("test_plain_mlp")
def plain_mlp(num_classes: int, in_channels: int = 1, image_size: int = 8, width: int = 32) -> Classifier:
    return Classifier(PlainBackbone(in_channels * image_size * image_size, width), [LinearHead(width, num_classes)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
