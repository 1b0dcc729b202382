"""``longtail train RECIPE --start-from RUN/checkpoints/epoch<k>.pt``: a new run that begins where
another run stood at the end of epoch k, instead of training those k epochs again.

Every random draw of an epoch is seeded from (seed, epoch) (``engine/trainer.py``), so two readings
that differ only after epoch k — an lr decay ×0.1 or ×0.01 at epoch 320 of 400, a DRW start — train
the same first k epochs bit for bit; the second reading can start from the first's checkpoint of
epoch k (kept by ``train.keep_epochs``) and pay only for the epochs after it. That is exact only when
nothing that acted during those k epochs differs, which ``check_start`` verifies against the config
recorded in the checkpoint: anything else that differs is refused by name."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from longtail.commands.common import RESUMABLE_KEYS, UserError, changed_keys
from longtail.config import Config, config_from_dict, epoch_settings
from longtail.engine.checkpoint import load_run_checkpoint
from longtail.engine.optim import build_scheduler
from longtail.engine.rundir import STARTED_FROM_FILE, folder_of_checkpoint, write_output

__all__ = ["StartPoint", "read_start_point", "check_start", "record_start"]

# what a start may change besides the schedule and late epoch settings: where the data is and how it is
# read, logging and stop points (--resume's list, less the run's length, which moves a cosine schedule and
# is checked with the schedule), and the bookkeeping of the new run
FREE_KEYS = tuple(key for key in RESUMABLE_KEYS if key != "train.epochs") + ("output_dir", "name")


class StartPoint:
    """A checkpoint another run starts from: its file, the epochs it holds, the config it was trained with."""

    def __init__(self, path: Path, state: dict[str, Any]) -> None:
        self.path = path  # the Trainer loads the weights and optimiser state from it; only these are read here
        self.epochs_done = int(state["epoch"]) + 1
        self.config = config_from_dict(state["config"], f"the config recorded in {path}")

    def describe(self) -> dict[str, Any]:
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return {"checkpoint": str(self.path), "sha256": digest, "epochs_done": self.epochs_done,
                "run": str(folder_of_checkpoint(self.path))}


def read_start_point(path: Path, device: torch.device) -> StartPoint:
    """The checkpoint ``--start-from`` names (a file: a run folder's last.pt moves on, a kept epoch does not)."""
    if path.is_dir():
        raise UserError(f"--start-from takes a checkpoint file (RUN/checkpoints/epoch<k>.pt, kept by "
                        f"train.keep_epochs), not a folder: {path}")
    if not path.is_file():
        raise UserError(f"--start-from: no checkpoint at {path}; train the source run with "
                        "train.keep_epochs=[k] to keep its epoch k")
    return StartPoint(path, load_run_checkpoint(path, map_location=device))


def _lr_factors_differ(start: StartPoint, config: Config, steps_per_epoch: int) -> str | None:
    """The first step of the shared epochs where the two schedules' lr factors differ, described; None if none."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    old = build_scheduler(probe, start.config.schedule, steps_per_epoch, start.config.train.epochs).lr_lambdas[0]
    new = build_scheduler(probe, config.schedule, steps_per_epoch, config.train.epochs).lr_lambdas[0]
    for step in range(start.epochs_done * steps_per_epoch):
        if old(step) != new(step):
            return (f"step {step} (epoch {step // steps_per_epoch + 1}): lr factor {new(step):.6g} here, "
                    f"{old(step):.6g} in the run it starts from")
    return None


def check_start(start: StartPoint, config: Config, steps_per_epoch: int) -> dict[str, tuple[Any, Any]]:
    """The settings in which ``config`` differs from the start point's, after checking that none of them
    acted during the epochs the checkpoint holds; a UserError names the ones that did."""
    k = start.epochs_done
    if k >= config.train.epochs:
        raise UserError(f"{start.path} holds {k} epochs and this run has train.epochs={config.train.epochs}: "
                        "nothing would be left to train")
    if config.train.select != "last":
        raise UserError(f"--start-from with train.select={config.train.select}: the best epoch may lie among the "
                        f"{k} taken over, whose weights this run does not have; start with train.select=last (the "
                        "default, the papers' protocol) or train this reading from the start")
    changes = changed_keys(start.config.model_dump(mode="json"), config.model_dump(mode="json"))
    late = set(epoch_settings(config, "train")) | set(epoch_settings(start.config, "train"))
    refused = []
    for key, (old, new) in changes.items():
        if key.startswith(FREE_KEYS) or key.startswith("schedule.") or key == "train.epochs":
            continue
        if key in late and _at_or_after(old, k) and _at_or_after(new, k):
            continue  # acts from epoch k on in both runs (0-based epoch k is the first one this run trains)
        refused.append(f"{key} ({old!r} there, {new!r} here)")
    if refused:
        raise UserError(f"--start-from {start.path}: this run differs from the one it starts from in "
                        f"{', '.join(refused)}, which acted during the {k} epochs the checkpoint holds. A start "
                        "may change only what acts after them (the lr schedule past epoch "
                        f"{k}, epoch settings at or after {k}) and how data is read; train this reading from the start")
    if any(key.startswith("schedule.") or key == "train.epochs" for key in changes):
        differ = _lr_factors_differ(start, config, steps_per_epoch)
        if differ is not None:
            raise UserError(f"--start-from {start.path}: the lr schedules differ inside the {k} epochs the checkpoint "
                            f"holds, at {differ}; a start may change the schedule only after epoch {k}")
    return changes


def _at_or_after(value: Any, epoch: int) -> bool:
    """Whether an epoch setting (a number or a list of them, 0-based) acts only from ``epoch`` on."""
    values = value if isinstance(value, list) else [value]
    return all(isinstance(item, (int, float)) and item >= epoch for item in values)


def record_start(run_dir: Path, start: StartPoint, changes: dict[str, tuple[Any, Any]]) -> None:
    """``RUN/started_from.json``: which checkpoint (sha256) the run began from and what it changed."""
    record = {**start.describe(),
              "changed": {key: {"there": old, "here": new} for key, (old, new) in changes.items()
                          if not key.startswith(("output_dir", "name"))}}
    write_output(run_dir / STARTED_FROM_FILE, json.dumps(record, indent=2), exist="replace")
