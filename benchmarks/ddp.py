"""1 process vs 2 processes (torchrun, DDP, gloo on CPU) on the same recipe and global batch:
final metrics must agree within tolerance; the ratio of training seconds is the speed-up.

    python benchmarks/ddp.py [--epochs 3] [recipe overrides...]

Default: CIFAR-10-LT IF=100 with ``small_cnn`` (a ResNet-32 run is ``model.name=resnet32``). Each of
the 2 processes gets one of the 2 cores (OMP_NUM_THREADS=1); the single process gets both.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARCHIVE = REPO.parent / "shared" / "data" / "cifar10_jpg.tar.gz"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, threads: int, batch: int, overrides: list[str], out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MASTER_ADDR": "127.0.0.1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "longtail", "train", str(REPO / "configs/cifar10_lt/if100/ce.yaml"),
               f"output_dir={out}", f"data.batch_size={batch}", "device=cpu", *overrides]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    wall = time.perf_counter() - start
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    with (run / "metrics.csv").open() as handle:
        train_seconds = sum(float(row["epoch_seconds"]) for row in csv.DictReader(handle))
    test = json.loads((run / "metrics.json").read_text())["last"]["test"]
    return {"processes": nproc, "threads_per_process": threads, "batch_per_process": batch,
            "train_seconds": train_seconds, "wall_seconds": wall,
            **{k: test[k] for k in ("top1", "many_top1", "medium_top1", "few_top1", "ece", "nll")}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="global batch")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp.json"))
    args = parser.parse_args()
    overrides = [f"train.epochs={args.epochs}", "train.eval_every=0", "model.name=small_cnn",
                 "schedule.name=cosine", "schedule.warmup_epochs=0", f"data.root={ARCHIVE}", *args.overrides]
    with tempfile.TemporaryDirectory() as tmp:
        one = launch(1, 2, args.batch, overrides, Path(tmp) / "one")
        two = launch(2, 1, args.batch // 2, overrides, Path(tmp) / "two")
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "overrides": overrides,
              "one_process": one, "two_processes": two, "speed_up": one["train_seconds"] / two["train_seconds"],
              "top1_difference": two["top1"] - one["top1"]}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
