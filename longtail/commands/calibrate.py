"""``longtail calibrate``: fit a post-hoc calibrator of a trained run on its validation split,
evaluate before/after on the balanced test set (overall and per shot group), save everything."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from longtail.calibration.diagrams import reliability_diagrams_by_group
from longtail.commands.common import run_dir_of
from longtail.config import parse_value
from longtail.data import ImageSet
from longtail.engine.distributed import DistInfo
from longtail.engine.rundir import TABLE_FILE, calibration_dir, calibrator_file, metrics_file, new_run_dir, write_output
from longtail.metrics import GROUPS, calibration_report, calibration_row
from longtail.registry import CALIBRATORS, ConfigError, load_all
from longtail.runs import find_calibrator, fitted_calibrators, load_run, resolve_checkpoint

# find_calibrator and fitted_calibrators are the run layer's (longtail.runs); named here for older callers
__all__ = ["cmd_calibrate", "calibrate_run", "markdown_table", "fitted_calibrators", "find_calibrator"]


def markdown_table(rows: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | top-1 | ECE | many ECE | medium ECE | few ECE | MCE | NLL | conf − acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        cells = [f"{100 * row['top1']:.2f}", f"{100 * row['ece']:.2f}",
                 *(f"{100 * row[f'{g}_ece']:.2f}" if f"{g}_ece" in row else "–" for g in GROUPS),
                 f"{100 * row['mce']:.2f}", f"{row['nll']:.3f}", f"{100 * row['confidence_minus_accuracy']:+.2f}"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibrate_run(run_dir: Path, method: str, params: dict[str, Any] | None = None, checkpoint: str = "last",
                  dist_info: DistInfo | None = None) -> Path:
    """Fit ``method`` on the run's validation split and write ``RUN/calibration/<method>/``:
    calibrator.pt (load with ``longtail.calibration.load_calibrator``), metrics.json, table.md and
    reliability diagrams before and after."""
    load_all()
    resolve_checkpoint(Path(run_dir), checkpoint)  # a missing checkpoint is named before a bad method
    calibrator = CALIBRATORS.build(method, params, where="calibrate.params")
    run = load_run(Path(run_dir), checkpoint, dist_info=dist_info)
    run_dir, file, bundle, dist_info = run.run_dir, run.file, run.bundle, run.dist_info
    if bundle.val is None:
        raise ConfigError(
            f"{run_dir} has no validation split to fit a calibrator on (fitting on training data the model has "
            "seen is biased). Train with data.val_fraction=0.2 — the knowledge-transfer paper's 80/20 split of "
            "the long-tailed training data — or data.val_fraction=0.2 data.val_source=test for a balanced split.")
    needs_features = calibrator.needs_features

    def outputs(imageset: ImageSet, features: bool) -> dict[str, torch.Tensor]:
        return run.evaluate(imageset, keep_features=features, metrics=False).outputs

    val = outputs(bundle.val, needs_features)
    test = outputs(bundle.test, False)
    extra: dict[str, Any] = {"class_counts": bundle.train_counts}
    if needs_features:
        train = outputs(bundle.train, True)
        extra.update(features=val["features"], train_features=train["features"], train_targets=train["targets"])
    calibrator.fit(val["logits"], val["targets"], **extra)

    counts = bundle.train_counts
    calibrated = calibrator.transform(test["logits"])
    before = calibration_report(test["logits"], test["targets"], counts)
    after = calibration_report(calibrated, test["targets"], counts)
    rows = {"uncalibrated": calibration_row(before, test["logits"], test["targets"]),
            method: calibration_row(after, calibrated, test["targets"])}
    if not dist_info.is_main:
        return calibration_dir(run_dir)
    out = new_run_dir(calibration_dir(run_dir), method)
    calibrator.save(calibrator_file(out))
    write_output(metrics_file(out), json.dumps({
        "method": method, "params": params or {}, "checkpoint": str(file),
        "fitted_on": f"validation split ({len(val['targets'])} images)",
        "evaluated_on": f"test split ({len(test['targets'])} images)",
        "rows": rows, "before": before, "after": after}, indent=2))
    write_output(out / TABLE_FILE, markdown_table(rows) + "\n")
    reliability_diagrams_by_group(test["logits"], test["targets"], counts, out / "reliability_before.png")
    reliability_diagrams_by_group(calibrated, test["targets"], counts, out / "reliability_after.png")
    print(markdown_table(rows))
    return out


def cmd_calibrate(args: argparse.Namespace) -> int:
    params = {}
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = parse_value(value)
    out = calibrate_run(run_dir_of(Path(args.run)), args.method, params, checkpoint=args.checkpoint)
    print(f"results in {out}")
    return 0
