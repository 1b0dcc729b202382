"""Run directories: never overwrite a previous run; record what produced the results (and every
later change of the config, in ``config_history.jsonl``); one process works in a run at a time
(``RUN/.lock``)."""
from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch

from longtail.config import Config, dump_config
from longtail.engine.precision import resolve_precision


class RunDirError(RuntimeError):
    """A run directory cannot be used (another process holds it); the message says what to do."""


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """``output_dir/name``, or ``name-1``, ``name-2``... if it exists, so results are never overwritten.
    Claimed with an exclusive ``mkdir``, so two runs started at the same instant get different folders."""
    base = Path(output_dir) / name
    base.parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while True:
        candidate = base if suffix == 0 else base.with_name(f"{base.name}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1


def discard_if_unstarted(run_dir: Path) -> bool:
    """Remove a run directory a failed command created before anything was trained in it (it holds
    only the run record), so failures leave no empty ``NAME-N`` folders. Returns whether it did."""
    if not run_dir.is_dir() or (run_dir / "checkpoints").exists() or (run_dir / "metrics.json").exists():
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an advisory ``flock``, released by the kernel even on ``kill -9``) while
    a command works in the run, so two processes never train or resume one run at once."""
    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise RunDirError(f"{run_dir} is in use by {holder}; wait for it to finish (or stop it) before "
                          "resuming or training in this run") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def record_config_change(run_dir: Path, config: Config, changes: dict[str, tuple[Any, Any]]) -> None:
    """Rewrite ``config.yaml`` with the config now in force and append what changed (and when, and
    by which command) to ``config_history.jsonl``."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
             "changed": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}
    with open(run_dir / "config_history.jsonl", "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(dump_config(config))
    os.replace(tmp, run_dir / "config.yaml")


def git_commit() -> dict[str, object]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU's, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"


def write_run_record(run_dir: Path, config: Config, device: torch.device, world_size: int) -> None:
    """The resolved config, the code version and the environment, beside the results."""
    (run_dir / "config.yaml").write_text(dump_config(config))
    env = {
        "git": git_commit(),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision": resolve_precision(config.train.amp, config.train.channels_last, device).label,
    }
    (run_dir / "env.json").write_text(json.dumps(env, indent=2))
