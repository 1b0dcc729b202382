"""Batches for training and evaluation (docs/ARCHITECTURE.md, "Data").

In-memory sets live on the training device as one uint8 tensor: a step indexes its batch there with
the sampler's indices, with no workers and no host-to-device copies. File sets are decoded by
DataLoader workers to uint8 at a fixed size (pinned, prefetched, persistent across epochs), then
copied to the device; or, with ``data.decode_on_device`` (on CUDA by default), the workers only read
the JPEG bytes and the device decodes them (``longtail.data.decoding``). All then run the same
device-side augmentation.

Reproducibility: the sampler's indices, the augmentation generator (on the device) and, for file
sets, each image's RandomResizedCrop draw are all seeded from (seed, epoch), so resuming at an epoch
boundary reproduces the epoch exactly, whatever the number of workers or where images are decoded.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterator, Literal

import torch
from torch.utils.data import DataLoader, Dataset

from longtail.data.datasets import ImageSet
from longtail.data.samplers import Sampler, epoch_seed
from longtail.data.decoding import EncodedFiles, collate_encoded, decode_views, use_device_decoding
from longtail.data.sources import file_image_view, read_image_file
from longtail.registry import ConfigError
from longtail.types import Batch

__all__ = ["TrainLoader", "EvalLoader", "FileImages", "eval_shard", "batch_bounds", "samples_in_batches"]

AUGMENT_STREAM = 101  # random streams of the loader, apart from the samplers'
CROP_STREAM = 102
DecodeSetting = Literal["auto", "yes", "no"]
# Names that moved out of this module, for imports written before the move: method-specific loaders
# live beside their method (BBN's paired batches in ``longtail.data.bbn``).
Augment = Callable[[torch.Tensor, torch.Tensor, torch.Generator, int],
                   tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


class FileImages(Dataset):
    """Decode file images to uint8 (C, image_size, image_size). A key is an index (the evaluation view:
    resize + centre crop) or (index, crop_seed) (a RandomResizedCrop drawn from ``crop_seed``)."""

    def __init__(self, imageset: ImageSet) -> None:
        if imageset.paths is None or imageset.image_size is None:
            raise ValueError("FileImages needs a file ImageSet (paths and image_size)")
        self.paths = imageset.paths
        self.targets = imageset.targets.tolist()
        self.size = imageset.image_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, crop_seed = key if isinstance(key, tuple) else (key, None)
        image = read_image_file(self.paths[index])  # file datasets are RGB
        return file_image_view(image, self.size, crop_seed), self.targets[index], index


def batch_bounds(total: int, batch_size: int, drop_last: bool, merge_single: bool = True) -> list[tuple[int, int]]:
    """``(start, end)`` of each batch when ``total`` samples are cut into batches of ``batch_size``.

    The last incomplete batch is dropped with ``drop_last`` (``data.drop_last``: BBN's and BALMS's
    code) and kept otherwise (torch's DataLoader default, which Cao et al., SHIKE and RIDE use). A kept
    last batch of a single sample is merged into the batch before it when ``merge_single`` (training):
    batch norm in train mode cannot normalise one sample (``BatchNorm1d`` raises, and a 1 x 1 map has
    no statistics), so that step trains on ``batch_size + 1`` samples and every drawn sample is used.
    Evaluation keeps it (``merge_single=False``): there batch norm uses its running statistics.
    """
    full, rest = divmod(total, batch_size)
    bounds = [(start, start + batch_size) for start in range(0, full * batch_size, batch_size)]
    if rest and not drop_last:
        if rest == 1 and merge_single and bounds:
            bounds[-1] = (bounds[-1][0], total)
        else:
            bounds.append((full * batch_size, total))
    return bounds


def samples_in_batches(total: int, batch_size: int, drop_last: bool) -> int:
    """How many of ``total`` samples the batches of ``batch_bounds`` hold (all, less a dropped last batch)."""
    bounds = batch_bounds(total, batch_size, drop_last)
    return bounds[-1][1] if bounds else 0


class _KeyBatches:
    """Batch sampler for the DataLoader: ``keys`` in batches cut by ``batch_bounds``. The train loader
    replaces ``keys`` in ``set_epoch``; persistent workers see them at the next epoch."""

    def __init__(self, keys: list[Any], batch_size: int, drop_last: bool, merge_single: bool = True) -> None:
        self.keys = keys
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.merge_single = merge_single

    def __len__(self) -> int:
        return len(batch_bounds(len(self.keys), self.batch_size, self.drop_last, self.merge_single))

    def __iter__(self) -> Iterator[list[Any]]:
        for start, end in batch_bounds(len(self.keys), self.batch_size, self.drop_last, self.merge_single):
            yield self.keys[start:end]


class _FileBatches:
    """uint8 (B, C, size, size) batches of a file set on ``device``, with targets and indices: decoded by
    DataLoader workers (pinned, prefetched), or with ``decode_on_device`` read by the workers and
    decoded on the device (``longtail.data.decoding``). ``batches`` gives the keys of each batch."""

    def __init__(self, imageset: ImageSet, batches: _KeyBatches, num_workers: int, device: torch.device,
                 persistent: bool, decode_on_device: DecodeSetting) -> None:
        assert imageset.paths is not None and imageset.image_size is not None
        self.device = device
        self.size = imageset.image_size
        self.on_device = use_device_decoding(decode_on_device, imageset.paths, device)
        dataset = EncodedFiles(imageset) if self.on_device else FileImages(imageset)
        self.loader = DataLoader(dataset, batch_sampler=batches, num_workers=num_workers,
                                 collate_fn=collate_encoded if self.on_device else None,
                                 pin_memory=device.type == "cuda" and not self.on_device,
                                 persistent_workers=persistent and num_workers > 0,
                                 prefetch_factor=4 if num_workers > 0 else None)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        for batch in self.loader:
            if self.on_device:
                data, paths, targets, index, crop_seeds = batch
                images = decode_views(data, paths, crop_seeds, self.size, self.device)
            else:
                images, targets, index = batch
                images = images.to(self.device, non_blocking=True)
            yield images, targets.to(self.device, non_blocking=True), index.to(self.device, non_blocking=True)


class TrainLoader:
    """Training batches: this rank's sampler indices for the epoch in batches of ``batch_size``, the
    last incomplete batch dropped with ``drop_last`` (the default here; the trainer passes
    ``data.drop_last``, false unless a recipe says otherwise) and kept otherwise (a last batch of one
    sample joins the one before it; ``batch_bounds``), augmented on ``device`` by ``augment(images_uint8,
    targets, generator, epoch)``. Call ``set_epoch`` before iterating each epoch. Every rank's sampler
    draws the same number of samples, so every rank has the same batches, the last one included.

    For file sets ``random_resized_crop`` chooses the decoding view (None: ``augment.cfg``'s setting) and
    ``decode_on_device`` where JPEGs are decoded (``data.decode_on_device``; auto: on CUDA).
    """

    def __init__(self, imageset: ImageSet, sampler: Sampler, batch_size: int, augment: Augment,
                 device: torch.device | str, seed: int, num_workers: int = 0,
                 random_resized_crop: bool | None = None, decode_on_device: DecodeSetting = "auto",
                 drop_last: bool = True) -> None:
        if len(sampler) < batch_size:
            raise ConfigError(f"batch size {batch_size} is larger than the {len(sampler)} training samples this "
                              "rank draws per epoch; lower data.batch_size (or data.val_fraction, which takes its "
                              "images from the training set)")
        self.imageset = imageset
        self.sampler = sampler
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.augment = augment
        self.device = torch.device(device)
        self.seed = seed
        self.epoch: int | None = None
        self.indices = torch.empty(0, dtype=torch.int64)
        if random_resized_crop is None:
            random_resized_crop = bool(getattr(getattr(augment, "cfg", None), "random_resized_crop", False))
        self.random_resized_crop = random_resized_crop
        if imageset.images is None and hasattr(augment, "without_resized_crop"):
            self.augment = augment.without_resized_crop()  # the decoder cuts file images' crops
        if imageset.images is not None:
            self.images = imageset.images.to(self.device)
            self.targets = imageset.targets.to(self.device)
        else:
            self.batches = _KeyBatches([], batch_size, drop_last=drop_last)
            self.files = _FileBatches(imageset, self.batches, num_workers, self.device, persistent=True,
                                      decode_on_device=decode_on_device)

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        """Draw the epoch's indices (and file crops); everything random in the epoch follows from (seed, epoch)."""
        self.epoch = epoch
        self.indices = self.sampler.epoch_indices(epoch, total_epochs)
        if self.imageset.in_memory:
            self.indices = self.indices.to(self.device)
        elif self.random_resized_crop:
            generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, CROP_STREAM))
            crop_seeds = torch.randint(2**62, (len(self.indices),), generator=generator)
            self.batches.keys = list(zip(self.indices.tolist(), crop_seeds.tolist()))
        else:
            self.batches.keys = self.indices.tolist()

    def __len__(self) -> int:
        return len(batch_bounds(len(self.sampler), self.batch_size, self.drop_last))

    @property
    def samples_per_epoch(self) -> int:
        """Samples this rank trains on per epoch (``len(sampler)``, less a dropped last batch)."""
        return samples_in_batches(len(self.sampler), self.batch_size, self.drop_last)

    def _uint8_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        if self.imageset.in_memory:
            for start, end in batch_bounds(len(self.indices), self.batch_size, self.drop_last):
                index = self.indices[start:end]
                yield self.images[index], self.targets[index], index
            return
        yield from self.files

    def __iter__(self) -> Iterator[Batch]:
        if self.epoch is None:
            raise RuntimeError("call TrainLoader.set_epoch(epoch, total_epochs) before iterating")
        generator = torch.Generator(device=self.device)
        generator.manual_seed(epoch_seed(self.seed, self.epoch, AUGMENT_STREAM))
        for images, targets, index in self._uint8_batches():
            images, targets, mix_targets, mix_weight = self.augment(images, targets, generator, self.epoch)
            yield Batch(images=images, targets=targets, indices=index, mix_targets=mix_targets, mix_weight=mix_weight)


def eval_shard(size: int, rank: int, world_size: int) -> torch.Tensor:
    """Indices ``rank::world_size`` of ``range(size)`` padded by repeating the last sample, so every rank
    has ``ceil(size / world_size)`` (``engine.distributed.gather_rows`` interleaves and trims them back)."""
    padded = torch.arange(math.ceil(size / world_size) * world_size).clamp_(max=size - 1)
    return padded[rank::world_size]


class EvalLoader:
    """Evaluation batches ``(normalize(images_uint8), targets)`` on ``device`` for this rank's shard."""

    def __init__(self, imageset: ImageSet, batch_size: int, normalize: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str, rank: int = 0, world_size: int = 1, num_workers: int = 0,
                 decode_on_device: DecodeSetting = "auto") -> None:
        if len(imageset) == 0:
            raise ValueError("cannot evaluate on an empty split")
        self.imageset = imageset
        self.batch_size = batch_size
        self.normalize = normalize
        self.device = torch.device(device)
        self.shard = eval_shard(len(imageset), rank, world_size)
        if imageset.images is not None:
            self.images = imageset.images[self.shard].to(self.device)
            self.targets = imageset.targets[self.shard].to(self.device)
        else:
            batches = _KeyBatches(self.shard.tolist(), batch_size, drop_last=False, merge_single=False)
            self.files = _FileBatches(imageset, batches, num_workers, self.device, persistent=False,
                                      decode_on_device=decode_on_device)

    def __len__(self) -> int:
        return math.ceil(len(self.shard) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.imageset.in_memory:
            for start in range(0, len(self.shard), self.batch_size):
                end = start + self.batch_size
                yield self.normalize(self.images[start:end]), self.targets[start:end]
            return
        for images, targets, _ in self.files:
            yield self.normalize(images), targets
