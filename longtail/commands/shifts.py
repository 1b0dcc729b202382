"""``longtail eval RUN --shifts``: a run under label shift. The balanced test set and its forward- and
backward-LT subsets (``data.shifts``), scored for the raw model and each calibrator the run has
(``longtail calibrate``), each as is, corrected with the EM-estimated test prior (Saerens et al. 2002)
and, with ``shifts.oracle``, with the true test prior."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from longtail.calibration.calibrators import Calibrator, load_calibrator
from longtail.data.shifts import shifted_test_indices
from longtail.engine.rundir import SHIFTS_FILE, SHIFTS_PREFIX, TABLE_FILE, evals_dir, new_run_dir, write_output
from longtail.functional import em_label_shift, prior_corrected_logits, shot_groups
from longtail.metrics import shift_scores
from longtail.report.shifts import label_shift_plot, shift_position
from longtail.runs import LoadedRun, fitted_calibrators, split_of

__all__ = ["evaluate_shifts", "shift_rows", "markdown_table"]


def shift_rows(logits: torch.Tensor, targets: torch.Tensor, train_counts: list[int],
               variants: dict[str, Calibrator | None],
               factors: list[float], seed: int, model_prior: str = "train", oracle: bool = True
               ) -> list[dict[str, Any]]:
    """One row per (test set, variant, correction). ``variants``: name -> None (the raw model) or a
    fitted calibrator, whose log-probabilities stand for the logits."""
    num_classes = logits.shape[1]
    groups = shot_groups(train_counts)
    prior = torch.tensor(train_counts, dtype=torch.float64) if model_prior == "train" else torch.ones(num_classes)
    prior = prior / prior.sum()
    sets = [("balanced", 1.0, torch.arange(len(targets)))]
    for direction in ("forward", "backward"):
        sets += [(direction, float(f), shifted_test_indices(targets, num_classes, f, direction, seed)) for f in factors]
    rows = []
    for direction, factor, index in sets:
        set_targets = targets[index]
        true_prior = torch.bincount(set_targets, minlength=num_classes).double()
        for name, calibrator in variants.items():
            base = logits[index] if calibrator is None else calibrator.transform(logits[index])
            estimate, _ = em_label_shift(base.double().softmax(1), prior)
            corrected = {name: base, f"{name} + EM prior": prior_corrected_logits(base, prior, estimate)}
            if oracle:
                corrected[f"{name} + true prior"] = prior_corrected_logits(base, prior, true_prior / true_prior.sum())
            for variant, variant_logits in corrected.items():
                row = {"direction": direction, "imbalance_factor": factor, "variant": variant,
                       "num_samples": len(index), **shift_scores(variant_logits.float(), set_targets, groups)}
                if variant.endswith("EM prior"):
                    row["estimated_prior"] = estimate.tolist()
                rows.append(row)
    return rows


def _set_label(direction: str, factor: float) -> str:
    return "balanced" if direction == "balanced" else f"{direction[0].upper()}{factor:g}"


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """Variants down, test sets across (backward IF high → balanced → forward IF high), cells top-1 / ECE (%)."""
    sets = sorted({(r["direction"], r["imbalance_factor"]) for r in rows}, key=lambda s: shift_position(*s))
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    cell = {(r["variant"], r["direction"], r["imbalance_factor"]): r for r in rows}
    lines = ["| top-1 / ECE (%) | " + " | ".join(_set_label(*s) for s in sets) + " |",
             "|---|" + "---:|" * len(sets)]
    for variant in variants:
        values = [cell[(variant, *s)] for s in sets]
        lines.append(f"| {variant} | " + " | ".join(f"{100 * v['top1']:.1f} / {100 * v['ece']:.1f}" for v in values)
                     + " |")
    return "\n".join(lines)


def evaluate_shifts(run: LoadedRun, split: str = "test") -> Path:
    """Write ``RUN/evals/shifts_<checkpoint>/``: shifts.json, table.md and shifts.png."""
    config, bundle = run.config, run.bundle
    outputs = run.evaluate(split_of(run, split), metrics=False).outputs
    variants: dict[str, Calibrator | None] = {"raw": None}
    variants.update({name: load_calibrator(file) for name, file in fitted_calibrators(run.run_dir).items()})
    shifts = config.shifts
    rows = shift_rows(outputs["logits"], outputs["targets"], bundle.train_counts, variants,
                      shifts.imbalance_factors, shifts.seed, shifts.model_prior, shifts.oracle)
    out = new_run_dir(evals_dir(run.run_dir), SHIFTS_PREFIX + run.file.stem)
    table = markdown_table(rows)
    write_output(out / SHIFTS_FILE, json.dumps({"checkpoint": str(run.file), "shifts": shifts.model_dump(),
                                                  "rows": rows}, indent=2))
    write_output(out / TABLE_FILE, table + "\n")
    label_shift_plot(rows, out / "shifts.png", f"{config.name}: label shift")
    print(table)
    return out
