"""Checkpoints written atomically (a crash, a full disk or Ctrl-C never leaves a half-written file,
and the previous checkpoint survives) and read with ``weights_only=True`` (a checkpoint cannot run
code on load)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from longtail.config import Config
from longtail.engine.rundir import last_checkpoint


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the file and what to do."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to a temporary file beside ``path``, then rename it over ``path``. On any failure
    (disk full, read-only folder, interrupt) the temporary file is removed and ``path`` is untouched."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, (OSError, RuntimeError)) and not isinstance(error, CheckpointError):
            kept = f"the previous {path.name} is kept" if path.is_file() else "no earlier checkpoint exists"
            reason = getattr(error, "strerror", None) or str(error).splitlines()[0]
            raise CheckpointError(f"cannot write checkpoint {path}: {reason}; {kept}. Free disk space or make "
                                  "the folder writable, then continue with `longtail train --resume "
                                  f"{path.parent.parent}`") from None
        raise
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = last_checkpoint(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; give a run directory (with checkpoints/last.pt) "
                              "or a .pt file written by `longtail train`")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001 - torch raises many types for a bad file
        # torch's own message may advise weights_only=False, which would run the file's code: never repeat it
        state = None
    if not isinstance(state, dict):
        raise CheckpointError(f"cannot read checkpoint {path} ({path.stat().st_size} bytes): it is truncated, "
                              "corrupt or not a checkpoint written by longtail. Use another checkpoint of the run "
                              "(best.pt, or an earlier copy) or train again")
    return state


RUN_CHECKPOINT_KEYS = ("model", "config", "epoch")


def run_checkpoint(model: torch.nn.Module, config: Config, epoch: int, **extra: Any) -> dict[str, Any]:
    """The one schema of a run's checkpoint: the epoch it ends (0-based), the model's weights and the
    config it was trained with (``RUN_CHECKPOINT_KEYS``), plus what its writer adds (the trainer: optimiser,
    schedule, scaler, loss state, history, best; stage 2: the head specs; a finished stage 2: ``finished``)."""
    return {"epoch": epoch, "model": model.state_dict(), "config": config.model_dump(mode="json"), **extra}


def load_run_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint of a longtail run (the model, the config it was trained with, its epoch): a file
    that loads but lacks them (another program's weights, a saved calibrator) is refused by name."""
    state = load_checkpoint(path, map_location)
    missing = [key for key in RUN_CHECKPOINT_KEYS if key not in state]
    if missing:
        raise CheckpointError(f"{path} is a PyTorch file but not a checkpoint of a longtail run (it has no "
                              f"{', '.join(repr(k) for k in missing)}; its keys: {', '.join(map(str, list(state)[:8]))}). "
                              "Give a run directory or one of its RUN/checkpoints/*.pt files")
    return state
