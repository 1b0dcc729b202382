"""Test-time ensembling (``eval.tta``): a model's logits averaged over several views of each image,
as LIFT evaluates (shijxcs/LIFT ``trainer.py``: ``Resize(224 + 24)`` then ``FiveCrop(224)``, logits
averaged). Works on batches of normalised images, so it wraps any model."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from longtail.types import ModelOutput

__all__ = ["TTA_MODES", "tta_views", "TestTimeEnsemble"]

TTA_MODES = ("none", "flip", "five_crop", "ten_crop")


def tta_views(images: torch.Tensor, mode: str, resize: float = 248 / 224) -> list[torch.Tensor]:
    """The views of a batch (B, C, H, W), each (B, C, H, W): ``flip``: the images and their mirror
    images; ``five_crop``: the images enlarged by ``resize`` (bilinear), then the four corner crops
    and the centre crop of the original size (torchvision's FiveCrop); ``ten_crop``: those and their
    mirrors."""
    if mode == "none":
        return [images]
    if mode == "flip":
        return [images, images.flip(-1)]
    if mode not in TTA_MODES:
        raise ValueError(f"unknown eval.tta {mode!r}; allowed: {', '.join(TTA_MODES)}")
    height, width = images.shape[-2:]
    big = F.interpolate(images, size=(round(height * resize), round(width * resize)), mode="bilinear",
                        align_corners=False)
    big_h, big_w = big.shape[-2:]
    top, left = int(round((big_h - height) / 2.0)), int(round((big_w - width) / 2.0))
    corners = [(0, 0), (0, big_w - width), (big_h - height, 0), (big_h - height, big_w - width), (top, left)]
    crops = [big[..., y:y + height, x:x + width] for y, x in corners]
    return crops + [crop.flip(-1) for crop in crops] if mode == "ten_crop" else crops


class TestTimeEnsemble(nn.Module):
    """``model`` evaluated on every view of the batch; logits, features and expert logits averaged."""

    def __init__(self, model: nn.Module, mode: str, resize: float = 248 / 224) -> None:
        super().__init__()
        self.model, self.mode, self.resize = model, mode, resize

    def forward(self, images: torch.Tensor) -> ModelOutput:
        outputs = [self.model(view) for view in tta_views(images, self.mode, self.resize)]
        expert = [o.expert_logits for o in outputs if o.expert_logits is not None]
        return ModelOutput(logits=torch.stack([o.logits for o in outputs]).mean(0),
                           features=torch.stack([o.features for o in outputs]).mean(0),
                           expert_logits=torch.stack(expert).mean(0) if expert else None)
