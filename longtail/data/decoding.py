"""JPEG decoding on the training device for file datasets (docs/ARCHITECTURE.md, "Data").

With ``data.decode_on_device`` the loader workers only read each file's bytes; the main process
decodes the whole batch at once with ``torchvision.io.decode_jpeg(..., device=...)`` (nvJPEG on a
GPU), then cuts each image's view (RandomResizedCrop or resize + centre crop) on the device. The
host then moves compressed bytes instead of decoded pixels and the CPU workers no longer decode —
on ImageNet-size images decoding is most of a worker's time.

The views are the ones ``FileImages`` cuts on the host (same crop draws from the same seeds), and on
the CPU ``decode_jpeg`` and PIL share libjpeg-turbo, so both paths give identical pixels; nvJPEG's
inverse DCT differs from libjpeg's by a grey level or so.

``torchvision.io``'s decoders are deprecated since torchvision 0.29 in favour of TorchCodec, which is
not installed on the machines longtail targets; the warning is silenced here and nowhere else.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal

import torch
from torch.utils.data import Dataset

from longtail.data.datasets import ImageSet
from longtail.data.sources import DataError, decode_bytes, file_image_view

__all__ = ["EncodedFiles", "EncodedBatch", "collate_encoded", "decode_views", "use_device_decoding",
           "JPEG_SUFFIXES"]

JPEG_SUFFIXES = (".jpg", ".jpeg", ".jpe", ".jfif")
JPEG_MAGIC = b"\xff\xd8\xff"
EncodedBatch = tuple[list[torch.Tensor], list[str], torch.Tensor, torch.Tensor, list[int | None]]


def _decode_jpeg(data: torch.Tensor | list[torch.Tensor], device: torch.device) -> torch.Tensor | list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torchvision\.io")
        warnings.filterwarnings("ignore", message=".*TorchCodec.*")
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)


def use_device_decoding(setting: Literal["auto", "yes", "no"], paths: list[str], device: torch.device) -> bool:
    """Whether a file set's JPEGs are decoded on ``device``: ``auto`` does it on CUDA when every file is
    a JPEG (by suffix); ``yes`` does it on any device (on the CPU it only moves decoding from the
    workers to the main process, which is slower: it exists for tests and benchmarks)."""
    if setting == "no" or not paths:
        return False
    other = next((path for path in paths if not path.lower().endswith(JPEG_SUFFIXES)), None)
    if setting == "auto":
        return device.type == "cuda" and other is None
    if other is not None:
        raise DataError(f"data.decode_on_device=yes decodes JPEG files only, and {other} is not one "
                        f"(suffixes {', '.join(JPEG_SUFFIXES)}); use data.decode_on_device=auto, which "
                        "decodes such sets in the loader workers")
    return True


class EncodedFiles(Dataset):
    """A file set's raw bytes: a key (index or (index, crop_seed), as ``FileImages``) gives
    ``(bytes as uint8 (L,), path, target, index, crop_seed or None)``."""

    def __init__(self, imageset: ImageSet) -> None:
        if imageset.paths is None:
            raise ValueError("EncodedFiles needs a file ImageSet")
        self.paths = imageset.paths
        self.targets = imageset.targets.tolist()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, str, int, int, int | None]:
        index, crop_seed = key if isinstance(key, tuple) else (key, None)
        path = self.paths[index]
        try:
            data = Path(path).read_bytes()
        except OSError as error:
            raise DataError(f"cannot read image {path}: {error.strerror}; check the file exists and is readable") from None
        # bytearray: torch.frombuffer needs a writable buffer to avoid a warning, and it is not copied again
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), path, self.targets[index], index, crop_seed


def collate_encoded(items: list[tuple[torch.Tensor, str, int, int, int | None]]) -> EncodedBatch:
    """Variable-length byte tensors stay a list (decode_jpeg takes a list and decodes it as one batch)."""
    data, paths, targets, indices, crop_seeds = zip(*items)
    return (list(data), list(paths), torch.tensor(targets, dtype=torch.int64), torch.tensor(indices, dtype=torch.int64),
            list(crop_seeds))


def _decode_one(data: torch.Tensor, path: str, device: torch.device) -> torch.Tensor:
    """One image, for a batch the batched decoder refused: a JPEG nvJPEG cannot take (CMYK, progressive
    oddities) is decoded by PIL on the host; a file that is not a JPEG or is corrupt is named."""
    if bytes(data[:3].tolist()) == JPEG_MAGIC:
        try:
            return _decode_jpeg(data, device)
        except RuntimeError:
            pass
    return decode_bytes(data.numpy().tobytes(), path, 3).to(device)


def decode_views(data: list[torch.Tensor], paths: list[str], crop_seeds: list[int | None], size: int,
                 device: torch.device) -> torch.Tensor:
    """Decode a batch of JPEG bytes on ``device`` and cut each image's ``size`` x ``size`` view
    (``file_image_view``: a seeded RandomResizedCrop, or resize + centre crop when its seed is None)."""
    try:
        images = _decode_jpeg(data, device)
    except RuntimeError:  # one bad image fails the whole batch: decode one by one to find or work around it
        images = [_decode_one(item, path, device) for item, path in zip(data, paths)]
    return torch.stack([file_image_view(image, size, seed) for image, seed in zip(images, crop_seeds)])
