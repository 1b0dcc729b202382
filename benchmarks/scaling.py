"""Does training cost grow linearly? One real Trainer epoch per point:

- data:    CIFAR-10-LT (shared JPEG CIFAR-10) at IF 200, 100, 50, 10 — the training set grows;
- classes: synthetic long-tailed sets of 10, 100 and 1000 classes (lt_counts(C, 500, 100), random
           32x32 images) — classes and images grow together.

Linear cost means a flat images-per-second column. The default model is ``small_cnn`` so the data
pipeline, sampler and loss (the parts that could grow with N or C) are not hidden under convolution
time; ``--model resnet32`` measures the full model.

    python benchmarks/scaling.py [--model small_cnn] [--device auto]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10_jpg.tar.gz"
SYNTHETIC = {"num_classes": 10}


def register_synthetic() -> None:
    """A synthetic long-tailed set for the class sweep (benchmark only: random pixels)."""
    from longtail.data.datasets import DEFAULT_IMBALANCE_FACTOR, DataBundle, ImageSet
    from longtail.functional import lt_counts
    from longtail.registry import DATASETS, load_all

    load_all()

    @DATASETS.register("synthetic_lt_benchmark")
    def synthetic(cfg) -> DataBundle:
        classes = SYNTHETIC["num_classes"]
        counts = lt_counts(classes, cfg.max_count or 500, cfg.imbalance_factor or DEFAULT_IMBALANCE_FACTOR, cfg.profile)
        generator = torch.Generator().manual_seed(cfg.selection_seed)
        targets = torch.repeat_interleave(torch.arange(classes), torch.tensor(counts))
        images = torch.randint(0, 256, (len(targets), 3, 32, 32), dtype=torch.uint8, generator=generator)
        test_targets = torch.arange(classes).repeat(2)
        test_images = torch.randint(0, 256, (len(test_targets), 3, 32, 32), dtype=torch.uint8, generator=generator)
        names = [f"class{i}" for i in range(classes)]
        return DataBundle(train=ImageSet(targets, classes, names, images=images), val=None,
                          test=ImageSet(test_targets, classes, names, images=test_images), num_classes=classes,
                          class_names=names, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), image_size=32, channels=3)


def epoch_time(overrides: list[str], run_root: Path, device: str) -> dict[str, float]:
    from longtail.config import load_config
    from longtail.engine import builders
    from longtail.engine.distributed import init_distributed
    from longtail.engine.rundir import new_run_dir
    from longtail.engine.trainer import Trainer
    config = load_config(REPO / "configs/cifar10_lt/if100/ce.yaml",
                         ["train.epochs=1", "train.scale_schedule=true", "train.eval_every=0", f"output_dir={run_root}",
                          f"device={device}",
                          "name=scaling", *overrides])
    dist_info = init_distributed(device)
    bundle = builders.build_bundle(config)
    trainer = Trainer(config, builders.stage1_job(config, bundle, dist_info), bundle,
                      new_run_dir(config.output_dir, config.name), dist_info)
    trainer._train_epoch(0)  # warm-up: first-call kernel set-up is not part of the scaling
    start = time.perf_counter()
    stats = trainer._train_epoch(0)
    return {"train_images": len(bundle.train.targets), "epoch_seconds": time.perf_counter() - start,
            "images_per_second": stats["images_per_second"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "scaling.json"))
    args = parser.parse_args()
    register_synthetic()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for factor in (200, 100, 50, 10):
            rows.append({"sweep": "data", "imbalance_factor": factor,
                         **epoch_time([f"model.name={args.model}", f"data.imbalance_factor={factor}",
                                       f"data.root={ARCHIVE}"], Path(tmp), args.device)})
            print(json.dumps(rows[-1]), flush=True)
        for classes in (10, 100, 1000):
            SYNTHETIC["num_classes"] = classes
            rows.append({"sweep": "classes", "num_classes": classes,
                         **epoch_time([f"model.name={args.model}", "data.dataset=synthetic_lt_benchmark",
                                       "data.imbalance_factor=100", "data.max_count=500"], Path(tmp), args.device)})
            print(json.dumps(rows[-1]), flush=True)
    result = {"model": args.model, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "torch_threads": torch.get_num_threads(),
              "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
