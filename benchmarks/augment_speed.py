"""Speed of BatchAugment against torchvision.transforms.v2 applied image by image in a Python loop
(what a Dataset's __getitem__ does), on one 128 x 3 x 32 x 32 uint8 batch of real CIFAR-10 images
(the JPEG re-encoded copy in ../shared/data; random pixels if it is missing).

    python benchmarks/augment_speed.py [--device cpu|cuda] [--threads 1] [--seconds 1.5]

Prints one JSON object: images per second of each pipeline for both implementations. With the
default single thread neither side gains from intra-op parallelism. About 20 s in all.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import random
import statistics
import tarfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from longtail.config import AugmentConfig
from longtail.data.augment import BatchAugment

CIFAR10 = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10_jpg.tar.gz"
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PIPELINES = {
    "crop_flip": dict(crop_padding=4, flip=True),
    "crop_flip_autoaugment_cutout": dict(crop_padding=4, flip=True, autoaugment="cifar10", cutout=16),
    "crop_flip_autoaugment_cutout_mixup": dict(crop_padding=4, flip=True, autoaugment="cifar10", cutout=16,
                                               mixup_alpha=1.0),
}


def load_batch(size: int) -> tuple[torch.Tensor, str]:
    if not CIFAR10.is_file():
        return torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8), "random pixels"
    images = []
    with tarfile.open(CIFAR10) as archive:
        for member in archive:
            if member.isfile() and member.name.endswith(".jpg"):
                images.append(np.asarray(Image.open(io.BytesIO(archive.extractfile(member).read())).convert("RGB")))
            if len(images) == size:
                break
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(), "CIFAR-10 train (JPEG q75)"


def cutout(length: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """DeVries & Taylor's per-image Cutout on a normalised tensor, as the authors' datasets apply it."""
    def apply(image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        y, x = random.randrange(height), random.randrange(width)
        image = image.clone()
        image[:, max(y - length // 2, 0):min(y + length // 2, height),
              max(x - length // 2, 0):min(x + length // 2, width)] = 0
        return image
    return apply


def per_image_pipeline(options: dict) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    steps: list = [v2.RandomCrop(32, padding=options["crop_padding"]), v2.RandomHorizontalFlip()]
    if options.get("autoaugment"):
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)]
    if options.get("cutout"):
        steps.append(v2.Lambda(cutout(options["cutout"])))
    transform = v2.Compose(steps)
    mixup = v2.MixUp(alpha=options["mixup_alpha"], num_classes=10) if options.get("mixup_alpha") else None

    def run(images: torch.Tensor, targets: torch.Tensor) -> tuple:
        batch = torch.stack([transform(image) for image in images])
        return mixup(batch, targets) if mixup is not None else (batch, targets)
    return run


def images_per_second(fn: Callable[[], object], batch: int, seconds: float, sync: Callable[[], None]) -> float:
    fn()
    sync()
    rates = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end or len(rates) < 3:
        start = time.perf_counter()
        fn()
        sync()
        rates.append(batch / (time.perf_counter() - start))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seconds", type=float, default=1.5, help="timing per pipeline and implementation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    random.seed(0)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    images, source = load_batch(args.batch)
    targets = torch.arange(args.batch) % 10
    on_device, device_targets = images.to(device), targets.to(device)
    generator = torch.Generator(device=device).manual_seed(0)

    results = {}
    for name, options in PIPELINES.items():
        augment = BatchAugment(AugmentConfig(**options), MEAN, STD)
        batched = images_per_second(lambda: augment(on_device, device_targets, generator, epoch=0),
                                    args.batch, args.seconds, sync)
        loop = per_image_pipeline(options)
        per_image = images_per_second(lambda: loop(images, targets), args.batch, args.seconds, lambda: None)
        results[name] = {"batch_augment_img_per_s": round(batched), "torchvision_per_image_loop_img_per_s": round(per_image),
                         "speedup": round(batched / per_image, 2)}

    print(json.dumps({
        "benchmark": "augment_speed",
        "batch": list(images.shape), "images": source,
        "batch_augment_device": str(device), "per_image_loop_device": "cpu", "threads": args.threads,
        "torch": torch.__version__, "torchvision": torchvision.__version__, "cpu": platform.processor() or platform.machine(),
        "results": results,
    }, indent=2))


if __name__ == "__main__":
    main()
