"""Training and evaluation throughput against the compute ceiling, measured side by side in one run.

1. ceiling   — forward + backward + SGD step of the model on pre-made tensors already on the device:
               the compute ceiling, no data pipeline at all.
2. longtail  — full epochs of longtail's Trainer on CIFAR-10-LT (device-resident uint8 images,
               batched augmentation, sampler, loss and its terms, logging, progress bar).
3. eval      — longtail's test-set pass (``Trainer.evaluate``: loader, normalisation, gather, metrics)
               against a bare ``torch.no_grad()`` forward of the same batch size on pre-made tensors.
4. reference — the loop the seeds' public code uses: torchvision ImageFolder over the JPEG files,
               PIL transforms (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize),
               DataLoader workers, the same model/optimizer (optional, --reference).

Why rounds: a CPU thread pool and the allocator need ~10 steps to settle (the first steps run at half
speed), and these machines are shared and noisy. So everything is timed warm (``--warmup`` steps first,
and the trainer's first epoch is a warm-up too), ceiling and trainer alternate round by round so both
see the same machine, and the best round of each is compared (``--rounds``; medians are kept too).

    python benchmarks/throughput.py                         # ResNet-32, CE
    python benchmarks/throughput.py --model shike_resnet32 --loss shike

Prints and writes JSON (benchmarks/results/throughput-<model>-<device>.json).
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tarfile
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10_jpg.tar.gz"


def make_config(args: argparse.Namespace, run_root: Path):
    from longtail.config import load_config
    overrides = [f"model.name={args.model}", f"loss.name={args.loss}", f"data.root={args.data}",
                 "train.epochs=1", "train.eval_every=0", f"output_dir={run_root}", f"device={args.device}",
                 f"data.num_workers={args.workers}", "name=throughput"]
    return load_config(REPO / "configs/cifar10_lt/if100/ce.yaml", overrides)


def _timed(device: torch.device, fn, steps: int, images_per_step: int) -> float:
    """img/s of ``steps`` calls of ``fn`` (device work finished before the clock stops)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return steps * images_per_step / (time.perf_counter() - start)


class Ceiling:
    """Bare forward + backward + SGD step (and bare no_grad forward) on pre-made device tensors."""

    def __init__(self, config, device: torch.device) -> None:
        from longtail.engine import builders
        from longtail.engine.optim import build_optimizer
        from longtail.losses.terms import as_terms
        from longtail.registry import LOSSES
        bundle = builders.build_bundle(config)
        self.device, self.batch = device, config.data.batch_size
        self.model = builders.build_model(config, bundle, device)
        self.loss_fn = LOSSES.build(config.loss.name, config.loss.params, class_counts=bundle.train_counts,
                                    num_classes=bundle.num_classes,
                                    num_samples=len(bundle.train.targets)).to(device)
        self.optimizer = build_optimizer(self.model.parameters(), config.optim, device)
        self.dtype = builders.amp_dtype(config, device)
        self.as_terms = as_terms
        self.images = torch.randn(self.batch, 3, 32, 32, device=device)
        self.eval_batch = config.data.eval_batch_size
        self.eval_images = torch.randn(self.eval_batch, 3, 32, 32, device=device)
        if builders.use_channels_last(config, device):
            self.images = self.images.contiguous(memory_format=torch.channels_last)
            self.eval_images = self.eval_images.contiguous(memory_format=torch.channels_last)
        self.targets = torch.randint(0, bundle.num_classes, (self.batch,), device=device)

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            loss = self.as_terms(self.loss_fn(self.model(self.images), self.targets)).total.mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def forward(self) -> None:
        self.model.eval()
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype is not None):
            self.model(self.eval_images)
        self.model.train()

    def train_img_s(self, steps: int) -> float:
        return _timed(self.device, self.step, steps, self.batch)

    def eval_img_s(self, steps: int) -> float:
        return _timed(self.device, self.forward, steps, self.eval_batch)


class TrainerEpochs:
    """The real ``Trainer`` of a CIFAR-10-LT recipe, one full epoch per call."""

    def __init__(self, config, device: torch.device) -> None:
        from longtail.engine import builders
        from longtail.engine.distributed import DistInfo
        from longtail.engine.rundir import new_run_dir
        from longtail.engine.trainer import Trainer, seed_everything
        run_dir = new_run_dir(config.output_dir, config.name)
        dist_info = DistInfo(0, 1, 0, device)
        seed_everything(config.seed)
        bundle = builders.build_bundle(config)
        self.trainer = Trainer(config, builders.stage1_job(config, bundle, dist_info), bundle, run_dir, dist_info)
        self.epoch, self.test_size = 0, len(bundle.test.targets)
        self.steps = len(self.trainer.job.loader)

    def train_img_s(self) -> float:
        stats = self.trainer._train_epoch(self.epoch)
        self.epoch += 1
        return stats["images_per_second"]

    def eval_img_s(self) -> float:
        _sync(self.trainer.device)
        start = time.perf_counter()
        self.trainer.evaluate("test")
        return self.test_size / (time.perf_counter() - start)


def measure(config, device: torch.device, rounds: int, steps: int, warmup: int) -> dict:
    """Ceiling and trainer alternately, ``rounds`` times each, after a warm-up of both."""
    ceiling, trainer = Ceiling(config, device), TrainerEpochs(config, device)
    eval_steps = max(1, trainer.test_size // ceiling.eval_batch)
    ceiling.train_img_s(warmup)
    ceiling.eval_img_s(2)
    trainer.train_img_s()  # warm-up epoch, not counted
    trainer.eval_img_s()
    rows: dict[str, list[float]] = {"ceiling": [], "longtail": [], "eval_ceiling": [], "eval_longtail": []}
    for _ in range(rounds):
        rows["ceiling"].append(ceiling.train_img_s(steps))
        rows["longtail"].append(trainer.train_img_s())
        rows["eval_ceiling"].append(ceiling.eval_img_s(eval_steps))
        rows["eval_longtail"].append(trainer.eval_img_s())
    result = {"longtail_steps_per_epoch": trainer.steps, "rounds": rounds, "per_round_img_s": rows}
    for name, values in rows.items():
        result[f"{name}_img_s"] = max(values)
        result[f"{name}_img_s_median"] = statistics.median(values)
    result["longtail_over_ceiling"] = result["longtail_img_s"] / result["ceiling_img_s"]
    result["longtail_over_ceiling_median"] = statistics.median(
        t / c for t, c in zip(rows["longtail"], rows["ceiling"]))
    result["eval_over_bare_forward"] = result["eval_longtail_img_s"] / result["eval_ceiling_img_s"]
    return result


def extracted_tree(archive: Path) -> Path:
    """The JPEG tree the reference loop reads, extracted once to a cache folder."""
    target = Path.home() / ".cache" / "longtail" / "extracted" / archive.name.replace(".tar.gz", "")
    if not (target / "train").is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp, tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
            roots = [p for p in Path(tmp).iterdir() if p.is_dir()]
            source = Path(tmp) if (Path(tmp) / "train").is_dir() else roots[0]
            source.rename(target)
    return target


def time_reference(config, device: torch.device, steps: int, warmup: int, workers: int) -> float:
    """The seeds' loop: ImageFolder + PIL transforms + DataLoader workers + the same model."""
    import torchvision
    import torchvision.transforms as T
    from longtail.engine import builders
    from longtail.engine.optim import build_optimizer
    from longtail.losses.terms import as_terms
    from longtail.registry import LOSSES
    bundle = builders.build_bundle(config)
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(bundle.mean, bundle.std)])
    dataset = torchvision.datasets.ImageFolder(str(extracted_tree(Path(config.data.root)) / "train"), transform)
    # the LT subset in the same class sizes (which images does not matter for speed)
    keep, seen = [], [0] * bundle.num_classes
    for index, (_, label) in enumerate(dataset.samples):
        if seen[label] < bundle.train_counts[label]:
            seen[label] += 1
            keep.append(index)
    subset = torch.utils.data.Subset(dataset, keep)
    loader = torch.utils.data.DataLoader(subset, batch_size=config.data.batch_size, shuffle=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         drop_last=True, persistent_workers=workers > 0)
    model = builders.build_model(config, bundle, device)
    loss_fn = LOSSES.build(config.loss.name, config.loss.params, class_counts=bundle.train_counts,
                           num_classes=bundle.num_classes, num_samples=len(keep)).to(device)
    optimizer = build_optimizer(model.parameters(), config.optim, device)
    dtype = builders.amp_dtype(config, device)
    done, start = 0, None
    while done < warmup + steps:
        for images, targets in loader:
            if done == warmup:
                _sync(device)
                start = time.perf_counter()
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = as_terms(loss_fn(model(images), targets)).total.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == warmup + steps:
                break
    _sync(device)
    return steps * config.data.batch_size / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--data", default=str(ARCHIVE))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="alternating ceiling/trainer rounds (best is kept)")
    parser.add_argument("--steps", type=int, default=40, help="timed ceiling steps per round (and reference)")
    parser.add_argument("--warmup", type=int, default=12, help="untimed ceiling steps before the first round")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    parser.add_argument("--reference", action="store_true", help="also time the seeds' ImageFolder loop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from longtail.engine.distributed import resolve_device
    from longtail.engine.rundir import device_name
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as run_root:
        config = make_config(args, Path(run_root))
        result = {"model": args.model, "loss": args.loss, "device": str(device),
                  "device_name": device_name(device),
                  "cpu_threads": torch.get_num_threads(), "batch_size": config.data.batch_size,
                  "eval_batch_size": config.data.eval_batch_size,
                  "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
        result.update(measure(config, device, args.rounds, args.steps, args.warmup))
        if args.reference:
            result["reference_img_s"] = time_reference(config, device, args.steps, args.warmup, args.workers)
            result["longtail_over_reference"] = result["longtail_img_s"] / result["reference_img_s"]
        result["peak_host_memory_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    write_result(result, args.out, f"throughput-{args.model}-{device.type}.json")
    return 0


def write_result(result: dict, out: str | None, default_name: str) -> None:
    """Print the result and write it as JSON to ``out`` (default: benchmarks/results/<default_name>)."""
    print(json.dumps(result, indent=2))
    path = Path(out) if out else REPO / "benchmarks" / "results" / default_name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    raise SystemExit(main())
