"""File-set loading speed: JPEGs decoded by DataLoader workers (PIL) against decoded on the training
device (``data.decode_on_device=yes``: workers only read bytes; ``torchvision.io.decode_jpeg`` on the
device, nvJPEG on CUDA), both cutting the same seeded RandomResizedCrop views to 224 x 224. One
epoch of ``TrainLoader`` each, side by side in one run, no model (the data pipeline alone).

The images are real: the first ``--images`` CIFAR-10 training JPEGs of the shared archive, upscaled
(bicubic) to ImageNet's typical 500 x 375 and re-encoded at quality 90, cached once.

    python benchmarks/decoding.py                          # CPU, 2 workers
    python benchmarks/decoding.py --device cuda --workers 8

Prints and writes JSON (benchmarks/results/decoding-<device>.json).
"""
from __future__ import annotations

import argparse
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ARCHIVE, extracted_tree, write_result  # noqa: E402

WIDTH, HEIGHT = 500, 375


def jpeg_folder(archive: Path, count: int) -> tuple[list[str], list[int], list[str]]:
    """``count`` upscaled CIFAR-10 training JPEGs (round-robin over the classes): paths, targets, class names."""
    source = extracted_tree(archive) / "train"
    classes = sorted(p.name for p in source.iterdir() if p.is_dir())
    target_root = Path.home() / ".cache" / "longtail" / "bench_decoding" / f"{WIDTH}x{HEIGHT}"
    per_class = [sorted((source / name).glob("*.jpg")) for name in classes]
    paths, targets = [], []
    for number in range(count):
        label = number % len(classes)
        original = per_class[label][number // len(classes)]
        path = target_root / classes[label] / original.name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.open(original).convert("RGB").resize((WIDTH, HEIGHT), Image.BICUBIC).save(path, quality=90)
        paths.append(str(path))
        targets.append(label)
    return paths, targets, classes


def keep_pixels(images, targets, generator, epoch):
    return images, targets, None, None


def time_epoch(imageset, device: torch.device, decode: str, workers: int, batch_size: int) -> dict:
    from longtail.data.loaders import TrainLoader
    from longtail.registry import SAMPLERS
    sampler = SAMPLERS.build("instance", {}, targets=imageset.targets, num_classes=imageset.num_classes, seed=0)
    loader = TrainLoader(imageset, sampler, batch_size, keep_pixels, device, seed=0, num_workers=workers,
                         random_resized_crop=True, decode_on_device=decode)
    timings = []
    for epoch in (0, 1):  # epoch 0 warms up (worker start, decoder initialisation); epoch 1 is timed
        loader.set_epoch(epoch, 2)
        start = time.perf_counter()
        images = 0
        for batch in loader:
            images += len(batch.images)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        timings.append(images / (time.perf_counter() - start))
    return {"img_s": timings[1], "warmup_img_s": timings[0], "on_device": loader.files.on_device}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", default=str(ARCHIVE), help="the CIFAR-10 JPEG archive")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import longtail.data  # noqa: F401  (registers the samplers)
    from longtail.data.datasets import ImageSet
    from longtail.engine.distributed import resolve_device
    from longtail.engine.rundir import device_name
    device = resolve_device(args.device)
    paths, targets, classes = jpeg_folder(Path(args.data), args.images)
    imageset = ImageSet(torch.tensor(targets), len(classes), classes, paths=paths, image_size=224)
    result = {"device": str(device), "device_name": device_name(device), "images": len(paths),
              "image_size": f"{WIDTH}x{HEIGHT} JPEG q90 -> RandomResizedCrop 224", "workers": args.workers,
              "batch_size": args.batch_size, "cpu_threads": torch.get_num_threads(),
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    result["workers_decode"] = time_epoch(imageset, device, "no", args.workers, args.batch_size)
    result["device_decode"] = time_epoch(imageset, device, "yes", args.workers, args.batch_size)
    result["device_over_workers"] = result["device_decode"]["img_s"] / result["workers_decode"]["img_s"]
    write_result(result, args.out, f"decoding-{device.type}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
