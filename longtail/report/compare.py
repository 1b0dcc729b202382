"""Compare runs: one Markdown table (top-1, many/medium/few, ECE, per-expert accuracy) and one plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def load_run(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.json; is it a finished `longtail train` run?")
    results = json.loads(path.read_text())
    # stage 2 of the recipe (RUN/stage2) and those of `longtail stage2` (RUN/stage2_<method>[-N])
    folders = [run_dir / "stage2", *sorted(run_dir.glob("stage2_*"))]
    results["stage2"] = {folder.name: json.loads((folder / "metrics.json").read_text())
                         for folder in folders if (folder / "metrics.json").is_file()}
    return results


def rows_for(run_dir: Path) -> list[dict[str, Any]]:
    """One row per stage of a run (stage 1 'last', its 'best' if selected, stage 2 if present)."""
    results = load_run(run_dir)
    rows = []
    for key, label in (("last", "last"), ("best", "best")):
        if key in results:
            rows.append({"run": run_dir.name, "stage": label, **results[key]["test"]})
    for folder, stage2 in results["stage2"].items():
        label = stage2.get("method", "?") if folder == "stage2" else folder.removeprefix("stage2_")
        rows.append({"run": run_dir.name, "stage": f"stage 2 ({label})", **stage2["last"]["test"]})
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    def pct(value: Any) -> str:
        return "–" if value is None else f"{100 * value:.2f}"
    lines = ["| run | stage | top-1 | many | medium | few | ECE | NLL | experts top-1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        experts = ", ".join(pct(v) for v in row.get("expert_top1", [])) or "–"
        lines.append(f"| {row['run']} | {row['stage']} | {pct(row['top1'])} | {pct(row.get('many_top1'))} | "
                     f"{pct(row.get('medium_top1'))} | {pct(row.get('few_top1'))} | {pct(row['ece'])} | "
                     f"{row['nll']:.3f} | {experts} |")
    return "\n".join(lines)


def comparison_plot(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    groups = ["top1", "many_top1", "medium_top1", "few_top1"]
    width = 0.8 / max(len(rows), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.5 * len(groups) + 0.3 * len(rows)), 4))
    for i, row in enumerate(rows):
        values = [100 * (row.get(g) or 0) for g in groups]
        ax.bar([g + i * width for g in range(len(groups))], values, width=width, label=f"{row['run']} {row['stage']}")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], ["overall", "many", "medium", "few"])
    ax.set_ylabel("test top-1 (%)")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dirs: Sequence[Path], out: Path) -> Path:
    """``out`` is a folder: report.md and comparison.png."""
    rows = [row for run in run_dirs for row in rows_for(Path(run))]
    out.mkdir(parents=True, exist_ok=True)
    comparison_plot(rows, out / "comparison.png")
    text = "# longtail report\n\n" + markdown_table(rows) + "\n\n![comparison](comparison.png)\n"
    (out / "report.md").write_text(text)
    return out / "report.md"
