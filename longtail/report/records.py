"""One machine-readable record per result row (a run's stage 1, each of its stage 2s): our metrics in
percent beside the published number of the same setting, with the provenance a reproduction table
needs (commit, date, wall time). ``longtail report`` writes them to ``report.json``; the CIFAR-100-LT
reproduction (benchmarks/reproduction.py) keeps them as its results file."""
from __future__ import annotations

import csv
import json
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

from longtail.engine.rundir import ENV_FILE, LOG_FILE, METRICS_CSV, STARTED_FROM_FILE
from longtail.report.aggregate import config_value
from longtail.report.papers import paper_entry_for

__all__ = ["wall_hours", "learning_curve", "best_on_test", "record_for", "records"]

LOG_TIME_FORMAT = "%Y-%m-%d %H:%M:%S,%f"
START_MARKERS = ("training images in", "stage 2: ")  # the first line each process writes to a train.log


def _log_lines(log: Path) -> list[tuple[datetime, str]]:
    lines = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            lines.append((datetime.strptime(line[:23], LOG_TIME_FORMAT), line[24:]))
        except ValueError:
            continue  # a continuation line (tracebacks, wrapped text)
    return lines


def wall_hours(log: Path, part: str = "all") -> float | None:
    """Hours a run spent working, from its ``train.log``: the time between consecutive log lines,
    except the gap before a line that starts a process (a ``--resume`` in a later session), which is
    time nobody was running it. ``part``: "all", or "stage 1" / "stage 2" for a recipe whose own
    stage 2 ran in the same process and log (split at the log's first "stage 2: " line). None when
    the log is missing or that part has fewer than two lines."""
    if not log.is_file():
        return None
    lines = _log_lines(log)
    split = next((i for i, (_, text) in enumerate(lines) if text.startswith("stage 2: ")), len(lines))
    lines = {"all": lines, "stage 1": lines[:split], "stage 2": lines[split:]}[part]
    if len(lines) < 2:
        return None
    seconds = sum((later - earlier).total_seconds()
                  for (earlier, _), (later, text) in zip(lines, lines[1:])
                  if not any(marker in text for marker in START_MARKERS))
    return seconds / 3600


def finished_at(folder: Path) -> str | None:
    """The date (UTC, ISO) of the folder's last log line."""
    log = folder / LOG_FILE
    lines = _log_lines(log) if log.is_file() else []
    return lines[-1][0].date().isoformat() if lines else None


def learning_curve(folder: Path, split: str = "test") -> dict[str, list[float]]:
    """Epoch and the per-epoch ``split`` metrics of a run's metrics.csv (percent), only the epochs
    that were evaluated (``train.eval_every``): {"epoch": [...], "top1": [...], "many_top1": [...], ...}."""
    path = folder / METRICS_CSV
    curve: dict[str, list[float]] = {"epoch": []}
    if not path.is_file():
        return curve
    keys = ("top1", "many_top1", "medium_top1", "few_top1", "ece")
    with path.open(newline="", encoding="utf-8") as handle:
        for line in csv.DictReader(handle):
            if not line.get(f"{split}_top1"):
                continue
            curve["epoch"].append(int(line["epoch"]))
            for key in keys:
                value = line.get(f"{split}_{key}")
                curve.setdefault(key, []).append(100 * float(value) if value else float("nan"))
    return curve


def _commit(folder: Path) -> str | None:
    """The commit that trained the run (env.json), with ``-dirty`` when the tree had changes."""
    for candidate in (folder, folder.parent):
        path = candidate / ENV_FILE
        if path.is_file():
            git = json.loads(path.read_text(encoding="utf-8")).get("git") or {}
            if git.get("commit"):
                return git["commit"] + ("-dirty" if git.get("dirty") else "")
    return None


def best_on_test(folder: Path) -> tuple[float | None, int | None]:
    """The highest test top-1 (percent) among the epochs a run evaluated, and that epoch: what the seeds'
    code reports when it keeps the best test epoch (docs/FIDELITY.md, "model selection"). Never our
    number (the field reports the last epoch); beside it, it sizes how much of a gap selection explains.
    With ``train.eval_every`` > 1 it is a lower bound of the authors' per-epoch maximum."""
    curve = learning_curve(folder)
    if not curve["epoch"]:
        return None, None
    best = max(range(len(curve["epoch"])), key=lambda i: curve["top1"][i])
    return round(curve["top1"][best], 4), curve["epoch"][best]


def _pct(value: Any) -> float | None:
    return None if value is None else round(100 * float(value), 4)


def record_for(row: dict[str, Any], entries: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    """The record of one row of ``report.compare.rows_for``: percentages, the matching paper entry
    (the first; others in ``other_papers``), the gap to it, and where the number came from."""
    stage2 = row["stage"].startswith("stage 2")
    entry = paper_entry_for(row, entries) if entries else None
    metrics = entry["metrics"] if entry else {}
    top1 = _pct(row.get("top1"))
    run_log = row["path"] / LOG_FILE
    stage1_hours = wall_hours(run_log, "stage 1")
    own_hours = None
    if stage2:  # a stage-2 command logs in its own folder; a recipe's own stage 2 in the run's log
        own_log = row["folder"] / LOG_FILE
        own_hours = wall_hours(own_log) if own_log.is_file() else wall_hours(run_log, "stage 2")
    hours = None if stage1_hours is None else stage1_hours + (own_hours or 0.0)
    best_top1, best_epoch = best_on_test(row["folder"])
    return {
        "method": row["label"],
        "recipe": row["recipe"],
        "stage": row["stage"],
        "run": str(row["folder"]),
        "paper": entry["paper"] if entry else None,
        "paper_source": f"{entry['table']}, row {entry['row']!r}" if entry else None,
        "paper_top1": metrics.get("top1"),
        "ece_paper": metrics.get("ece"),
        "other_papers": list(entry.get("also", [])) if entry else [],
        "top1": top1,
        "gap_top1": None if top1 is None or metrics.get("top1") is None else round(top1 - metrics["top1"], 4),
        "many": _pct(row.get("many_top1")),
        "medium": _pct(row.get("medium_top1")),
        "few": _pct(row.get("few_top1")),
        "ece": _pct(row.get("ece")),
        "best_test_top1": best_top1,  # test-set selection, as the seeds' code: for explaining gaps only
        "best_test_epoch": best_epoch,
        "ece_after": {method: _pct(ece) for method, ece in row.get("calibrators", {}).items()},
        "epochs": config_value(row["config"], "train.epochs"),
        "stage2_epochs": config_value(row["config"], "stage2.epochs") if stage2 else None,
        "seed": row["pair"][0],
        "selection_seed": row["pair"][1],
        "commit": _commit(row["folder"]),
        "date": finished_at(row["folder"]),
        "hours": None if hours is None else round(hours, 6),
        "stage2_hours": None if own_hours is None else round(own_hours, 6),
        "started_from": _started_from(row["path"]),
    }


def _started_from(run: Path) -> dict[str, Any] | None:
    """Where a run started at another run's kept checkpoint began ({run, epochs}): its ``hours`` count
    only the epochs it trained itself."""
    record = run / STARTED_FROM_FILE
    if not record.is_file():
        return None
    start = json.loads(record.read_text())
    return {"run": start["run"], "epochs": start["epochs_done"]}


def records(rows: Sequence[dict[str, Any]], entries: Sequence[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """A record per row, in the rows' order (the 'best' rows of test-set selection are left out: the
    field reports the last epoch, and so do these records)."""
    return [record_for(row, entries) for row in rows if row["stage"] != "best"]
