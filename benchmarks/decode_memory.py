"""Peak memory of an in-memory decode (issue 24, benchmarks/RESULTS.md "Memory of an in-memory decode").

After the imports the process's peak RSS is reset (``/proc/self/clear_refs`` 5); then the bundle of an
``image_folder`` archive is built (long-tailed, optional validation split) and the rise of the peak is
printed against the decoded uint8 tensors' bytes. Run it under ``/usr/bin/time -v`` for the
whole-process maximum:

    OMP_NUM_THREADS=1 /usr/bin/time -v python benchmarks/decode_memory.py ../shared/data/cifar10_jpg.tar.gz \
        --image-size 64 --cache-dir /tmp/decode-cache [--val-fraction 0.2]
"""
from __future__ import annotations

import argparse

import longtail.data  # noqa: F401  (imports first: their memory is not the decode's)
from longtail.config import DataConfig
from longtail.data import build_data


def status(key: str) -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) * 1024 for line in handle if line.startswith(key))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="a .tar.gz (or folder) with train/<class>/ and test/<class>/")
    parser.add_argument("--image-size", type=int, default=None, help="data.image_size (default: unset)")
    parser.add_argument("--imbalance-factor", type=float, default=100.0)
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--cache-dir", required=True, help="a fresh folder measures a cold decode")
    args = parser.parse_args()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # reset VmHWM to the current RSS
    before = status("VmRSS:")
    bundle = build_data(DataConfig(dataset="image_folder", root=args.root, imbalance_factor=args.imbalance_factor,
                                   val_fraction=args.val_fraction, image_size=args.image_size,
                                   cache_dir=args.cache_dir, in_memory="yes"))
    splits = [bundle.train, bundle.test] + ([bundle.val] if bundle.val is not None else [])
    tensor = sum(split.images.numel() for split in splits)
    rise = status("VmHWM:") - before
    print(f"image_size {bundle.image_size}, {len(bundle.train)} training images: tensors {tensor / 2**20:.1f} MiB; "
          f"RSS before {before / 2**20:.0f} MiB, peak rise {rise / 2**20:.1f} MiB = {rise / tensor:.2f} x the tensors")


if __name__ == "__main__":
    main()
