"""Training and evaluation throughput against the machine's ceiling, measured side by side in one run.

1. ceiling   — a plain training step written in ``plain_step.py``, not longtail's model or settings:
               ResNet-32 (or a 3-expert ResNet-32 for a multi-expert --model), SGD, cross-entropy,
               forward + backward + step on pre-made tensors, in every precision (float32, bfloat16
               autocast where the hardware has it) and memory format (NCHW, channels_last); the
               fastest variant is the ceiling, for training and for a bare no_grad forward alike.
2. longtail  — full epochs of longtail's Trainer on CIFAR-10-LT at its defaults (device-resident
               uint8 images, batched augmentation, sampler, loss and its terms, logging, progress bar).
3. eval      — longtail's test-set pass (``Trainer.evaluate``: loader, normalisation, gather, metrics)
               against the plain no_grad forward of the same batch size.
4. reference — the loop the seeds' public code uses: torchvision ImageFolder over the JPEG files,
               PIL transforms (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize),
               DataLoader workers, the same model/optimizer (optional, --reference).

Why rounds: a CPU thread pool and the allocator need ~10 steps to settle (the first steps run at half
speed), and these machines are shared and noisy. So everything is timed warm (``--warmup`` steps first,
and the trainer's first epoch is a warm-up too), ceiling and trainer alternate round by round so both
see the same machine, and the best round of each is compared (``--rounds``; medians are kept too).

    python benchmarks/throughput.py                         # ResNet-32, CE
    python benchmarks/throughput.py --model shike_resnet32 --loss shike
    python benchmarks/throughput.py --overrides train.amp=none train.channels_last=no   # float32 NCHW

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
CIFAR100_LT_TRAIN, CIFAR100_TEST = 10_847, 10_000

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plain_step import all_variants  # noqa: E402  (the benchmark's own independent model)


def make_config(args: argparse.Namespace, run_root: Path):
    from longtail.config import load_config
    overrides = [f"model.name={args.model}", f"loss.name={args.loss}", f"data.root={args.data}",
                 "train.epochs=1", "train.scale_schedule=true", "train.eval_every=0", f"output_dir={run_root}",
                 f"device={args.device}",
                 f"data.num_workers={args.workers}", "name=throughput", *args.overrides]
    return load_config(REPO / "configs/cifar10_lt/if100/ce.yaml", overrides)


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
        self.steps, self.num_classes = len(self.trainer.job.loader), bundle.num_classes
        self.precision = self.trainer.precision.label

    def train_img_s(self) -> float:
        stats = self.trainer._train_epoch(self.epoch)
        self.epoch += 1
        return stats["images_per_second"]

    def eval_img_s(self) -> float:
        _sync(self.trainer.device)
        start = time.perf_counter()
        self.trainer.evaluate("test")
        return self.test_size / (time.perf_counter() - start)


def measure(config, device: torch.device, rounds: int, steps: int, warmup: int, experts: int) -> dict:
    """The plain step in every precision x memory format, and longtail's trainer, alternately,
    ``rounds`` times each after a warm-up of all of them; the ceiling is the best plain variant."""
    trainer = TrainerEpochs(config, device)
    variants = all_variants(experts, str(device), trainer.num_classes, config.data.batch_size,
                            config.data.eval_batch_size)
    eval_steps = max(1, trainer.test_size // config.data.eval_batch_size)
    for variant in variants:
        variant.train_img_s(warmup)
        variant.eval_img_s(2)
    trainer.train_img_s()  # warm-up epoch, not counted
    trainer.eval_img_s()
    rows: dict[str, list[float]] = {"longtail": [], "eval_longtail": []}
    for variant in variants:
        rows[f"plain_{variant.name}"], rows[f"eval_plain_{variant.name}"] = [], []
    for _ in range(rounds):
        for variant in variants:
            rows[f"plain_{variant.name}"].append(variant.train_img_s(steps))
        rows["longtail"].append(trainer.train_img_s())
        for variant in variants:
            rows[f"eval_plain_{variant.name}"].append(variant.eval_img_s(eval_steps))
        rows["eval_longtail"].append(trainer.eval_img_s())
    result = {"longtail_precision": trainer.precision, "longtail_steps_per_epoch": trainer.steps,
              "rounds": rounds, "per_round_img_s": rows}
    for name, values in rows.items():
        result[f"{name}_img_s"] = max(values)
        result[f"{name}_img_s_median"] = statistics.median(values)
    train_best = max((v for v in variants), key=lambda v: result[f"plain_{v.name}_img_s"])
    eval_best = max((v for v in variants), key=lambda v: result[f"eval_plain_{v.name}_img_s"])
    result["ceiling"] = {"train": train_best.name, "eval": eval_best.name}
    result["ceiling_img_s"] = result[f"plain_{train_best.name}_img_s"]
    result["eval_ceiling_img_s"] = result[f"eval_plain_{eval_best.name}_img_s"]
    result["longtail_over_ceiling"] = result["longtail_img_s"] / result["ceiling_img_s"]
    result["longtail_over_ceiling_median"] = statistics.median(
        t / c for t, c in zip(rows["longtail"], rows[f"plain_{train_best.name}"]))
    result["eval_over_ceiling"] = result["eval_longtail_img_s"] / result["eval_ceiling_img_s"]
    result["eval_over_ceiling_median"] = statistics.median(
        t / c for t, c in zip(rows["eval_longtail"], rows[f"eval_plain_{eval_best.name}"]))
    # what the measured speeds imply for a full schedule (CIFAR-100-LT IF 100: 10,847 training
    # images, 10,000 test images evaluated once per epoch as the recipes do)
    epoch_s = CIFAR100_LT_TRAIN / result["longtail_img_s"] + CIFAR100_TEST / result["eval_longtail_img_s"]
    result["implied_cifar100_lt_200_epochs_hours"] = round(200 * epoch_s / 3600, 2)
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
    parser.add_argument("--experts", type=int, default=None,
                        help="experts of the plain ceiling model (default: 3 for a multi-expert --model, else 1)")
    parser.add_argument("--overrides", nargs="*", default=[],
                        help="config overrides of longtail's side, e.g. train.amp=none train.channels_last=no")
    parser.add_argument("--data", default=str(ARCHIVE))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rounds", type=int, default=3, help="alternating ceiling/trainer rounds (best is kept)")
    parser.add_argument("--steps", type=int, default=40, help="timed ceiling steps per round (and reference)")
    parser.add_argument("--warmup", type=int, default=12, help="untimed ceiling steps before the first round")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers of the reference loop")
    parser.add_argument("--reference", action="store_true", help="also time the seeds' ImageFolder loop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.experts is None:
        args.experts = 3 if any(word in args.model for word in ("shike", "ride", "expert")) else 1

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
        result.update(measure(config, device, args.rounds, args.steps, args.warmup, args.experts))
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
