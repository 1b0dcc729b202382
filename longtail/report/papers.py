"""The reproduced papers' published numbers beside ours, only where the setting is the same:
dataset, imbalance factor, backbone, schedule length and the method's own keys all have to match
the run's config, or no paper value is shown.

Where the numbers are read from (``paper_numbers_path``): the ``path`` argument (``longtail report
--papers``), else the file named by ``$LONGTAIL_PAPER_NUMBERS``, else the file of record,
``benchmarks/paper_numbers.yaml`` of the source checkout this package was imported from
(``REPOSITORY_PAPER_NUMBERS``). An installed wheel carries no ``benchmarks/``: there the default is
missing and ``PaperNumbersNotFound`` says how to point at a copy."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import yaml

from longtail.report.aggregate import config_value

__all__ = ["PAPER_NUMBERS_ENV", "REPOSITORY_PAPER_NUMBERS", "DEFAULT_PAPERS", "PaperNumbersNotFound",
           "paper_numbers_path", "load_paper_numbers", "paper_entry_for"]

PAPER_NUMBERS_ENV = "LONGTAIL_PAPER_NUMBERS"
# The file of record in a source checkout: <checkout>/benchmarks/paper_numbers.yaml beside <checkout>/longtail/.
REPOSITORY_PAPER_NUMBERS = Path(__file__).resolve().parents[2] / "benchmarks" / "paper_numbers.yaml"
DEFAULT_PAPERS = REPOSITORY_PAPER_NUMBERS  # the older name
REQUIRED = ("paper", "seed_file", "table", "row", "selection", "setting", "method", "metrics")
SETTING_KEYS = ("data.dataset", "data.imbalance_factor", "model.name", "train.epochs")
# Settings an entry may leave out, at the value the papers use: they train on the whole long-tailed
# training set, so a run that holds out a validation split is compared only with an entry that says so.
DEFAULT_SETTING = {"data.val_fraction": 0.0}


class PaperNumbersNotFound(FileNotFoundError):
    """The paper numbers file to read does not exist; the message names where it was looked for."""


def paper_numbers_path(path: str | Path | None = None) -> Path:
    """The paper numbers file to read: ``path`` if given, else ``$LONGTAIL_PAPER_NUMBERS`` if set, else
    ``REPOSITORY_PAPER_NUMBERS``. Raises ``PaperNumbersNotFound`` when the chosen file is missing."""
    if path is not None:
        chosen, source = Path(path), "the given path"
    elif os.environ.get(PAPER_NUMBERS_ENV):
        chosen, source = Path(os.environ[PAPER_NUMBERS_ENV]), f"${PAPER_NUMBERS_ENV}"
    else:
        chosen, source = REPOSITORY_PAPER_NUMBERS, "the default, benchmarks/paper_numbers.yaml of a source checkout"
    if not chosen.is_file():
        hint = ("" if path is not None or os.environ.get(PAPER_NUMBERS_ENV) else
                f"; this longtail is not run from a source checkout (an installed package carries no benchmarks/): "
                f"pass --papers FILE or set ${PAPER_NUMBERS_ENV} to a copy of the repository's "
                "benchmarks/paper_numbers.yaml")
        raise PaperNumbersNotFound(f"paper numbers file {chosen} ({source}) does not exist{hint}")
    return chosen


def load_paper_numbers(path: str | Path | None = None) -> list[dict[str, Any]]:
    """The entries of the paper numbers file (``paper_numbers_path(path)``; ``PaperNumbersNotFound`` when
    it is missing), each checked for the fields a reader needs to trace it."""
    path = paper_numbers_path(path)
    entries = (yaml.safe_load(path.read_text()) or {}).get("entries", [])
    for number, entry in enumerate(entries):
        missing = [key for key in REQUIRED if key not in entry]
        unknown_setting = set(entry.get("setting", {})) - set(SETTING_KEYS) - set(DEFAULT_SETTING)
        if missing or unknown_setting:
            raise ValueError(f"{path}: entry {number} ({entry.get('row')!r}) lacks {missing} or has setting keys "
                             f"{sorted(unknown_setting)} outside {list(SETTING_KEYS) + list(DEFAULT_SETTING)}")
    return entries


def _stage_view(row: dict[str, Any], key: str) -> Any:
    """The value of ``key`` for this row: a stage-1 row has no stage 2, whatever its recipe goes on to do."""
    if key.startswith("stage2.") and not row["stage"].startswith("stage 2"):
        return None
    return config_value(row["config"], key)


def _value_or(row: dict[str, Any], key: str, default: Any) -> Any:
    value = _stage_view(row, key)
    return default if value is None else value


def paper_entry_for(row: dict[str, Any], entries: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The entry whose setting (all of SETTING_KEYS, and DEFAULT_SETTING where the entry is silent) and
    method keys equal the row's config. Where several papers report it, the one with the most metrics
    (an ECE beside the top-1) comes first, then the file's order; the others are listed under "also"."""
    matches = [entry for entry in entries
               if all(key in entry["setting"] and _stage_view(row, key) == entry["setting"][key]
                      for key in SETTING_KEYS)
               and all(_value_or(row, key, default) == entry["setting"].get(key, default)
                       for key, default in DEFAULT_SETTING.items())
               and all(_stage_view(row, key) == value for key, value in entry["method"].items())]
    matches.sort(key=lambda entry: -len(entry["metrics"]))  # stable: ties keep the file's order
    if len(matches) > 1:
        return {**matches[0], "also": [f"{m['paper']}, {m['table']}, row {m['row']!r}: top-1 {m['metrics'].get('top1')}"
                                       for m in matches[1:]]}
    return matches[0] if matches else None
