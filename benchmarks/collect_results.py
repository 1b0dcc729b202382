"""Markdown tables for benchmarks/RESULTS.md from the runs of benchmarks/run_all_cpu.sh.

    python benchmarks/collect_results.py [runs/bench_cpu]

Reads each short-schedule run (metrics.json, metrics.csv and GNU time's time_<name>.txt), the
stage-2 folders of the CE run and its calibration folders; prints three tables: methods, stage 2
against its stage-1 row, and ECE before/after each calibrator overall and per shot group.
"""
from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

GROUPS = ("many", "medium", "few")
SHORT = ("ce", "balanced_softmax", "ldam_drw", "bbn", "ride", "shike", "balanced_softmax_ikl")
STAGE2 = ("crt", "lws", "tau_norm", "mislas", "ladc")
CALIBRATORS = ("ts", "ets", "hist", "iso", "kt_ts")


def pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def gnu_time(path: Path) -> dict[str, float]:
    """Wall seconds and peak resident memory (MiB) from ``/usr/bin/time -v`` output."""
    if not path.is_file():
        return {}
    text = path.read_text()
    out: dict[str, float] = {}
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if rss:
        out["peak_mib"] = int(rss.group(1)) / 1024
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text)
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = 60 * seconds + float(part)
        out["wall_s"] = seconds
    return out


def train_seconds(run: Path) -> float:
    with (run / "metrics.csv").open() as handle:
        return sum(float(row["epoch_seconds"]) for row in csv.DictReader(handle) if row.get("epoch_seconds"))


def accuracy_cells(test: dict) -> list[str]:
    return [pct(test["top1"]), *(pct(test.get(f"{g}_top1")) for g in GROUPS), pct(test["ece"])]


def methods_table(root: Path) -> str:
    lines = ["| method | top-1 | many | medium | few | ECE | per-expert top-1 | train s | wall s | peak MiB |",
             "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
    for name in SHORT:
        run = root / f"cifar10_lt_if100_{name}"
        if not (run / "metrics.json").is_file():
            continue
        test = json.loads((run / "metrics.json").read_text())["last"]["test"]
        experts = ", ".join(pct(a) for a in test.get("expert_top1", [])) or "–"
        timing = gnu_time(root / f"time_{name}.txt")
        lines.append(f"| {name} | " + " | ".join(accuracy_cells(test)) + f" | {experts} | {train_seconds(run):.0f} | "
                     f"{timing.get('wall_s', 0):.0f} | {timing.get('peak_mib', 0):.0f} |")
        stage2 = run / "stage2" / "metrics.json"
        if stage2.is_file():  # SHIKE's own stage 2 (per-expert heads)
            result = json.loads(stage2.read_text())
            s2 = result["last"]["test"]
            experts = ", ".join(pct(a) for a in s2.get("expert_top1", [])) or "–"
            lines.append(f"| {name} + its stage 2 ({result['method']}) | " + " | ".join(accuracy_cells(s2))
                         + f" | {experts} | {result['seconds']:.0f} (stage 2) | | |")
    return "\n".join(lines)


def stage2_table(root: Path) -> str:
    run = root / "cifar10_lt_if100_ce"
    lines = ["| model | top-1 | many | medium | few | ECE | stage-2 s (fit) | s with evaluation |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if (run / "metrics.json").is_file():
        test = json.loads((run / "metrics.json").read_text())["last"]["test"]
        lines.append("| stage 1 (CE) | " + " | ".join(accuracy_cells(test)) + " | – | – |")
    for method in STAGE2:
        for folder in sorted(run.glob(f"stage2_{method}*")):
            if not re.fullmatch(rf"stage2_{method}(-\d+)?", folder.name) or not (folder / "metrics.json").is_file():
                continue
            result = json.loads((folder / "metrics.json").read_text())
            lines.append(f"| + {folder.name.removeprefix('stage2_')} | " + " | ".join(accuracy_cells(result["last"]["test"]))
                         + f" | {result['train_seconds']:.1f} | {result['seconds']:.1f} |")
    return "\n".join(lines)


def calibration_table(run: Path) -> str:
    lines = ["| calibrator | top-1 | ECE | many ECE | medium ECE | few ECE | NLL | conf − acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    base_written = False
    for method in CALIBRATORS:
        path = run / "calibration" / method / "metrics.json"
        if not path.is_file():
            continue
        rows = json.loads(path.read_text())["rows"]
        for name in (("uncalibrated",) if not base_written else ()) + (method,):
            row = rows[name]
            lines.append(f"| {name} | {pct(row['top1'])} | {pct(row['ece'])} | "
                         + " | ".join(pct(row.get(f"{g}_ece")) for g in GROUPS)
                         + f" | {row['nll']:.3f} | {100 * row['confidence_minus_accuracy']:+.1f} |")
        base_written = True
    return "\n".join(lines)


def main() -> int:
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/bench_cpu")
    print("## Methods on the short schedule\n")
    print(methods_table(root))
    print("\n## Stage 2 on the CE run\n")
    print(stage2_table(root))
    for run in sorted(root.glob("cifar10_lt_if*_ce"), key=lambda path: -int(path.name.split("_if")[1].split("_")[0])):
        if (run / "calibration").is_dir():
            print(f"\n## Calibrators on {run.name} (fitted on the 20 % validation split)\n")
            print(calibration_table(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
