"""``longtail calibrate``: fit a post-hoc calibrator of a trained run on its validation split,
evaluate before/after on the balanced test set (overall and per shot group), save everything."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from longtail.calibration.diagrams import reliability_diagrams_by_group
from longtail.calibration.calibrators import Calibrator, load_calibrator
from longtail.commands.common import UserError, as_trained, folder_name, run_dir_of
from longtail.commands.evaluate import resolve_checkpoint
from longtail.config import config_from_dict, parse_value
from longtail.engine import builders
from longtail.engine.checkpoint import load_run_checkpoint
from longtail.engine.distributed import DistInfo, init_distributed
from longtail.engine.predict import predict
from longtail.engine.rundir import new_run_dir, write_output
from longtail.metrics import calibration_report
from longtail.registry import CALIBRATORS, ConfigError, load_all

__all__ = ["cmd_calibrate", "calibrate_run", "markdown_table", "fitted_calibrators", "find_calibrator"]

GROUPS = ("many", "medium", "few")


def _outputs(model: torch.nn.Module, config: Any, imageset: Any, augment: Any, dist_info: DistInfo,
             features: bool) -> dict[str, torch.Tensor]:
    loader = builders.eval_loader(config, imageset, augment.normalize, dist_info)
    return predict(model, loader, dist_info, len(imageset.targets), builders.amp_dtype(config, dist_info.device),
                   keep_features=features)


def _row(report: dict[str, Any], logits: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    row = {"top1": float((logits.argmax(1) == targets).float().mean()),
           **{k: report[k] for k in ("ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier",
                                     "confidence_minus_accuracy")}}
    for group in GROUPS:
        if group in report.get("groups", {}):
            row[f"{group}_ece"] = report["groups"][group]["ece"]
    return row


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
    run_dir, file = resolve_checkpoint(Path(run_dir), checkpoint)
    dist_info = dist_info or init_distributed("auto")
    calibrator = CALIBRATORS.build(method, params, where="calibrate.params")
    state = load_run_checkpoint(file, map_location=dist_info.device)
    config = as_trained(config_from_dict(state["config"], str(file)))
    bundle = builders.build_bundle(config)
    if bundle.val is None:
        raise ConfigError(
            f"{run_dir} has no validation split to fit a calibrator on (fitting on training data the model has "
            "seen is biased). Train with data.val_fraction=0.2 — the knowledge-transfer paper's 80/20 split of "
            "the long-tailed training data — or data.val_fraction=0.2 data.val_source=test for a balanced split.")
    model = builders.load_trained_model(config, bundle, state, dist_info.device)
    augment = builders.build_augment(config, bundle)
    needs_features = calibrator.needs_features
    val = _outputs(model, config, bundle.val, augment, dist_info, needs_features)
    test = _outputs(model, config, bundle.test, augment, dist_info, False)
    extra: dict[str, Any] = {"class_counts": bundle.train_counts}
    if needs_features:
        train = _outputs(model, config, bundle.train, augment, dist_info, True)
        extra.update(features=val["features"], train_features=train["features"], train_targets=train["targets"])
    calibrator.fit(val["logits"], val["targets"], **extra)

    counts = bundle.train_counts
    calibrated = calibrator.transform(test["logits"])
    before = calibration_report(test["logits"], test["targets"], counts)
    after = calibration_report(calibrated, test["targets"], counts)
    rows = {"uncalibrated": _row(before, test["logits"], test["targets"]),
            method: _row(after, calibrated, test["targets"])}
    if not dist_info.is_main:
        return run_dir / "calibration"
    out = new_run_dir(run_dir / "calibration", method)
    calibrator.save(out / "calibrator.pt")
    write_output(out / "metrics.json", json.dumps({
        "method": method, "params": params or {}, "checkpoint": str(file),
        "fitted_on": f"validation split ({len(val['targets'])} images)",
        "evaluated_on": f"test split ({len(test['targets'])} images)",
        "rows": rows, "before": before, "after": after}, indent=2))
    write_output(out / "table.md", markdown_table(rows) + "\n")
    reliability_diagrams_by_group(test["logits"], test["targets"], counts, out / "reliability_before.png")
    reliability_diagrams_by_group(calibrated, test["targets"], counts, out / "reliability_after.png")
    print(markdown_table(rows))
    return out


def fitted_calibrators(run_dir: Path) -> dict[str, Path]:
    """Every calibrator ``longtail calibrate`` saved for the run, by folder name, oldest first."""
    files = sorted((run_dir / "calibration").glob("*/calibrator.pt"), key=lambda f: f.stat().st_mtime)
    return {file.parent.name: file for file in files}


def find_calibrator(run_dir: Path, name: str | None = None, checkpoint: Path | None = None) -> tuple[str, Calibrator]:
    """(name, calibrator): the one saved in ``RUN/calibration/<name>/``, or the last one fitted. With
    ``checkpoint``, a calibrator fitted on another checkpoint of the run is refused: it was fitted to
    that model's logits, and applying it to these would silently miscalibrate them."""
    if name is not None:
        folder_name(name, "--calibrator")
    fitted = fitted_calibrators(run_dir)
    if not fitted:
        raise UserError(f"{run_dir} has no fitted calibrator; run `longtail calibrate {run_dir} --method kt_ts` "
                        "(or ts, vs, ...) first")
    if name is None:
        name = list(fitted)[-1]
    if name not in fitted:
        raise UserError(f"{run_dir} has no calibrator {name!r}; fitted ones: {', '.join(fitted)}")
    if checkpoint is not None:
        record = fitted[name].parent / "metrics.json"
        fitted_on = json.loads(record.read_text()).get("checkpoint") if record.is_file() else None
        if fitted_on is not None and Path(fitted_on).name != Path(checkpoint).name:
            raise UserError(f"calibrator {name!r} was fitted on {fitted_on}, not on {checkpoint}; fit one on this "
                            f"checkpoint (`longtail calibrate {run_dir} --checkpoint {Path(checkpoint).stem} "
                            "--method ...`) or use the checkpoint it was fitted on")
    return name, load_calibrator(fitted[name])


def cmd_calibrate(args: argparse.Namespace) -> int:
    params = {}
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = parse_value(value)
    out = calibrate_run(run_dir_of(Path(args.run)), args.method, params, checkpoint=args.checkpoint)
    print(f"results in {out}")
    return 0
