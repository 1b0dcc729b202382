"""Batched training augmentation on the training device (docs/ARCHITECTURE.md, "Data": small sets live on the
device as one uint8 tensor and are augmented there in batches, not image by image in workers).

Every image draws its own random parameters; the work is done by batched tensor ops, never by a
Python loop over images. Order, as the authors' pipelines (SHIKE, MiSLAS, LADC):

1. uint8: random crop from the zero-padded image or a RandomResizedCrop (in-memory sets: LIFT's CIFAR
   pipeline crops the 32 x 32 images and resizes the crops to 224), horizontal flip, a random rotation
   (RIDE's and SADE's ``RandomRotation(15)``), AutoAugment (its geometric ops fill
   with ``autoaugment_fill``, 128 as the ``CIFAR10Policy(fillcolor=(128, 128, 128))`` of SHIKE's and
   BALMS's code) or RandAugment;
2. Cutout (DeVries & Taylor 2017), ``cutout_fill="black"`` (default): the hole is set to 0 before
   normalisation, as SHIKE's and BALMS's code (``ToTensor``, ``Cutout``, then ``Normalize``: a black square);
3. float: normalise ``(x / 255 - mean) / std``;
4. Cutout with ``cutout_fill="mean"``: the hole is set to 0 after normalisation (the dataset's mean colour);
5. mixup (Zhang et al. 2018) or Remix (Chou et al. 2020) with one ``lam`` per batch, as MiSLAS's code.

The random draws are kept apart from their application (``sample_params`` then ``apply``, like
torchvision's ``make_params``/``transform``) so a batch can be replayed and checked image by image.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import math

import torch
from scipy.special import betaincinv
from torchvision.transforms.v2 import AutoAugment, AutoAugmentPolicy, RandAugment

from longtail.config import AugmentConfig
from longtail.functional.mixing import remix_label_weight

__all__ = ["AugmentParams", "BatchAugment", "rotate"]

_AUTOAUGMENT_POLICIES = {"cifar10": AutoAugmentPolicy.CIFAR10, "imagenet": AutoAugmentPolicy.IMAGENET}
_AUTOAUGMENT_BINS = 10  # torchvision's AutoAugment indexes its magnitude tables with 10 bins
_RANDAUGMENT_BINS = 31  # and RandAugment with 31 (magnitude 0..30)
# RandomResizedCrop's ranges (torchvision's defaults, Inception's; the file sets' decoder uses the same)
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
_RRC_TRIES = 10  # torchvision's attempts before its centre-crop fallback


@dataclass
class AugmentParams:
    """Every random draw for one batch, one entry per image (None where the op is off).

    crop_top / crop_left: (B,) corner of the crop window in the zero-padded image, in [0, 2 * padding].
    rrc_box: (B, 4) RandomResizedCrop's (top, left, height, width) of each image's crop.
    flip: (B,) bool, mirror left-right.
    rotation: (B,) float, each image's rotation in degrees (counter-clockwise, as torchvision's).
    policy_choice: (B, K) AutoAugment sub-policy (the same for its K = 2 steps) or RandAugment op index
        (one per step, K = randaugment_ops).
    policy_applied: (B, K) bool, the step's op is applied (AutoAugment's per-op probability; always
        True for RandAugment). policy_negative: (B, K) bool, the magnitude's sign is flipped.
    cutout_y / cutout_x: (B,) centre of the Cutout hole.
    mix_lam: the batch's mixing coefficient; mix_perm: (B,) the partner of each image.
    """

    crop_top: torch.Tensor | None = None
    crop_left: torch.Tensor | None = None
    rrc_box: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    rotation: torch.Tensor | None = None
    policy_choice: torch.Tensor | None = None
    policy_applied: torch.Tensor | None = None
    policy_negative: torch.Tensor | None = None
    cutout_y: torch.Tensor | None = None
    cutout_x: torch.Tensor | None = None
    mix_lam: float | None = None
    mix_perm: torch.Tensor | None = None


def _sample_beta(alpha: float, generator: torch.Generator) -> float:
    """One draw of Beta(alpha, alpha) from the caller's generator, by the inverse CDF (torch's Beta
    sampler takes no generator, and the batch must be reproducible from the generator alone)."""
    uniform = torch.rand((), generator=generator, device=generator.device).item()
    return float(betaincinv(alpha, alpha, uniform))


def _pad_crop(images: torch.Tensor, padding: int, top: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
    """Crop each image's own H x W window at (top, left) of the image zero-padded by ``padding``,
    by two gathers of per-image row and column indices."""
    batch, channels, height, width = images.shape
    padded = torch.nn.functional.pad(images, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(height, device=images.device)
    cols = left[:, None] + torch.arange(width, device=images.device)
    padded = padded.gather(2, rows[:, None, :, None].expand(batch, channels, height, width + 2 * padding))
    return padded.gather(3, cols[:, None, None, :].expand(batch, channels, height, width))


def rotate(images: torch.Tensor, degrees: torch.Tensor) -> torch.Tensor:
    """Rotate each image of a uint8 batch (B, C, H, W) by its own angle (degrees, counter-clockwise) about
    its centre, nearest neighbour, pixels from outside the image black: torchvision's ``rotate`` (the
    kernel of ``RandomRotation``) for every image in one ``grid_sample``. As torchvision, each output
    pixel centre, in coordinates centred on the image, is mapped back by the inverse rotation and
    normalised by half the image's size (``align_corners=False``)."""
    batch, _, height, width = images.shape
    radians = torch.deg2rad(degrees.double())
    cos, sin = torch.cos(radians), torch.sin(radians)
    xs = torch.arange(width, device=images.device, dtype=torch.float64) - (width - 1) / 2
    ys = torch.arange(height, device=images.device, dtype=torch.float64) - (height - 1) / 2
    y, x = torch.meshgrid(ys, xs, indexing="ij")
    # inverse rotation: the source of output pixel (x, y), with y pointing down the image
    source_x = cos[:, None, None] * x - sin[:, None, None] * y
    source_y = sin[:, None, None] * x + cos[:, None, None] * y
    grid = torch.stack([source_x / (0.5 * width), source_y / (0.5 * height)], dim=-1).float()
    rotated = torch.nn.functional.grid_sample(images.float(), grid, mode="nearest", padding_mode="zeros",
                                              align_corners=False)
    return rotated.round_().to(images.dtype)


def sample_resized_crop_boxes(batch: int, height: int, width: int, generator: torch.Generator,
                              scale: tuple[float, float] = RRC_SCALE,
                              ratio: tuple[float, float] = RRC_RATIO) -> torch.Tensor:
    """(B, 4) int64 (top, left, height, width): torchvision's ``RandomResizedCrop`` draw for every image
    at once. Each image tries 10 (area fraction ~ U(scale), log aspect ratio ~ U(log ratio)) pairs and
    keeps the first whose rounded box fits, at a uniform position; an image with none fitting gets
    torchvision's fallback, the largest centred box within ``ratio``."""
    device = generator.device
    area = height * width
    fraction = torch.empty(batch, _RRC_TRIES, device=device).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(batch, _RRC_TRIES, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]),
                                                                         generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(area * fraction * aspect)).long()
    h = torch.round(torch.sqrt(area * fraction / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(1, keepdim=True)  # the first try that fits (0 when none does)
    found = fits.any(1)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    position = torch.rand(batch, 2, device=device, generator=generator)
    top = torch.floor(position[:, 0] * (height - h + 1).clamp(min=1)).long()
    left = torch.floor(position[:, 1] * (width - w + 1).clamp(min=1)).long()
    in_ratio = width / height  # torchvision's fallback: a centred crop at the nearest allowed ratio
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    top = torch.where(found, top, torch.full_like(top, (height - fallback_h) // 2))
    left = torch.where(found, left, torch.full_like(left, (width - fallback_w) // 2))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    return torch.stack([top, left, h, w], dim=1)


def _bilinear_matrix(start: torch.Tensor, length: torch.Tensor, size: int, full: int) -> torch.Tensor:
    """(B, size, full) weights that resize each image's [start, start + length) to ``size`` samples as
    ``F.interpolate(mode='bilinear', align_corners=False)`` does on the cut-out crop (source positions
    clamped to the crop, so no pixel outside it leaks in)."""
    batch = start.shape[0]
    step = length.double() / size
    source = ((torch.arange(size, device=start.device, dtype=torch.float64)[None] + 0.5) * step[:, None] - 0.5)
    source = source.clamp(min=0)
    low = source.floor().long().minimum(length[:, None] - 1)
    high = (low + 1).minimum(length[:, None] - 1)
    weight_high = (source - low).float()
    matrix = torch.zeros(batch, size, full, device=start.device)
    matrix.scatter_add_(2, (start[:, None] + low)[..., None], (1 - weight_high)[..., None])
    matrix.scatter_add_(2, (start[:, None] + high)[..., None], weight_high[..., None])
    return matrix


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Each image's box (top, left, height, width) resized to ``size`` (side, or (H, W)) (bilinear, as
    torchvision's ``resized_crop`` without antialiasing: the same when the crops are enlarged, as CIFAR's
    to 224), by two batched matrix products; float images in, float out."""
    _, _, height, width = images.shape
    out_h, out_w = (size, size) if isinstance(size, int) else size
    rows = _bilinear_matrix(boxes[:, 0], boxes[:, 2], out_h, height)  # (B, out_h, H)
    cols = _bilinear_matrix(boxes[:, 1], boxes[:, 3], out_w, width)  # (B, out_w, W)
    return rows[:, None] @ images @ cols.transpose(1, 2)[:, None]


def _cutout(images: torch.Tensor, size: int, centre_y: torch.Tensor, centre_x: torch.Tensor) -> torch.Tensor:
    """Zero rows [y - size//2, y + size//2) and columns [x - size//2, x + size//2) of each image,
    clipped at the borders, as DeVries & Taylor's ``Cutout`` (one hole); uint8 or float images."""
    half = size // 2
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    in_rows = (rows >= (centre_y - half)[:, None]) & (rows < (centre_y + half)[:, None])
    in_cols = (cols >= (centre_x - half)[:, None]) & (cols < (centre_x + half)[:, None])
    hole = in_rows[:, :, None] & in_cols[:, None, :]
    return images.masked_fill(hole[:, None], 0.0)


@dataclass(frozen=True)
class _Op:
    """One distinct batched call: a torchvision op name, its magnitude bin (None: no magnitude)
    and the sign of the magnitude."""

    name: str
    bin: int | None
    negative: bool


class _BatchedPolicy:
    """AutoAugment or RandAugment applied to a batch in groups.

    Each image draws its own choice per step (an AutoAugment sub-policy, or a RandAugment op), whether
    the op is applied, and the magnitude's sign. Then, step by step, images are grouped by the op they
    got (torchvision op name, magnitude bin, sign) and each group goes through one batched torchvision
    call; every op of torchvision's tables acts on each image of a batch on its own (per-image
    histograms for equalize, per-image min/max for autocontrast, per-image mean for contrast). Groups
    are merged across sub-policies, so a step makes at most one call per distinct op.

    The sub-policies and magnitude tables are torchvision's (``AutoAugment._policies``,
    ``_AUGMENTATION_SPACE``), and the ops run through torchvision's own dispatch
    (``_apply_image_or_video_transform``), so a group's result equals torchvision's transform with the
    same draws (nearest interpolation, torchvision's default; ``fill`` for the geometric ops).
    """

    def __init__(self, transform: AutoAugment | RandAugment, steps: list[list[tuple[str, float, int | None]]],
                 num_bins: int, shared_choice: bool) -> None:
        self.transform = transform
        self.num_bins = num_bins
        self.shared_choice = shared_choice
        self.num_choices = len(steps[0])
        index: dict[_Op, int] = {}
        lookup = torch.empty(len(steps), self.num_choices, 2, dtype=torch.long)
        self.probability = torch.empty(len(steps), self.num_choices)
        for k, choices in enumerate(steps):
            for c, (name, probability, magnitude_bin) in enumerate(choices):
                signed = transform._AUGMENTATION_SPACE[name][1]
                self.probability[k, c] = probability
                for negative in (False, True):
                    op = _Op(name, magnitude_bin, negative and signed and magnitude_bin is not None)
                    lookup[k, c, int(negative)] = index.setdefault(op, len(index))
        self.ops: list[_Op] = list(index)
        self.lookup = lookup

    @classmethod
    def autoaugment(cls, policy: str, fill: int = 0) -> "_BatchedPolicy":
        transform = AutoAugment(_AUTOAUGMENT_POLICIES[policy], fill=fill)
        steps = [list(step) for step in zip(*transform._policies)]
        return cls(transform, steps, _AUTOAUGMENT_BINS, shared_choice=True)

    @classmethod
    def randaugment(cls, num_ops: int, magnitude: int) -> "_BatchedPolicy":
        transform = RandAugment(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=_RANDAUGMENT_BINS)
        space = transform._AUGMENTATION_SPACE
        choices = [(name, 1.0, None if space[name][0](_RANDAUGMENT_BINS, 1, 1) is None else magnitude)
                   for name in space]
        return cls(transform, [choices] * num_ops, _RANDAUGMENT_BINS, shared_choice=False)

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        device = generator.device
        steps = self.lookup.shape[0]
        if self.shared_choice:
            choice = torch.randint(self.num_choices, (batch, 1), generator=generator, device=device)
            choice = choice.expand(batch, steps).contiguous()
        else:
            choice = torch.randint(self.num_choices, (batch, steps), generator=generator, device=device)
        probability = self.probability.to(device)[torch.arange(steps, device=device), choice]
        applied = torch.rand(batch, steps, generator=generator, device=device) <= probability
        negative = torch.rand(batch, steps, generator=generator, device=device) <= 0.5
        return choice, applied, negative

    def apply(self, images: torch.Tensor, choice: torch.Tensor, applied: torch.Tensor,
              negative: torch.Tensor) -> torch.Tensor:
        # one device-to-host copy per batch: the grouping is decided on the CPU
        choice, applied, negative = torch.stack([choice, applied.long(), negative.long()]).cpu()
        op_index = self.lookup[torch.arange(choice.shape[1]), choice, negative].masked_fill(applied == 0, -1)
        images = images.clone()
        for column in op_index.T:
            for op in column.unique().tolist():
                if op < 0:
                    continue
                members = (column == op).nonzero().squeeze(1).to(images.device)
                images[members] = self._run(images[members], self.ops[op])
        return images

    def _run(self, images: torch.Tensor, op: _Op) -> torch.Tensor:
        magnitude = 0.0
        if op.bin is not None:
            table = self.transform._AUGMENTATION_SPACE[op.name][0](self.num_bins, images.shape[-2], images.shape[-1])
            magnitude = -float(table[op.bin]) if op.negative else float(table[op.bin])
        return self.transform._apply_image_or_video_transform(
            images, op.name, magnitude, interpolation=self.transform.interpolation, fill=self.transform._fill)


def _check_uint8(images: torch.Tensor) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise TypeError(f"BatchAugment takes uint8 images of shape (B, C, H, W); got {images.dtype} "
                        f"{tuple(images.shape)} (augment before converting to float or normalising)")


class BatchAugment:
    """The training augmentation of ``AugmentConfig``, batched on the images' device.

    ``class_counts`` (training images per class) is needed by Remix only.
    ``cfg.random_resized_crop`` is done here for in-memory images (resized to
    ``cfg.random_resized_crop_size``, else kept at their size); file datasets do it when they decode,
    so their loader uses ``without_resized_crop()``.
    """

    def __init__(self, cfg: AugmentConfig, mean: Sequence[float], std: Sequence[float],
                 class_counts: Sequence[int] | None = None) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} channels but std has {len(std)}; give one value per channel")
        if min(std) <= 0:
            raise ValueError(f"std must be positive per channel, got {list(std)}")
        if cfg.autoaugment != "none" and cfg.randaugment:
            raise ValueError("augment.autoaugment and augment.randaugment are both on; choose one "
                             "(set autoaugment: none or randaugment: false)")
        if cfg.random_resized_crop and cfg.crop_padding > 0:
            raise ValueError("augment.random_resized_crop and augment.crop_padding are both on; choose one crop "
                             "(set crop_padding: 0 for the resized crop)")
        if cfg.remix and cfg.mixup_alpha <= 0:
            raise ValueError("augment.remix mixes images with lam ~ Beta(mixup_alpha, mixup_alpha); "
                             "set augment.mixup_alpha > 0 (e.g. 1.0)")
        if cfg.remix and class_counts is None:
            raise ValueError("augment.remix needs the training class counts; pass "
                             "BatchAugment(..., class_counts=bundle.train_counts)")
        self.cfg = cfg
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.class_counts = None if class_counts is None else torch.as_tensor(list(class_counts))
        self.policy: _BatchedPolicy | None = None
        if cfg.autoaugment != "none":
            self.policy = _BatchedPolicy.autoaugment(cfg.autoaugment, cfg.autoaugment_fill)
        elif cfg.randaugment:
            self.policy = _BatchedPolicy.randaugment(cfg.randaugment_ops, cfg.randaugment_magnitude)

    def without_resized_crop(self) -> "BatchAugment":
        """This augmentation without the RandomResizedCrop (for images a decoder has already cropped)."""
        if not self.cfg.random_resized_crop:
            return self
        other = copy.copy(self)
        other.cfg = self.cfg.model_copy(update={"random_resized_crop": False})
        return other

    def mixes(self, epoch: int) -> bool:
        """Whether batches of this epoch are mixed (mixup or Remix)."""
        until = self.cfg.mix_until_epoch
        return self.cfg.mixup_alpha > 0 and (until is None or epoch < until)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (B, C, H, W) -> float32 ``(x / 255 - mean) / std``, with no randomness (evaluation)."""
        _check_uint8(images)
        if images.shape[1] != len(self.mean):
            raise ValueError(f"images have {images.shape[1]} channels but mean/std have {len(self.mean)}; "
                             "use the dataset's own mean and std")
        scale = (1.0 / (255.0 * self.std)).to(images.device).view(1, -1, 1, 1)
        shift = (-self.mean / self.std).to(images.device).view(1, -1, 1, 1)
        return torch.addcmul(shift, images.float(), scale)

    def sample_params(self, shape: torch.Size | Sequence[int], generator: torch.Generator,
                      epoch: int) -> AugmentParams:
        """Draw every random parameter of a batch of ``shape`` (B, C, H, W) on the generator's device."""
        batch, _, height, width = shape
        device = generator.device
        params = AugmentParams()
        padding = self.cfg.crop_padding
        if self.cfg.random_resized_crop:
            params.rrc_box = sample_resized_crop_boxes(batch, height, width, generator)
            if self.cfg.random_resized_crop_size:
                height = width = self.cfg.random_resized_crop_size
        if padding > 0:
            params.crop_top = torch.randint(2 * padding + 1, (batch,), generator=generator, device=device)
            params.crop_left = torch.randint(2 * padding + 1, (batch,), generator=generator, device=device)
        if self.cfg.flip:
            params.flip = torch.rand(batch, generator=generator, device=device) < 0.5
        if self.cfg.rotation > 0:
            params.rotation = torch.empty(batch, device=device).uniform_(-self.cfg.rotation, self.cfg.rotation,
                                                                         generator=generator)
        if self.policy is not None:
            params.policy_choice, params.policy_applied, params.policy_negative = self.policy.sample(batch, generator)
        if self.cfg.cutout > 0:
            params.cutout_y = torch.randint(height, (batch,), generator=generator, device=device)
            params.cutout_x = torch.randint(width, (batch,), generator=generator, device=device)
        if self.mixes(epoch):
            params.mix_lam = _sample_beta(self.cfg.mixup_alpha, generator)
            params.mix_perm = torch.randperm(batch, generator=generator, device=device)
        return params

    def augment_pixels(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """The uint8 stage: crop, flip, rotation, AutoAugment/RandAugment, a black Cutout hole."""
        _check_uint8(images)
        if params.rrc_box is not None:
            side = self.cfg.random_resized_crop_size
            size = (side, side) if side else (images.shape[-2], images.shape[-1])
            images = resized_crops(images.float(), params.rrc_box, size).round_().clamp_(0, 255).to(torch.uint8)
        if params.crop_top is not None and params.crop_left is not None:
            images = _pad_crop(images, self.cfg.crop_padding, params.crop_top, params.crop_left)
        if params.flip is not None:
            images = torch.where(params.flip[:, None, None, None], images.flip(-1), images)
        if params.rotation is not None:
            images = rotate(images, params.rotation)
        draws = (params.policy_choice, params.policy_applied, params.policy_negative)
        if self.policy is not None and all(draw is not None for draw in draws):
            images = self.policy.apply(images, *draws)
        if self.cfg.cutout_fill == "black" and params.cutout_y is not None and params.cutout_x is not None:
            images = _cutout(images, self.cfg.cutout, params.cutout_y, params.cutout_x)
        return images

    def apply(self, images: torch.Tensor, targets: torch.Tensor, params: AugmentParams
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Augment a batch with given parameters; see ``__call__``."""
        out = self.normalize(self.augment_pixels(images, params))
        if self.cfg.cutout_fill == "mean" and params.cutout_y is not None and params.cutout_x is not None:
            out = _cutout(out, self.cfg.cutout, params.cutout_y, params.cutout_x)
        if params.mix_lam is None or params.mix_perm is None:
            return out, targets, None, None
        lam, perm = params.mix_lam, params.mix_perm
        out = out.mul(lam).add_(out[perm], alpha=1.0 - lam)
        mix_targets = targets[perm]
        if self.cfg.remix:
            weight = remix_label_weight(lam, targets, mix_targets, self.class_counts,
                                        self.cfg.remix_kappa, self.cfg.remix_tau)
        else:
            weight = torch.full(targets.shape, lam, dtype=torch.float32, device=targets.device)
        return out, targets, mix_targets, weight

    def __call__(self, images: torch.Tensor, targets: torch.Tensor, generator: torch.Generator,
                 epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Augment uint8 ``images`` (B, C, H, W) with per-image draws from ``generator`` (on the images'
        device). Returns (normalised float images, targets, mix_targets or None, mix_weight or None);
        the loss is ``mix_weight * L(targets) + (1 - mix_weight) * L(mix_targets)`` when mixed."""
        _check_uint8(images)
        if targets.shape != images.shape[:1]:
            raise ValueError(f"targets must be (B,) = ({images.shape[0]},); got {tuple(targets.shape)}")
        if generator.device.type != images.device.type:
            raise ValueError(f"the generator is on {generator.device} but the images are on {images.device}; "
                             f"make it with torch.Generator(device=images.device)")
        return self.apply(images, targets, self.sample_params(images.shape, generator, epoch))
