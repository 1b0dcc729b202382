"""What several commands share: the user-error type, splitting ``RECIPE key=value ...`` and
finding a run directory."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

__all__ = ["UserError", "split_config_and_overrides", "run_dir_of"]


class UserError(RuntimeError):
    """Something the user can fix; printed without a traceback."""


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
