"""Run directories: never overwrite a previous run; record what produced the results."""
from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

import torch

from longtail.config import Config, dump_config


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """``output_dir/name``, or ``name-1``, ``name-2``... if it exists, so results are never overwritten."""
    base = Path(output_dir) / name
    candidate, suffix = base, 0
    while candidate.exists():
        suffix += 1
        candidate = base.with_name(f"{base.name}-{suffix}")
    candidate.mkdir(parents=True)
    return candidate


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
    }
    (run_dir / "env.json").write_text(json.dumps(env, indent=2))
