"""The seeds' rows reproduced by training: our numbers beside the papers', kept in the repository.

    python benchmarks/reproduction.py runs/studies/cifar100_lt_if100_full_cpu [MORE_STUDY_DIRS ...]
    python benchmarks/reproduction.py STUDY_DIR --name precision_parity_cifar10_lt --results benchmarks/results

Keeps every finished stage of the studies (stage 1, each stage 2, each calibrator) in the repository,
then matches each kept row to the published number of the same setting (benchmarks/paper_numbers.yaml,
as ``longtail report``) and writes, under ``--results``:

- ``<name>/<recipe>/seed<k>/``: each run's metrics.csv, metrics.json, config.yaml, env.json
  and train.log (and the same for each stage-2 folder and calibrator), and ``origin.json`` naming its
  study;
- ``<name>.json`` (default ``reproduction_cifar100_lt_if100.json``): one record per kept row (method,
  paper, paper_top1, top1, many, medium, few, ece, ece_paper, ECE after each calibrator, epochs, seed,
  commit, date, hours, and the best evaluated test epoch — the seeds' code's selection, never our
  number, kept to size how much of a gap that selection explains; see ``longtail.report.records``);
- ``<name>/learning_curves.png``: test top-1 overall and per shot group against epoch,
  every kept run on one figure;

and prints the markdown table for RESULTS.md "Full schedules on CPU". Rerun it as runs finish, with the
studies that have new runs: the records are regenerated from the kept copies, the earlier runs' and
the new ones' alike (the git diff shows what changed), never edited by hand. The copies are what makes
that possible across sessions — a study folder lives on a machine that may be gone by the next one.
With no study it only rebuilds (after benchmarks/paper_numbers.yaml changed, say); to drop a row,
delete its kept folder.

Several study folders make one set of rows (a study continued from a later commit under another name:
a study refuses runs made by a different version of their recipe). Each record names its ``study`` and
its ``run`` inside it; two studies may not hold the same ``<recipe>/seed<k>``, whose kept files would
collide (a run kept from the same study before is updated).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Sequence

from longtail.engine.rundir import (CONFIG_FILE, ENV_FILE, LOG_FILE, METRICS_CSV, METRICS_FILE, calibration_records,
                                    kept_origin, kept_runs, stage2_dirs)
from longtail.report.compare import expand_runs, rows_for
from longtail.report.papers import load_paper_numbers
from longtail.report.plots import learning_curves
from longtail.report.records import learning_curve, records

KEPT_FILES = (METRICS_CSV, METRICS_FILE, CONFIG_FILE, ENV_FILE, LOG_FILE)
GAP_FINDING = 1.5  # points of top-1 (or ECE) beyond which a gap is a finding to explain (issue 23)


def _cell(value: Any, digits: int = 2, sign: bool = False) -> str:
    if value is None:
        return "–"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _best(row: dict[str, Any]) -> str:
    """The best evaluated test epoch (the seeds' code's selection, not ours): "41.20 @ 185"."""
    if row.get("best_test_top1") is None:
        return "–"
    return f"{row['best_test_top1']:.2f} @ {row['best_test_epoch']}"


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """Paper against longtail, a line per row, with the gap, the shot groups, ECE before and after
    each calibrator and the wall time; a gap beyond GAP_FINDING points is marked."""
    calibrators = sorted({method for row in rows for method in row["ece_after"]})
    header = ["method", "seed", "paper", "paper top-1", "top-1", "gap", "many", "medium", "few", "ECE", "paper ECE",
              *(f"ECE after {m}" for m in calibrators), "best test top-1 @ epoch", "epochs", "hours"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        gap = row["gap_top1"]
        flag = " **(finding)**" if gap is not None and abs(gap) > GAP_FINDING else ""
        epochs = str(row["epochs"]) + (f" + {row['stage2_epochs']}" if row["stage2_epochs"] else "")
        lines.append("| " + " | ".join([
            row["method"], str(row["seed"]), (row["paper"] or "–").split(" (")[0], _cell(row["paper_top1"]), _cell(row["top1"]),
            _cell(gap, sign=True) + flag, _cell(row["many"]), _cell(row["medium"]), _cell(row["few"]),
            _cell(row["ece"]), _cell(row["ece_paper"]),
            *(_cell(row["ece_after"].get(m)) for m in calibrators), _best(row), epochs, _cell(row["hours"])]) + " |")
    return "\n".join(lines)


def keep_run_files(run_dir: Path, study_dir: Path, into: Path) -> list[Path]:
    """Copy the small files of a run, its stage-2 folders and its calibrations into ``into``, at the
    same relative path as in the study, with ``origin.json`` naming the study."""
    copied = []
    stages = [run_dir, *stage2_dirs(run_dir)]
    folders = [*stages, *(record.parent for stage in stages for record in calibration_records(stage))]
    for folder in folders:
        if not folder.is_dir():
            continue
        target = into / folder.relative_to(study_dir)
        for name in KEPT_FILES:
            source = folder / name
            if source.is_file():
                target.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target / name)
                copied.append(target / name)
    origin = kept_origin(into / run_dir.relative_to(study_dir))
    origin.write_text(json.dumps({"study": study_dir.resolve().name}) + "\n", encoding="utf-8")
    return copied


def kept_study(kept_run: Path) -> str | None:
    """The study a kept run came from (its ``origin.json``), or None when not kept."""
    origin = kept_origin(kept_run)
    return json.loads(origin.read_text(encoding="utf-8"))["study"] if origin.is_file() else None


def study_of(run: Path, studies: Sequence[Path]) -> Path:
    """The study folder among ``studies`` that holds ``run``."""
    for study in studies:
        if run.resolve().is_relative_to(study.resolve()):
            return study
    raise ValueError(f"{run} is in none of the study folders {[str(s) for s in studies]}")


def check_distinct_runs(runs: Sequence[Path], studies: Sequence[Path], kept: Path) -> None:
    """Two studies holding the same ``<recipe>/seed<k>`` would write their kept files over each other,
    and so would a study whose run of that name is already kept from another study."""
    seen: dict[Path, str] = {}
    for run in runs:
        study = study_of(run, studies)
        relative = run.resolve().relative_to(study.resolve())
        name = study.resolve().name
        earlier = seen.get(relative) or kept_study(kept / relative)
        if earlier is not None and earlier != name:
            raise SystemExit(f"{relative} is a run of both {earlier} and {name}; their files would collide under "
                             f"{kept}: give one study's recipe another name, or report them apart (--name)")
        seen[relative] = name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("studies", type=Path, nargs="*", metavar="study",
                        help="study folders (runs/studies/<name>) whose finished runs are kept (added, or updated "
                             "when kept from the same study before); none: rebuild from what is kept")
    parser.add_argument("--name", default="reproduction_cifar100_lt_if100", help="results file name: <name>.json")
    parser.add_argument("--results", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where the results go (default benchmarks/results)")
    parser.add_argument("--papers", type=Path, help="published numbers (default benchmarks/paper_numbers.yaml)")
    args = parser.parse_args(argv)

    folder = args.results / args.name
    runs, partial, untrained = expand_runs(args.studies) if args.studies else ([], [], [])
    if args.studies and not runs:
        print(f"no finished runs in {', '.join(map(str, args.studies))} ({len(untrained)} not trained yet)",
              file=sys.stderr)
        return 2
    check_distinct_runs(runs, args.studies, folder)
    copied = [file for run in runs for file in keep_run_files(run, study_of(run, args.studies), folder)]
    kept = kept_runs(folder)
    if not kept:
        print(f"nothing kept under {folder}: give the study folders", file=sys.stderr)
        return 2
    # every row from the kept copies, the new and the earlier alike: study folders are often on a machine
    # that is gone by the next session, the copies are in the repository
    rows = [row for run in kept for row in rows_for(run, recipe=run.parent.name)]
    results = records(rows, load_paper_numbers(args.papers))
    for result in results:  # paths relative to the study: the results do not name this machine's folders
        relative = Path(os.path.relpath(result["run"], folder))
        result["run"] = str(relative)
        result["study"] = kept_study(folder / Path(*relative.parts[:2]))
    path = args.results / f"{args.name}.json"
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    curves = {f"{row['recipe']} (seed {row['pair'][0]})": learning_curve(row["folder"]) for row in rows
              if row["stage"] == "last"}
    plot = learning_curves(curves, folder / "learning_curves.png")
    print(markdown_table(results))
    print(f"\n{len(results)} rows from {len(kept)} kept runs ({len(runs)} finished runs given now, {len(partial)} "
          f"of them with steps left, {len(untrained)} not trained yet): {path}; {len(copied)} run files copied "
          f"under {folder}/" + (f"; curves {plot}" if plot else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
