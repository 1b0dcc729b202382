"""What several commands share: the user-error type, splitting ``RECIPE key=value ...``, finding a
run directory, which config keys may change once a run is trained, and what a folder name may be."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from longtail.config import Config, check_folder_name

__all__ = ["UserError", "as_trained", "split_config_and_overrides", "run_dir_of", "changed_keys", "DATA_DEFINITION",
           "RESUMABLE_KEYS", "folder_name"]

# what the training images, their labels and the shot groups are: fixed once a run is trained
DATA_DEFINITION = ("data.dataset", "data.imbalance_factor", "data.profile", "data.max_count", "data.selection",
                   "data.selection_seed", "data.val_fraction", "data.val_source", "data.image_size", "data.bad_files")
# what `train --resume` may change: where the data is and how it is read, how long to train and where to stop;
# anything else would be half-applied (the checkpoint's optimiser and schedule state win), so it is refused
RESUMABLE_KEYS = ("device", "data.root", "data.train_list", "data.val_list", "data.test_list", "data.cache_dir",
                  "data.in_memory", "data.num_workers", "data.decode_on_device", "data.eval_batch_size",
                  "train.epochs", "train.stop_at_epoch", "train.log_interval", "train.eval_every",
                  "train.checkpoint_every", "stage2.epochs", "stage2.stop_at_epoch")


class UserError(RuntimeError):
    """Something the user can fix; printed without a traceback."""


def folder_name(value: str, what: str) -> str:
    """:func:`longtail.config.check_folder_name` for a command-line name: a UserError instead of ValueError."""
    try:
        return check_folder_name(value, what)
    except ValueError as error:
        raise UserError(str(error)) from None


def split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def run_dir_of(path: Path) -> Path:
    """A run directory from a run directory or one of its checkpoint files."""
    if path.is_dir():
        return path
    if path.suffix == ".pt" and path.parent.name == "checkpoints":
        return path.parent.parent
    raise UserError(f"{path} is neither a run directory nor a checkpoint inside one (RUN/checkpoints/*.pt)")


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


FILE_DATASETS = ("image_folder", "list_files")
SIZE_BEFORE_RECORDING = 224  # the one size file datasets had before issue 24


def as_trained(config: Config) -> Config:
    """A trained run's config as it was trained: since issue 24 a file dataset's run records the image size
    the data chose (``data.image_size``); one without it was trained before, when that size was always 224,
    so it is decoded at 224 again instead of at the images' own size."""
    if config.data.dataset in FILE_DATASETS and config.data.image_size is None:
        config.data.image_size = SIZE_BEFORE_RECORDING
    return config
