"""RandomResizedCrop for in-memory images, batched (data/augment.py): LIFT's CIFAR pipeline crops the
32 x 32 images and resizes the crops to 224. Checked on synthetic images whose pixels encode their own
coordinates, against torchvision's draws and its ``resized_crop``."""
import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from scipy import stats
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import InterpolationMode

from longtail.config import AugmentConfig
from longtail.data.augment import BatchAugment, resized_crops, sample_resized_crop_boxes

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def coordinate_images(n: int, size: int = 32) -> torch.Tensor:
    """uint8 (n, 3, size, size): channel 0 is 8 x row, channel 1 is 8 x column, channel 2 the image index."""
    rows = torch.arange(size).view(size, 1).expand(size, size) * 8
    cols = torch.arange(size).view(1, size).expand(size, size) * 8
    image = torch.stack([rows, cols, torch.zeros_like(rows)])
    images = image.expand(n, 3, size, size).clone()
    images[:, 2] = torch.arange(n).view(n, 1, 1)
    return images.to(torch.uint8)


def make(**options) -> BatchAugment:
    return BatchAugment(AugmentConfig(**{"crop_padding": 0, **options}), MEAN, STD)


def test_shapes_sizes_and_dtype():
    images, targets = coordinate_images(8), torch.arange(8)
    out, _, _, _ = make(random_resized_crop=True, random_resized_crop_size=56, flip=True)(images, targets, seeded(0), 0)
    assert out.shape == (8, 3, 56, 56) and out.dtype == torch.float32
    out, _, _, _ = make(random_resized_crop=True)(images, targets, seeded(0), 0)
    assert out.shape == (8, 3, 32, 32)
    params = make(random_resized_crop=True, random_resized_crop_size=56, cutout=8).sample_params(images.shape,
                                                                                                 seeded(0), 0)
    assert params.cutout_y.max() < 56 and params.rrc_box.shape == (8, 4)  # Cutout on the resized crop
    pixels = make(random_resized_crop=True, random_resized_crop_size=56).augment_pixels(
        images, make(random_resized_crop=True, random_resized_crop_size=56).sample_params(images.shape, seeded(0), 0))
    assert pixels.dtype == torch.uint8 and pixels.shape == (8, 3, 56, 56)


def test_boxes_respect_scale_and_ratio_and_follow_torchvisions_distribution():
    boxes = sample_resized_crop_boxes(4000, 32, 32, seeded(1))
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 32).all()
    assert (h > 0).all() and (w > 0).all()
    area = (h * w).float() / (32 * 32)
    ratio = w.float() / h.float()
    # the drawn area fraction and ratio are in range before rounding; rounding moves a side by <= 0.5 px
    side = torch.minimum(h, w).float()
    slack = 1 + 0.5 / side
    assert (area <= 1).all() and (area >= 0.08 / slack**2).all()
    assert (ratio >= 3 / 4 / slack**2).all() and (ratio <= 4 / 3 * slack**2).all()
    torch.manual_seed(1)
    reference = torch.tensor([RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [0.08, 1.0], [3 / 4, 4 / 3])
                              for _ in range(4000)])
    ref_area = (reference[:, 2] * reference[:, 3]).float() / 1024
    assert stats.ks_2samp(area.numpy(), ref_area.numpy()).pvalue > 1e-3
    assert stats.ks_2samp(top.numpy(), reference[:, 0].numpy()).pvalue > 1e-3
    assert stats.ks_2samp(ratio.numpy(), (reference[:, 3] / reference[:, 2]).numpy()).pvalue > 1e-3


def test_fallback_is_torchvisions_centre_crop():
    boxes = sample_resized_crop_boxes(5, 32, 32, seeded(0), scale=(1.0, 1.0), ratio=(2.0, 3.0))
    expected = RandomResizedCrop.get_params(torch.zeros(3, 32, 32), [1.0, 1.0], [2.0, 3.0])
    assert all(tuple(box.tolist()) == tuple(expected) for box in boxes)


def test_crops_cut_the_drawn_window_of_a_known_pattern_and_equal_torchvisions_resized_crop():
    images = coordinate_images(16)
    boxes = sample_resized_crop_boxes(16, 32, 32, seeded(2))
    for size in (32, 224):
        out = resized_crops(images.float(), boxes, size)
        for i, (top, left, h, w) in enumerate(boxes.tolist()):
            rows, cols = out[i, 0] / 8, out[i, 1] / 8
            # the pattern gives back the window: first row/column exactly, the last within one pixel
            assert rows.min().item() == pytest.approx(top, abs=1e-4) and rows.max() <= top + h - 1 + 1e-4
            assert cols.min().item() == pytest.approx(left, abs=1e-4) and cols.max() <= left + w - 1 + 1e-4
            assert rows.max() >= top + h - 2 and cols.max() >= left + w - 2
            assert torch.allclose(out[i, 2], torch.full_like(out[i, 2], i), atol=1e-4)  # its own pixels only
            reference = TF.resized_crop(images[i].float(), top, left, h, w, [size, size],
                                        interpolation=InterpolationMode.BILINEAR, antialias=False)
            torch.testing.assert_close(out[i], reference, atol=1e-3, rtol=0)


def test_deterministic_under_a_seed():
    images, targets = coordinate_images(16), torch.arange(16)
    augment = make(random_resized_crop=True, random_resized_crop_size=64, flip=True)
    first = augment(images, targets, seeded(5), 0)[0]
    again = augment(images, targets, seeded(5), 0)[0]
    other = augment(images, targets, seeded(6), 0)[0]
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_configuration_and_file_sets():
    with pytest.raises(ValueError, match="crop_padding"):
        BatchAugment(AugmentConfig(crop_padding=4, random_resized_crop=True), MEAN, STD)
    augment = make(random_resized_crop=True, flip=True)
    plain = augment.without_resized_crop()  # what a file set's loader uses: the decoder crops
    assert not plain.cfg.random_resized_crop and plain.cfg.flip and augment.cfg.random_resized_crop
    assert make(flip=True).without_resized_crop().cfg.flip
    assert math.isclose(plain.mean[0].item(), 0.5)
