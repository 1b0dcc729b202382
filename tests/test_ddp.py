"""Real DistributedDataParallel: two CPU processes (gloo) launched by torchrun, against one process
with the same global batch. Samplers shard ``rank::world_size``, so both see the same samples per
step and DDP averages the two half-batch gradients into the full-batch gradient."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ddp

COMMON = ["train.epochs=3", "optim.lr=0.05", "schedule.name=cosine", "data.augment.crop_padding=0",
          "data.augment.flip=false", "device=cpu", "data.val_fraction=0.2"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(nproc: int, output_dir: Path, batch_size: int, extra: list[str]) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "longtail", "train", f"output_dir={output_dir}",
               f"data.batch_size={batch_size}", *COMMON, *extra]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (run,) = [p for p in output_dir.iterdir() if p.is_dir()]
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.parametrize("extra", [[], ["data.sampler=class_balanced"]], ids=["instance", "class_balanced"])
def test_two_process_ddp_matches_one_process(tmp_path, extra):
    single = launch(1, tmp_path / "one", 64, extra)["last"]
    double = launch(2, tmp_path / "two", 32, extra)["last"]
    for split in ("test", "val"):
        assert double[split]["num_samples"] == single[split]["num_samples"]
        assert double[split]["top1"] == pytest.approx(single[split]["top1"], abs=0.02)
        assert double[split]["nll"] == pytest.approx(single[split]["nll"], rel=0.05)
