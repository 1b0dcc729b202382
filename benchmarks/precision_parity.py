"""bfloat16 against float32, paired per seed on every metric (issue 21's accuracy-parity study).

    python benchmarks/reproduction.py runs/studies/cifar10_lt_short_cpu_precision --name precision_parity_cifar10_lt
    python benchmarks/precision_parity.py [benchmarks/results/precision_parity_cifar10_lt.json]

Reads the records that reproduction.py kept (one per run and stage) and pairs each ``<method>_bf16``
row with its ``<method>_fp32`` row of the same stage and seed. For every path (a method, or a stage 2
on it) and metric it prints bf16 − fp32: the per-seed differences, their mean and the paired t-test's
95 % interval (``longtail.report.aggregate.paired_difference``, the same test ``longtail report``
uses), then all paths pooled. "outside noise" on a path is what makes ``train.amp=auto`` fall back to
float32 there (README "Many GPUs, many machines").
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from longtail.report.aggregate import paired_difference

DEFAULT_RECORDS = Path(__file__).resolve().parent / "results" / "precision_parity_cifar10_lt.json"
PRECISIONS = ("bf16", "fp32")
METRICS = ("top1", "many", "medium", "few", "ece", "ece_after_ts")


def _value(record: dict[str, Any], metric: str) -> float | None:
    if metric.startswith("ece_after_"):
        return record["ece_after"].get(metric.removeprefix("ece_after_"))
    return record.get(metric)


def paired_values(records: Sequence[dict[str, Any]]) -> dict[tuple[str, str], dict[str, dict[int, float]]]:
    """{(path, metric): {precision: {seed: value}}}; a path is the method without its precision suffix,
    with the stage-2 part of the recipe label kept (``ce · crt``)."""
    table: dict[tuple[str, str], dict[str, dict[int, float]]] = {}
    for record in records:
        match = re.fullmatch(r"(.+)_(bf16|fp32)((?: · .+)?)", record["method"])
        if not match:
            continue
        path = match.group(1) + match.group(3)
        for metric in METRICS:
            value = _value(record, metric)
            if value is not None:
                table.setdefault((path, metric), {p: {} for p in PRECISIONS})[match.group(2)][record["seed"]] = value
    return table


def _signed(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:+.2f}"


def parity_rows(records: Sequence[dict[str, Any]]) -> list[list[str]]:
    """One row per path and metric with both precisions on a shared seed, then one pooled row per metric."""
    rows, pooled = [], {metric: ({}, {}) for metric in METRICS}
    for (path, metric), by_precision in sorted(paired_values(records).items(),
                                               key=lambda item: (item[0][0], METRICS.index(item[0][1]))):
        bf16, fp32 = by_precision["bf16"], by_precision["fp32"]
        seeds = sorted(set(bf16) & set(fp32))
        if not seeds:
            continue
        test = paired_difference(bf16, fp32)
        rows.append([path, metric, " ".join(_signed(bf16[s] - fp32[s]) for s in seeds), _signed(test["mean"]),
                     f"[{_signed(test['low'])}, {_signed(test['high'])}]", test["verdict"]])
        for seed in seeds:
            pooled[metric][0][(path, seed)] = bf16[seed]
            pooled[metric][1][(path, seed)] = fp32[seed]
    for metric, (bf16, fp32) in pooled.items():
        if bf16:
            test = paired_difference(bf16, fp32)
            rows.append([f"all paths ({test['n']} pairs)", metric, "", _signed(test["mean"]),
                         f"[{_signed(test['low'])}, {_signed(test['high'])}]", test["verdict"]])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", type=Path, nargs="?", default=DEFAULT_RECORDS,
                        help="records kept by benchmarks/reproduction.py (default: the parity study's)")
    args = parser.parse_args(argv)
    rows = parity_rows(json.loads(args.records.read_text(encoding="utf-8")))
    header = ["path", "metric", "bf16 − fp32 per seed", "mean", "95 % interval", "paired t-test"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
