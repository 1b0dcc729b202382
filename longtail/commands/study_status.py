"""``longtail study STUDY.yaml --status``: where every run of a long study stands, without its logs.

A study of full schedules runs for days, in the background, across machines (``--pack``/``--unpack``).
Its own progress bar is in a log file; this answers "where is it?" from the run folders alone: each
run finished (when), under way or stopped at an epoch of a named step with the pace of its last epochs
and the time that step has left, held by which live process, or not started. It only reads (metrics.csv
rows, markers, claims), so it works on a running, a stopped and a just-unpacked study alike.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import yaml

from longtail.engine.rundir import (CONFIG_FILE, METRICS_CSV, STUDY_MARKER, lock_holder, recipe_stage2_dir,
                                    stage2_label)


class Step(Protocol):
    """What this module reads of a study step (``study.Step``; study.py imports this module, so not it)."""

    argv: list[str]
    output: Path
    config: Any

    def done(self) -> bool: ...


class StudyRun(Protocol):
    """What this module reads of a planned run (``study.StudyRun``)."""

    cell: str
    run_dir: Path
    steps: Sequence[Step]

    @property
    def finished(self) -> bool: ...

    @property
    def claim_file(self) -> Path: ...

    @property
    def start(self) -> tuple[Path, Path] | None: ...  # (source run, its kept checkpoint) for start_from

    def unchanged(self) -> bool: ...

    def has_progress(self) -> bool: ...


PACE_EPOCHS = 5  # the pace is the mean of this many last epochs (every 5th epoch evaluates, so one cycle)


@dataclass
class StepProgress:
    """How far one training stage of a step has come, read from its metrics.csv."""

    label: str
    epochs_done: int
    epochs: int | None
    seconds_per_epoch: float | None

    def describe(self) -> str:
        text = f"{self.label} at epoch {self.epochs_done}" + (f" of {self.epochs}" if self.epochs else "")
        if self.seconds_per_epoch is not None:
            text += f", {self.seconds_per_epoch:.1f} s an epoch"
            if self.epochs:
                left = max(self.epochs - self.epochs_done, 0) * self.seconds_per_epoch
                text += f", {_duration(left)} left in it"
        return text


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"


def _epochs_in_csv(folder: Path) -> tuple[int, float | None]:
    """(the last epoch written to ``folder``'s metrics.csv, the mean seconds of its last epochs)."""
    path = folder / METRICS_CSV
    if not path.is_file():
        return 0, None
    with path.open(newline="") as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("epoch")]
    if not rows:
        return 0, None
    seconds = [float(row["epoch_seconds"]) for row in rows[-PACE_EPOCHS:] if row.get("epoch_seconds")]
    return int(rows[-1]["epoch"]), (sum(seconds) / len(seconds) if seconds else None)


def _stage2_epochs(folder: Path) -> int | None:
    """A stage-2 folder's planned epochs, from the config.yaml it wrote when it started."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        return None
    stage2 = (yaml.safe_load(path.read_text()) or {}).get("stage2") or {}
    return stage2.get("epochs")


def _progress(step: Step, run_dir: Path) -> StepProgress | None:
    """Where the step under way stands; None for a step with no epochs (calibration) or not started."""
    if step.argv[0] == "train":
        config = step.config
        stage2_dir = recipe_stage2_dir(run_dir)
        if config is not None and config.stage2 is not None and (stage2_dir / METRICS_CSV).is_file():
            done, pace = _epochs_in_csv(stage2_dir)
            return StepProgress("its stage 2", done, config.stage2.epochs, pace)
        done, pace = _epochs_in_csv(run_dir)
        return StepProgress("stage 1", done, config.train.epochs if config else None, pace) if done else None
    if step.argv[0] == "stage2":
        done, pace = _epochs_in_csv(step.output)
        label = f"stage 2 {stage2_label(step.output)}"
        return StepProgress(label, done, _stage2_epochs(step.output), pace) if done else None
    return None


def run_status(run: StudyRun) -> str:
    """One line: the run, its state, and for an unfinished one the step it is on and what follows."""
    name = f"{run.cell}/{run.run_dir.name}"
    if run.finished:
        finished = json.loads((run.run_dir / STUDY_MARKER).read_text()).get("finished", "")
        return f"{name}: finished {finished}".rstrip()
    holder = lock_holder(run.claim_file)
    changed = "" if run.unchanged() else " (made from another version of its recipe: the study refuses it)"
    if holder is None and not run.has_progress():
        starts = ""
        if run.start is not None:  # begins at another run's kept checkpoint (start_from)
            source, checkpoint = run.start
            kept = "kept" if checkpoint.is_file() else "not kept yet"
            starts = f"; starts from {source.parent.name}/{source.name}'s {checkpoint.name} ({kept})"
        return f"{name}: not started{starts}{changed}"
    state = f"running ({holder})" if holder else "stopped (the next `longtail study` resumes it)"
    left = [step for step in run.steps if not step.done()]
    if not left:
        return f"{name}: {state}, every step done, not yet recorded{changed}"
    current = _progress(left[0], run.run_dir)
    if current is not None:
        where = current.describe()
    else:  # a calibration, or a step with no finished epoch yet
        folder = run.run_dir if left[0].argv[0] == "train" else left[0].output
        where = f"`longtail {left[0].argv[0]}` " + ("started, no epoch written yet" if folder.exists() else "next")
    after = len(left) - 1
    steps_done = len(run.steps) - len(left)
    return (f"{name}: {state}; step {steps_done + 1} of {len(run.steps)}, {where}"
            + (f"; {after} step{'s' if after != 1 else ''} after it" if after else "") + changed)


def study_status(study_name: str, study_dir: Path, runs: list[StudyRun]) -> str:
    """The whole study: a summary line, then one line per run."""
    finished = sum(run.finished for run in runs)
    lines = [f"study {study_name} ({study_dir}): {finished} of {len(runs)} runs finished"]
    lines += [f"  {run_status(run)}" for run in runs]
    return "\n".join(lines)
