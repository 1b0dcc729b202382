"""The seeds' published numbers (benchmarks/paper_numbers.yaml) beside ours, only where the setting
is the same: dataset, imbalance factor, backbone, schedule length and the method's own keys all
have to match the run's config, or no paper value is shown."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import yaml

from longtail.report.aggregate import config_value

__all__ = ["DEFAULT_PAPERS", "load_paper_numbers", "paper_entry_for"]

DEFAULT_PAPERS = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_numbers.yaml"
REQUIRED = ("paper", "seed_file", "table", "row", "selection", "setting", "method", "metrics")
SETTING_KEYS = ("data.dataset", "data.imbalance_factor", "model.name", "train.epochs")


def load_paper_numbers(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The entries of ``path`` (default: the repo's benchmarks/paper_numbers.yaml; none when it is
    absent, e.g. in an installed wheel), each checked for the fields a reader needs to trace it."""
    if path is not None and not Path(path).is_file():
        raise FileNotFoundError(f"paper numbers file {path} does not exist (default: {DEFAULT_PAPERS})")
    path = Path(path) if path is not None else DEFAULT_PAPERS
    if not path.is_file():
        return []
    entries = (yaml.safe_load(path.read_text()) or {}).get("entries", [])
    for number, entry in enumerate(entries):
        missing = [key for key in REQUIRED if key not in entry]
        unknown_setting = set(entry.get("setting", {})) - set(SETTING_KEYS)
        if missing or unknown_setting:
            raise ValueError(f"{path}: entry {number} ({entry.get('row')!r}) lacks {missing} or has setting keys "
                             f"{sorted(unknown_setting)} outside {list(SETTING_KEYS)}")
    return entries


def _stage_view(row: dict[str, Any], key: str) -> Any:
    """The value of ``key`` for this row: a stage-1 row has no stage 2, whatever its recipe goes on to do."""
    if key.startswith("stage2.") and not row["stage"].startswith("stage 2"):
        return None
    return config_value(row["config"], key)


def paper_entry_for(row: dict[str, Any], entries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The one entry whose setting (all of SETTING_KEYS) and method keys equal the row's config."""
    matches = [entry for entry in entries
               if all(key in entry["setting"] and _stage_view(row, key) == entry["setting"][key]
                      for key in SETTING_KEYS)
               and all(_stage_view(row, key) == value for key, value in entry["method"].items())]
    if len(matches) > 1:
        # two papers report the same method and setting: show the first, the table names both
        return {**matches[0], "also": [f"{m['paper']}, {m['table']}, row {m['row']!r}: top-1 {m['metrics'].get('top1')}"
                                       for m in matches[1:]]}
    return matches[0] if matches else None
