"""Run access: what a trained run folder holds, read back. Resolve a checkpoint (``last``, ``best``, a
file), load the model of a run, a stage-2 folder or a multi-expert run with the config, data and
evaluation settings it was trained with, and list, find and load the calibrators fitted on it.

The commands (eval, calibrate, predict, export, ``--shifts``) ask this module; the layout it reads
(every file and folder name) is ``engine.rundir``'s, and scoring is ``engine.evaluation.evaluate``.
It sits below ``commands/`` and above ``engine/``, ``calibration/`` and ``data/``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longtail.calibration.calibrators import Calibrator, load_calibrator
from longtail.config import Config, apply_overrides, check_folder_name, config_from_dict
from longtail.data import DataBundle, ImageSet
from longtail.data.augment import BatchAugment
from longtail.engine import builders
from longtail.engine.checkpoint import load_run_checkpoint
from longtail.engine.distributed import DistInfo, init_distributed
from longtail.engine.evaluation import EvalSettings, Evaluation, LogitCalibrator, evaluate
from longtail.engine.rundir import (CHECKPOINT_SUFFIX, calibrator_files, checkpoint_path, checkpoints_dir,
                                    folder_of_checkpoint, is_checkpoint_file, metrics_file)

__all__ = ["UserError", "DATA_DEFINITION", "as_trained", "changed_keys", "run_dir_of", "resolve_checkpoint",
           "LoadedRun", "load_run", "split_of", "fitted_calibrators", "find_calibrator", "calibrator_checkpoint"]


class UserError(RuntimeError):
    """Something the user can fix; printed without a traceback."""


# what the training images, their labels and the shot groups are: fixed once a run is trained
DATA_DEFINITION = ("data.dataset", "data.imbalance_factor", "data.profile", "data.max_count", "data.selection",
                   "data.selection_seed", "data.val_fraction", "data.val_source", "data.image_size", "data.bad_files")

FILE_DATASETS = ("image_folder", "list_files")
SIZE_BEFORE_RECORDING = 224  # the one size file datasets had before issue 24


def as_trained(config: Config) -> Config:
    """A trained run's config as it was trained: since issue 24 a file dataset's run records the image size
    the data chose (``data.image_size``); one without it was trained before, when that size was always 224,
    so it is decoded at 224 again instead of at the images' own size."""
    if config.data.dataset in FILE_DATASETS and config.data.image_size is None:
        config.data.image_size = SIZE_BEFORE_RECORDING
    return config


def _flat(raw: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(raw, dict):
        return {prefix: raw}
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def changed_keys(before: dict[str, Any], after: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{dotted.key: (old, new)}`` for every value that differs between two config dicts."""
    old, new = _flat(before), _flat(after)
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new)) if old.get(key) != new.get(key)}


def run_dir_of(path: Path) -> Path:
    """A run directory from a run directory or one of its checkpoint files."""
    if path.is_dir():
        return path
    if is_checkpoint_file(path):
        return folder_of_checkpoint(path)
    raise UserError(f"{path} is neither a run directory nor a checkpoint inside one (RUN/checkpoints/*.pt)")


def resolve_checkpoint(path: Path, checkpoint: str) -> tuple[Path, Path]:
    """(run directory, checkpoint file) from a run directory + name, or a checkpoint file."""
    if path.is_file():
        return folder_of_checkpoint(path), path
    file = checkpoint_path(path, checkpoint)
    if not file.is_file():
        available = sorted(p.name for p in checkpoints_dir(path).glob("*" + CHECKPOINT_SUFFIX))
        raise FileNotFoundError(f"no checkpoint {file}; available in {path}: {', '.join(available) or 'none'}"
                                + (" ('best' exists only for runs with train.select=val or test)"
                                   if checkpoint == "best" else ""))
    return path, file


@dataclass
class LoadedRun:
    """A trained model with the config, data and evaluation transform it was trained with."""

    run_dir: Path
    file: Path
    state: dict[str, Any]
    config: Config
    bundle: DataBundle
    model: torch.nn.Module
    augment: BatchAugment
    dist_info: DistInfo

    @property
    def evaluation(self) -> EvalSettings:
        """How the run scores its model (``engine.evaluation``): its evaluation view, loader settings,
        precision and ``eval.tta``."""
        return builders.eval_settings(self.config, self.bundle, builders.precision(self.config, self.dist_info.device))

    def evaluate(self, imageset: ImageSet, *, calibrator: LogitCalibrator | None = None,
                 keep_features: bool = False, test_time_augment: bool = True, metrics: bool = True,
                 probabilities: bool = False) -> Evaluation:
        """:func:`longtail.engine.evaluation.evaluate` of the run's model on ``imageset``."""
        return evaluate(self.model, imageset, self.evaluation, self.dist_info, self.bundle.train_counts,
                        calibrator=calibrator, keep_features=keep_features, test_time_augment=test_time_augment,
                        metrics=metrics, probabilities=probabilities)


def load_run(path: Path, checkpoint: str = "last", overrides: list[str] | None = None,
             dist_info: DistInfo | None = None) -> LoadedRun:
    """The model of a run directory, a stage-2 folder (its re-built heads restored) or a checkpoint
    file, on the run's device (``dist_info``, else the one ``init_distributed("auto")`` picks), in eval
    mode. ``overrides`` may change where the data is and how it is read, never which data it is."""
    run_dir, file = resolve_checkpoint(path, checkpoint)
    dist_info = dist_info or init_distributed("auto")
    state = load_run_checkpoint(file, map_location=dist_info.device)
    trained = as_trained(config_from_dict(state["config"], str(file)))
    config = as_trained(config_from_dict(apply_overrides(state["config"], list(overrides or [])),
                                         f"{file} (+ overrides)"))
    redefined = [key for key in changed_keys(trained.model_dump(mode="json"), config.model_dump(mode="json"))
                 if key in DATA_DEFINITION]
    if redefined:
        raise UserError(f"{', '.join(redefined)} would change which images the run was trained on, and so its "
                        "shot groups and any validation split (a split carved now can hold images the model was "
                        "trained on). Eval takes the run's data as it was trained; only where the data is "
                        "(data.root, the list files, data.cache_dir) and how it is read may change. "
                        "Train a new run to use other data settings")
    bundle = builders.build_bundle(config)
    model = builders.load_trained_model(config, bundle, state, dist_info.device).eval()
    return LoadedRun(run_dir, file, state, config, bundle, model, builders.build_augment(config, bundle), dist_info)


def split_of(run: LoadedRun, split: str) -> ImageSet:
    """The run's ``split`` images; a run trained without a validation split has none to evaluate."""
    imageset = getattr(run.bundle, split)
    if imageset is None:
        raise UserError(f"the run has no {split} split: it was trained with data.val_fraction=0, so every training "
                        "image was seen and a split carved now would score training images. Use --split test, "
                        "or train again with data.val_fraction=0.2 to keep a validation split")
    return imageset


def fitted_calibrators(run_dir: Path) -> dict[str, Path]:
    """Every calibrator ``longtail calibrate`` saved for the run, by folder name, oldest first."""
    return {file.parent.name: file for file in calibrator_files(run_dir)}


def calibrator_checkpoint(calibrator_file: Path) -> str | None:
    """The checkpoint a saved calibrator was fitted on (from its folder's metrics.json), if recorded."""
    record = metrics_file(calibrator_file.parent)
    return json.loads(record.read_text()).get("checkpoint") if record.is_file() else None


def find_calibrator(run_dir: Path, name: str | None = None, checkpoint: Path | None = None) -> tuple[str, Calibrator]:
    """(name, calibrator): the one saved in ``RUN/calibration/<name>/``, or the last one fitted. With
    ``checkpoint``, a calibrator fitted on another checkpoint of the run is refused: it was fitted to
    that model's logits, and applying it to these would silently miscalibrate them."""
    if name is not None:
        try:
            check_folder_name(name, "--calibrator")
        except ValueError as error:
            raise UserError(str(error)) from None
    fitted = fitted_calibrators(run_dir)
    if not fitted:
        raise UserError(f"{run_dir} has no fitted calibrator; run `longtail calibrate {run_dir} --method kt_ts` "
                        "(or ts, vs, ...) first")
    if name is None:
        name = list(fitted)[-1]
    if name not in fitted:
        raise UserError(f"{run_dir} has no calibrator {name!r}; fitted ones: {', '.join(fitted)}")
    if checkpoint is not None:
        fitted_on = calibrator_checkpoint(fitted[name])
        if fitted_on is not None and Path(fitted_on).name != Path(checkpoint).name:
            raise UserError(f"calibrator {name!r} was fitted on {fitted_on}, not on {checkpoint}; fit one on this "
                            f"checkpoint (`longtail calibrate {run_dir} --checkpoint {Path(checkpoint).stem} "
                            "--method ...`) or use the checkpoint it was fitted on")
    return name, load_calibrator(fitted[name])
