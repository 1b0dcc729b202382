"""Checkpoints written atomically (a crash never leaves a half-written file) and read with
``weights_only=True`` (a checkpoint cannot run code on load)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give a run directory (with checkpoints/last.pt) "
                              "or a .pt file written by `longtail train`")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for a bad file
        raise CheckpointError(f"cannot read checkpoint {path}: {error}") from error
