"""Batched augmentation on real CIFAR-10 images (the JPEG re-encoded copy found by the ``shared_data``
fixture: $LONGTAIL_SHARED_DATA, default ../shared/data)."""
from __future__ import annotations

import io
import math
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as F
from PIL import Image
from scipy import stats
from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy, InterpolationMode, RandAugment

from longtail.config import AugmentConfig
from longtail.data.augment import AugmentParams, BatchAugment
from longtail.functional import remix_label_weight

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)


@pytest.fixture(scope="module")
def cifar(shared_data) -> torch.Tensor:
    """The first 32 training images of the archive, (32, 3, 32, 32) uint8."""
    images = []
    with tarfile.open(shared_data / "cifar10_jpg.tar.gz") as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                data = archive.extractfile(member).read()
                images.append(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
            if len(images) == 32:
                break
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def make(counts: list[int] | None = None, **options) -> BatchAugment:
    return BatchAugment(AugmentConfig(**options), MEAN, STD, class_counts=counts)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def labels(n: int) -> torch.Tensor:
    return torch.arange(n) % 10


# An independent per-image AutoAugment/RandAugment: public torchvision.transforms.v2.functional ops
# and the magnitude ranges of Cubuk et al., bins spread linearly from 0 to the maximum (in float32,
# as torchvision's tables, so the factors round identically).
MAXIMA = {"ShearX": 0.3, "ShearY": 0.3, "Rotate": 30.0, "Brightness": 0.9, "Color": 0.9,
          "Contrast": 0.9, "Sharpness": 0.9}
SIGNED = set(MAXIMA) | {"TranslateX", "TranslateY"}


def reference_magnitude(name: str, magnitude_bin: int | None, bins: int, size: int, negative: bool) -> float:
    if magnitude_bin is None or name in ("AutoContrast", "Equalize", "Invert", "Identity"):
        return 0.0
    if name == "Posterize":
        return round(8 - 4 * magnitude_bin / (bins - 1))
    if name == "Solarize":  # threshold from 1 (nothing) down to 0 (everything), as a fraction of 255
        return float(torch.linspace(1.0, 0.0, bins)[magnitude_bin])
    maximum = 150.0 / 331.0 * size if name.startswith("Translate") else MAXIMA[name]
    value = float(torch.linspace(0.0, maximum, bins)[magnitude_bin])
    return -value if negative and name in SIGNED else value


def reference_op(image: torch.Tensor, name: str, m: float, fill: int = 0) -> torch.Tensor:
    nearest = InterpolationMode.NEAREST
    if name == "Identity":
        return image
    if name in ("ShearX", "ShearY"):
        shear = [math.degrees(math.atan(m)), 0.0] if name == "ShearX" else [0.0, math.degrees(math.atan(m))]
        return F.affine(image, angle=0.0, translate=[0, 0], scale=1.0, shear=shear, interpolation=nearest,
                        center=[0, 0], fill=fill)
    if name in ("TranslateX", "TranslateY"):
        move = [int(m), 0] if name == "TranslateX" else [0, int(m)]
        return F.affine(image, angle=0.0, translate=move, scale=1.0, shear=[0.0, 0.0], interpolation=nearest,
                        fill=fill)
    if name == "Rotate":
        return F.rotate(image, angle=m, interpolation=nearest, fill=fill)
    colour = {"Brightness": F.adjust_brightness, "Color": F.adjust_saturation,
              "Contrast": F.adjust_contrast, "Sharpness": F.adjust_sharpness}
    if name in colour:
        return colour[name](image, 1.0 + m)
    if name == "Posterize":
        return F.posterize(image, int(m))
    if name == "Solarize":
        return F.solarize(image, 255.0 * m)
    return {"AutoContrast": F.autocontrast, "Equalize": F.equalize, "Invert": F.invert}[name](image)


def test_shapes_and_dtypes(cifar):
    augment = make(autoaugment="cifar10", cutout=16, mixup_alpha=1.0)
    images, targets, mix_targets, mix_weight = augment(cifar, labels(32), seeded(0), epoch=0)
    assert images.shape == cifar.shape and images.dtype == torch.float32
    assert targets.dtype == torch.int64 and torch.equal(targets, labels(32))
    assert mix_targets.shape == (32,) and mix_targets.dtype == torch.int64
    assert mix_weight.shape == (32,) and mix_weight.dtype == torch.float32
    _, _, none_targets, none_weight = make()(cifar, labels(32), seeded(0), epoch=0)
    assert none_targets is None and none_weight is None


def test_same_seed_same_batch_other_seed_other_batch(cifar):
    augment = make(autoaugment="cifar10", cutout=16, mixup_alpha=1.0)
    first = augment(cifar, labels(32), seeded(3), epoch=0)
    again = augment(cifar, labels(32), seeded(3), epoch=0)
    other = augment(cifar, labels(32), seeded(4), epoch=0)
    for a, b in zip(first, again):
        assert torch.equal(a, b)
    assert not torch.equal(first[0], other[0])


def test_each_image_draws_its_own_transform(cifar):
    copies = cifar[:1].expand(64, -1, -1, -1).contiguous()
    augment = make(crop_padding=4, flip=True, autoaugment="cifar10")
    params = augment.sample_params(copies.shape, seeded(0), epoch=0)
    out = augment.augment_pixels(copies, params)
    distinct = {tuple(image.flatten().tolist()) for image in out}
    assert len(distinct) > 40  # a transform shared by the batch gives 1
    assert len(set(params.crop_top.tolist())) > 4 and len(set(params.crop_left.tolist())) > 4
    assert 0 < int(params.flip.sum()) < 64
    assert len(set(params.policy_choice[:, 0].tolist())) > 10


def test_crop_is_each_images_own_padded_window(cifar):
    augment = make(crop_padding=4, flip=False)
    params = augment.sample_params(cifar.shape, seeded(1), epoch=0)
    out = augment.augment_pixels(cifar, params)
    for i in range(len(cifar)):
        top, left = int(params.crop_top[i]), int(params.crop_left[i])
        assert 0 <= top <= 8 and 0 <= left <= 8
        # torchvision's crop pads with zeros where the window leaves the image
        expected = F.crop(cifar[i], top - 4, left - 4, 32, 32)
        assert torch.equal(out[i], expected), f"image {i}, offsets ({top}, {left})"


def test_flip_mirrors_exactly_the_drawn_images(cifar):
    augment = make(crop_padding=0, flip=True)
    params = augment.sample_params(cifar.shape, seeded(2), epoch=0)
    out = augment.augment_pixels(cifar, params)
    for i in range(len(cifar)):
        expected = F.horizontal_flip(cifar[i]) if params.flip[i] else cifar[i]
        assert torch.equal(out[i], expected)


def test_rotation_is_each_images_own_torchvision_rotation(cifar):
    """RIDE's and SADE's crop, flip, RandomRotation(15): each image rotated by its own drawn angle
    exactly as torchvision's rotate (nearest, black corners) after its own crop and flip."""
    augment = make(crop_padding=4, flip=True, rotation=15.0)
    params = augment.sample_params(cifar.shape, seeded(5), epoch=0)
    out = augment.augment_pixels(cifar, params)
    angles = params.rotation
    assert angles.shape == (32,) and float(angles.abs().max()) <= 15.0
    assert float(angles.min()) < -5.0 and float(angles.max()) > 5.0 and len(set(angles.tolist())) == 32
    for i in range(len(cifar)):
        cropped = F.crop(cifar[i], int(params.crop_top[i]) - 4, int(params.crop_left[i]) - 4, 32, 32)
        flipped = F.horizontal_flip(cropped) if params.flip[i] else cropped
        expected = F.rotate(flipped, float(angles[i]), interpolation=InterpolationMode.NEAREST)
        assert torch.equal(out[i], expected), f"image {i}, angle {float(angles[i]):.2f}"
    assert not torch.equal(out, augment.augment_pixels(cifar, replace(params, rotation=None)))


@pytest.mark.parametrize("shape", [(3, 32, 32), (3, 20, 36), (1, 28, 28)])
def test_rotate_equals_torchvision_at_the_edges_of_the_range(shape):
    """Square and non-square images, the angles 0, +-15, +-90 (torchvision's fast paths) and 37.5."""
    from longtail.data.augment import rotate
    images = torch.randint(0, 256, (7, *shape), generator=seeded(0), dtype=torch.uint8)
    angles = torch.tensor([0.0, 15.0, -15.0, 90.0, -90.0, 37.5, 180.0])
    out = rotate(images, angles)
    for image, angle, result in zip(images, angles, out):
        assert torch.equal(result, F.rotate(image, float(angle), interpolation=InterpolationMode.NEAREST)), float(angle)


@pytest.mark.parametrize("policy, fill", [("cifar10", 128), ("imagenet", 128), ("cifar10", 0)])
def test_autoaugment_equals_per_image_reference(cifar, policy, fill):
    """fill 128 is the default (the seeds' CIFAR10Policy(fillcolor=(128, 128, 128))); 0 is torchvision's."""
    augment = make(crop_padding=0, flip=False, autoaugment=policy, **({} if fill == 128 else {"autoaugment_fill": fill}))
    sub_policies = AutoAugment(AutoAugmentPolicy.CIFAR10 if policy == "cifar10" else AutoAugmentPolicy.IMAGENET)._policies
    assert len(sub_policies) == 25
    params = augment.sample_params(cifar.shape, seeded(5), epoch=0)
    out = augment.augment_pixels(cifar, params)
    assert torch.equal(params.policy_choice[:, 0], params.policy_choice[:, 1])  # one sub-policy per image
    for i in range(len(cifar)):
        image = cifar[i]
        for step, (name, _, magnitude_bin) in enumerate(sub_policies[int(params.policy_choice[i, 0])]):
            if params.policy_applied[i, step]:
                m = reference_magnitude(name, magnitude_bin, 10, 32, bool(params.policy_negative[i, step]))
                image = reference_op(image, name, m, fill)
        assert torch.equal(out[i], image), f"image {i}"


def test_autoaugment_probabilities_follow_the_policy():
    augment = make(crop_padding=0, flip=False, autoaugment="cifar10")
    params = augment.sample_params((4000, 3, 32, 32), seeded(6), epoch=0)
    # sub-policy 0 is (Invert, 0.1), (Contrast, 0.2); sub-policy 14's second op (Invert, 0.0) never runs
    first = params.policy_choice[:, 0] == 0
    assert abs(params.policy_applied[first, 0].float().mean().item() - 0.1) < 0.06
    assert abs(params.policy_applied[first, 1].float().mean().item() - 0.2) < 0.08
    assert not params.policy_applied[params.policy_choice[:, 0] == 14, 1].any()


def test_randaugment_equals_per_image_reference(cifar):
    augment = make(crop_padding=0, flip=False, randaugment=True, randaugment_ops=2, randaugment_magnitude=9)
    names = list(RandAugment._AUGMENTATION_SPACE)
    params = augment.sample_params(cifar.shape, seeded(7), epoch=0)
    out = augment.augment_pixels(cifar, params)
    assert params.policy_applied.all()
    assert not torch.equal(params.policy_choice[:, 0], params.policy_choice[:, 1])  # ops drawn per step
    for i in range(len(cifar)):
        image = cifar[i]
        for step in range(2):
            name = names[int(params.policy_choice[i, step])]
            image = reference_op(image, name, reference_magnitude(name, 9, 31, 32, bool(params.policy_negative[i, step])))
        assert torch.equal(out[i], image), f"image {i}"


def test_autoaugment_changes_pixels_and_keeps_uint8_range(cifar):
    augment = make(crop_padding=0, flip=False, autoaugment="cifar10")
    params = augment.sample_params(cifar.shape, seeded(8), epoch=0)
    out = augment.augment_pixels(cifar, params)
    assert out.dtype == torch.uint8 and out.shape == cifar.shape
    changed = (out != cifar).flatten(1).any(1)
    assert changed.sum() >= 16
    assert not changed[~params.policy_applied.any(1)].any()
    normalised = augment.normalize(out)
    low = (0 - torch.tensor(MEAN)) / torch.tensor(STD)
    high = (1 - torch.tensor(MEAN)) / torch.tensor(STD)
    assert (normalised >= low.view(1, 3, 1, 1) - 1e-5).all() and (normalised <= high.view(1, 3, 1, 1) + 1e-5).all()


def test_cutout_mean_fill_zeroes_a_clipped_square_of_the_normalised_image(cifar):
    augment = make(crop_padding=0, flip=False, cutout=16, cutout_fill="mean")
    params = AugmentParams(cutout_y=torch.tensor([16, 0, 31]), cutout_x=torch.tensor([16, 0, 5]))
    out, *_ = augment.apply(cifar[:3], labels(3), params)
    reference = augment.normalize(cifar[:3])
    # hand-computed hole areas: 16 x 16 inside, 8 x 8 at a corner, 9 rows (23..31) x 13 columns (0..12)
    hole = (out == 0).all(1)
    assert hole.sum((1, 2)).tolist() == [256, 64, 117]
    assert hole[0, 8:24, 8:24].all() and hole[1, :8, :8].all() and hole[2, 23:, :13].all()
    assert torch.equal(out.masked_fill(hole[:, None], 1.0), reference.masked_fill(hole[:, None], 1.0))


def test_cutout_black_fill_is_the_default_and_blackens_before_normalising(cifar):
    """SHIKE's and BALMS's code: ToTensor, Cutout, Normalize: the hole is pixel 0, i.e. -mean/std after."""
    augment = make(crop_padding=0, flip=False, cutout=16)
    params = AugmentParams(cutout_y=torch.tensor([16, 0, 31]), cutout_x=torch.tensor([16, 0, 5]))
    out, *_ = augment.apply(cifar[:3], labels(3), params)
    black = (-torch.tensor(MEAN) / torch.tensor(STD)).view(1, 3, 1, 1)
    hole = torch.isclose(out, black.expand_as(out), atol=1e-6).all(1)
    assert hole.sum((1, 2)).tolist() == [256, 64, 117]
    reference = augment.normalize(cifar[:3])
    assert torch.equal(out.masked_fill(hole[:, None], 1.0), reference.masked_fill(hole[:, None], 1.0))


def test_mixup_is_convex_combination_with_partner(cifar):
    augment = make(autoaugment="cifar10", cutout=16, mixup_alpha=1.0)
    params = augment.sample_params(cifar.shape, seeded(9), epoch=0)
    targets = labels(32)
    mixed, out_targets, mix_targets, mix_weight = augment.apply(cifar, targets, params)
    plain, *_ = augment.apply(cifar, targets, replace(params, mix_lam=None, mix_perm=None))
    lam, perm = params.mix_lam, params.mix_perm
    assert 0.0 <= lam <= 1.0 and sorted(perm.tolist()) == list(range(32))
    torch.testing.assert_close(mixed, lam * plain + (1 - lam) * plain[perm])
    assert torch.equal(out_targets, targets) and torch.equal(mix_targets, targets[perm])
    torch.testing.assert_close(mix_weight, torch.full((32,), lam))


def test_mixup_lambda_is_beta_distributed_once_per_batch():
    augment = make(crop_padding=0, flip=False, mixup_alpha=0.4)
    generator = seeded(10)
    draws = [augment.sample_params((2, 3, 4, 4), generator, epoch=0).mix_lam for _ in range(1000)]
    assert stats.kstest(draws, stats.beta(0.4, 0.4).cdf).pvalue > 0.01
    assert stats.kstest(draws, stats.uniform().cdf).pvalue < 1e-6


def test_mixing_stops_at_mix_until_epoch(cifar):
    augment = make(mixup_alpha=1.0, mix_until_epoch=5)
    assert augment(cifar, labels(32), seeded(0), epoch=4)[2] is not None
    assert augment(cifar, labels(32), seeded(0), epoch=5)[2] is None


def test_remix_weight_hand_computed_cases():
    counts = [100, 10, 50]
    i = torch.tensor([0, 1, 0, 2])  # partners: 100 vs 10, 10 vs 100, 100 vs 50, 50 vs 10 (ratio 5)
    j = torch.tensor([1, 0, 2, 1])
    # lam = 0.3 < tau: a head image paired with a tail partner gives the whole label to the tail
    assert remix_label_weight(0.3, i, j, counts, kappa=3.0, tau=0.5).tolist() == pytest.approx([0.0, 0.3, 0.3, 0.0])
    # lam = 0.7, 1 - lam < tau: the tail image keeps its whole label; ratio 2 < kappa stays lam
    assert remix_label_weight(0.7, i, j, counts, kappa=3.0, tau=0.5).tolist() == pytest.approx([0.7, 1.0, 0.7, 0.7])
    # the ratio exactly kappa counts as imbalanced (>=), kappa = 2 makes 100 vs 50 imbalanced
    assert remix_label_weight(0.3, i, j, counts, kappa=2.0, tau=0.5).tolist() == pytest.approx([0.0, 0.3, 0.0, 0.0])
    assert remix_label_weight(0.7, j, i, counts, kappa=2.0, tau=0.5).tolist() == pytest.approx([1.0, 0.7, 1.0, 1.0])


def test_remix_batch_weights_follow_the_rule(cifar):
    counts = [5000, 2000, 800, 300, 120, 50, 20, 10, 5, 2]
    augment = make(mixup_alpha=1.0, remix=True, remix_kappa=3.0, remix_tau=0.5, counts=counts)
    targets = labels(32)
    for seed in range(6):
        params = augment.sample_params(cifar.shape, seeded(seed), epoch=0)
        _, _, mix_targets, weight = augment.apply(cifar, targets, params)
        lam = params.mix_lam
        for w, a, b in zip(weight.tolist(), targets.tolist(), mix_targets.tolist()):
            ratio = counts[a] / counts[b]
            expected = 0.0 if ratio >= 3 and lam < 0.5 else 1.0 if ratio <= 1 / 3 and 1 - lam < 0.5 else lam
            assert w == pytest.approx(expected)


def test_configuration_errors_name_the_fix(cifar):
    with pytest.raises(ValueError, match="class_counts"):
        make(mixup_alpha=1.0, remix=True)
    with pytest.raises(ValueError, match="mixup_alpha"):
        make(remix=True, counts=[10, 5])
    with pytest.raises(ValueError, match="choose one"):
        make(autoaugment="cifar10", randaugment=True)
    with pytest.raises(TypeError, match="uint8"):
        make()(cifar.float(), labels(32), seeded(0), epoch=0)
    with pytest.raises(ValueError, match="channels"):
        make().normalize(cifar[:, :1])


def test_normalize_matches_formula(cifar):
    expected = (cifar.float() / 255 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(make().normalize(cifar), expected, atol=1e-6, rtol=0)


def test_single_channel_digits():
    from sklearn.datasets import load_digits

    digits = torch.from_numpy(load_digits().images[:16] * 255 / 16).round().to(torch.uint8)[:, None]
    augment = BatchAugment(AugmentConfig(crop_padding=2, autoaugment="cifar10", cutout=4), [0.3], [0.4])
    images, *_ = augment(digits, labels(16), seeded(0), epoch=0)
    assert images.shape == (16, 1, 8, 8) and torch.isfinite(images).all()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_geometry(cifar):
    augment = make(crop_padding=4, flip=True, cutout=16, mixup_alpha=1.0)
    generator = torch.Generator(device="cuda").manual_seed(0)
    params = augment.sample_params(cifar.shape, generator, epoch=0)
    cuda_out = augment.apply(cifar.cuda(), labels(32).cuda(), params)
    cpu_params = AugmentParams(**{k: v.cpu() if torch.is_tensor(v) else v for k, v in vars(params).items()})
    cpu_out = augment.apply(cifar, labels(32), cpu_params)
    for a, b in zip(cuda_out, cpu_out):
        torch.testing.assert_close(a.cpu(), b)
