"""Our learning curve against the authors' own training log, epoch by epoch.

    python benchmarks/authors_curve.py AUTHORS_LOG RUN_DIR [--stage2 FOLDER] [--plot curve.png]

A final number says whether a reproduction lands; a whole curve says where it parts from the
authors' run. Some authors publish the log of the run behind their table (SHIKE: the repository
jinyan-06/SHIKE keeps ``cifar100_LT_IF100.log``, its 200 epochs of test accuracy; ``fetch`` it, it is
not copied here). The log is read the way PyTorch's ImageNet example prints it, one summary line per
evaluated epoch, `` * Acc@1 56.340 Acc@5 83.630``, epoch 1 first (SHIKE evaluates every epoch,
stage 2 continuing the count). Our run's curve is its metrics.csv (test top-1 at each evaluated
epoch), with a stage 2 (the recipe's own, ``RUN_DIR/stage2``, or ``--stage2 stage2_crt``) continuing
the epoch count after stage 1, as the authors' single loop does; a stage 2 scores the test set at its
last epoch only, so it adds one point.

Prints, at each epoch both evaluated, the authors' top-1, ours and the difference, then the mean
difference per phase (stage 1, stage 2); ``--plot`` draws both curves on one figure.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from longtail.engine.rundir import METRICS_FILE, recipe_stage2_dir
from longtail.report.plots import learning_curves
from longtail.report.records import learning_curve

SUMMARY_LINE = re.compile(r"^\s*\*\s+Acc@1\s+([0-9.]+)", re.MULTILINE)


def authors_top1(text: str) -> list[float]:
    """Test top-1 (percent) of each evaluated epoch, in order, from a log's `` * Acc@1`` summary lines
    (the per-batch ``Test: [ 0/79] ... Acc@1`` lines are not summaries and are skipped)."""
    return [float(match.group(1)) for match in SUMMARY_LINE.finditer(text)]


def _stage2_curve(folder: Path) -> dict[str, list[float]]:
    """A stage 2's evaluated epochs; a stage 2 scores the test set once, at its end (metrics.json "last")."""
    curve = learning_curve(folder)
    if curve["epoch"] or not (folder / METRICS_FILE).is_file():
        return curve
    last = json.loads((folder / METRICS_FILE).read_text(encoding="utf-8")).get("last") or {}
    test = last.get("test") or {}
    if test.get("top1") is None:
        return curve
    values = {**test, "ece": (test.get("calibration") or {}).get("ece")}
    curve = {"epoch": [last["epoch"]]}
    for key in ("top1", "many_top1", "medium_top1", "few_top1", "ece"):
        curve[key] = [np.nan if values.get(key) is None else 100 * values[key]]  # an ECE of 0 stays 0
    return curve


def our_curve(run_dir: Path, stage2_dir: Path | None = None) -> dict[str, list[float]]:
    """The run's test curve with its stage 2 (default: the recipe's own) appended, its epochs counted on
    from stage 1's last; "phase" says which stage each point is from."""
    curve = learning_curve(run_dir)
    stage1_epochs = max(curve["epoch"], default=0)
    stage2 = _stage2_curve(stage2_dir if stage2_dir is not None else recipe_stage2_dir(run_dir))
    curve.setdefault("phase", [1.0] * len(curve["epoch"]))
    for index, epoch in enumerate(stage2["epoch"]):
        curve["epoch"].append(stage1_epochs + epoch)
        curve["phase"].append(2.0)
        for key in ("top1", "many_top1", "medium_top1", "few_top1", "ece"):
            curve.setdefault(key, []).append(stage2.get(key, [np.nan] * len(stage2["epoch"]))[index])
    return curve


def side_by_side(authors: Sequence[float], ours: dict[str, list[float]]) -> list[dict[str, float]]:
    """One row per epoch that both runs evaluated: epoch (1-based), phase, authors, ours, ours − authors."""
    rows = []
    for epoch, phase, top1 in zip(ours["epoch"], ours["phase"], ours["top1"]):
        if 1 <= epoch <= len(authors):
            rows.append({"epoch": int(epoch), "phase": int(phase), "authors": authors[epoch - 1], "ours": top1,
                         "difference": top1 - authors[epoch - 1]})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("log", type=Path, help="the authors' training log (one ' * Acc@1 X' line per epoch)")
    parser.add_argument("run", type=Path, help="our run folder (runs/.../<recipe>/seed<k>)")
    parser.add_argument("--stage2", help="the stage-2 folder under RUN whose epochs follow stage 1's "
                                         "(default: the recipe's own, 'stage2')")
    parser.add_argument("--plot", type=Path, help="write both curves to this PNG")
    args = parser.parse_args(argv)
    authors = authors_top1(args.log.read_text(encoding="utf-8", errors="replace"))
    if not authors:
        parser.error(f"{args.log}: no ' * Acc@1 X' summary lines: is it the authors' training log?")
    if args.stage2 and not (args.run / args.stage2).is_dir():
        parser.error(f"{args.run / args.stage2}: no such stage-2 folder (those there: "
                     f"{sorted(p.name for p in args.run.glob('stage2*')) or 'none'})")
    ours = our_curve(args.run, args.run / args.stage2 if args.stage2 else None)
    rows = side_by_side(authors, ours)
    if not rows:
        parser.error(f"{args.run}: no evaluated epoch within the log's {len(authors)} (is metrics.csv there?)")
    print(f"authors' log: {len(authors)} epochs, last {authors[-1]:.2f}, best {max(authors):.2f} "
          f"@ {1 + int(np.argmax(authors))}")
    print("| epoch | stage | authors' top-1 | longtail top-1 | longtail − authors |")
    print("|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['epoch']} | {row['phase']} | {row['authors']:.2f} | {row['ours']:.2f} | {row['difference']:+.2f} |")
    for phase in sorted({row["phase"] for row in rows}):
        differences = [row["difference"] for row in rows if row["phase"] == phase]
        print(f"stage {phase}: mean difference {np.mean(differences):+.2f} over {len(differences)} epochs "
              f"(min {min(differences):+.2f}, max {max(differences):+.2f})")
    if args.plot:
        epochs = list(range(1, len(authors) + 1))
        learning_curves({"authors' log": {"epoch": epochs, "top1": list(authors)}, "longtail": ours}, args.plot)
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
