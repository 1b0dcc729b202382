"""What several commands share: splitting ``RECIPE key=value ...``, which config keys ``--resume`` may
change, and what a folder name may be. The user-error type, reading a trained run's config
(``as_trained``, ``DATA_DEFINITION``, ``changed_keys``) and finding a run directory are the run layer's
(``longtail.runs``), re-exported here for the commands."""
from __future__ import annotations

from typing import Sequence

from longtail.config import check_folder_name
from longtail.runs import DATA_DEFINITION, UserError, as_trained, changed_keys, run_dir_of

__all__ = ["UserError", "as_trained", "split_config_and_overrides", "run_dir_of", "changed_keys", "DATA_DEFINITION",
           "RESUMABLE_KEYS", "folder_name"]

# what `train --resume` may change: where the data is and how it is read, how long to train and where to stop;
# anything else would be half-applied (the checkpoint's optimiser and schedule state win), so it is refused
RESUMABLE_KEYS = ("device", "data.root", "data.train_list", "data.val_list", "data.test_list", "data.cache_dir",
                  "data.in_memory", "data.num_workers", "data.decode_on_device", "data.eval_batch_size",
                  "train.epochs", "train.stop_at_epoch", "train.log_interval", "train.eval_every",
                  "train.checkpoint_every", "train.keep_epochs", "stage2.epochs", "stage2.stop_at_epoch", "stage2.log_interval",
                  "stage2.eval_every")


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
