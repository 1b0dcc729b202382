"""Compare runs: per-run rows, recipes' mean ± std over seeds with paired differences, the papers'
numbers where the setting matches, plots; written as report.md and a self-contained report.html."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml

from longtail.engine.rundir import (PLOTS_DIR, RELIABILITY_PLOT, STUDY_MARKER, calibration_records, config_file,
                                    is_finished, kept_origin, kept_runs, metrics_file, stage2_dirs, stage2_label,
                                    study_file, study_marker, write_output)
from longtail.report.aggregate import METRICS, Group, group_rows, mean_std, pairwise
from longtail.report.html import write_html
from longtail.report.papers import PAPER_NUMBERS_ENV, PaperNumbersNotFound, load_paper_numbers, paper_entry_for
from longtail.report.plots import accuracy_by_class_size, calibration_bars, learning_curves, shot_group_bars
from longtail.report.records import learning_curve, records

__all__ = ["STUDY_MARKER", "expand_runs", "load_run", "rows_for", "write_report"]

# the paired comparisons: top-1 on the (balanced) test set; on a long-tailed validation split top-1
# rewards the head bias, so selection there compares class-averaged accuracy
PAIRED_METRICS = {"test": ("top1", "ece"), "val": ("class_avg_top1", "ece")}
SPLITS = tuple(PAIRED_METRICS)


def expand_runs(paths: Sequence[Path]) -> tuple[list[Path], list[Path], list[Path]]:
    """(runs to report, study runs still missing steps, study runs not trained yet): a run directory
    stands for itself; a study folder for its runs (``<cell>/seed<k>``), and so does a folder of runs
    kept by benchmarks/reproduction.py (``<recipe>/seed<k>``, the copies outliving the study). A study
    run whose training finished is reported even while some of its stage-2 or calibration steps are
    still to run (a study is often read while it runs): every stage it reports is finished, and ``n``
    says how many."""
    runs: list[Path] = []
    partial: list[Path] = []
    untrained: list[Path] = []
    for path in _distinct(map(Path, paths)):
        if is_finished(path):
            runs.append(path)
            continue
        if not study_file(path).is_file():
            kept = [run for run in kept_runs(path) if is_finished(run)]
            if kept:
                runs.extend(kept)
                continue
            raise FileNotFoundError(f"{path} is neither a finished run (metrics.json), a study folder (study.yaml, "
                                    "written by `longtail study`) nor a folder of kept runs (benchmarks/reproduction.py); "
                                    "give finished `longtail train` runs or a study")
        for cell in sorted(p for p in path.glob("*/*") if config_file(p).is_file()):
            if study_marker(cell).is_file():
                runs.append(cell)
            elif is_finished(cell):
                runs.append(cell)
                partial.append(cell)
            else:
                untrained.append(cell)
    return _distinct(runs), partial, untrained


def _distinct(paths: Iterable[Path]) -> list[Path]:
    """``paths`` in order, each folder once however it was spelled (``DIR DIR``, ``DIR/``, a link, a
    study and one of its runs): a run given twice is one run, not two seeds."""
    seen: set[Path] = set()
    out = []
    for path in paths:
        real = path.resolve()
        if real not in seen:
            seen.add(real)
            out.append(path)
    return out


def read_json(path: Path) -> Any:
    """A JSON file of a run; a damaged one is named (ValueError) instead of a bare parser message."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON ({error}); rerun the step that wrote it, or move the run "
                         "out of the report") from None


def load_run(run_dir: Path) -> dict[str, Any]:
    path = metrics_file(run_dir)
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no metrics.json; is it a finished `longtail train` run?")
    results = _checked(read_json(path), path)
    # stage 2 of the recipe (RUN/stage2) and those of `longtail stage2` (RUN/stage2_<method>[-N])
    results["stage2"] = {folder.name: _checked(read_json(metrics_file(folder)), metrics_file(folder))
                         for folder in stage2_dirs(run_dir) if is_finished(folder)}
    return results


def _checked(results: Any, path: Path) -> dict[str, Any]:
    """A metrics.json as `longtail train` writes it: {"last": {"test": {"top1": ...}, ...}, ...}."""
    def stage_ok(stage: Any) -> bool:
        splits = [stage[key] for key in SPLITS if key in stage] if isinstance(stage, dict) else []
        return bool(splits) and all(isinstance(m, dict) and isinstance(m.get("top1"), (int, float)) for m in splits)

    if not (isinstance(results, dict) and stage_ok(results.get("last"))
            and ("best" not in results or stage_ok(results["best"]))):
        raise ValueError(f"{path} is valid JSON but not a longtail metrics.json (expected "
                         '{"last": {"test": {"top1": ...}}}); rerun the step that wrote it, or move the run out of '
                         "the report")
    return results


def _calibration(folder: Path) -> dict[str, float]:
    """Test ECE after each calibrator fitted on this model (RUN[/stage2...]/calibration/<method>)."""
    out = {}
    for path in calibration_records(folder):
        record = read_json(path)
        try:
            out[path.parent.name] = float(record["after"]["ece"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path} is valid JSON but not a calibration metrics.json (no after.ece)") from None
    return out


def _config(folder: Path) -> dict[str, Any]:
    path = config_file(folder)
    if not path.is_file():
        return {}
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not hold a config (a mapping of sections)")
    return config


def _metrics(results: dict[str, Any], split: str, where: Path) -> dict[str, Any]:
    """The ``split`` metrics of one result, with the class-averaged top-1 added."""
    if split not in results:
        raise FileNotFoundError(f"{where} has no {split} metrics" + (
            " (it was trained without a validation split: data.val_fraction)" if split == "val" else ""))
    metrics = dict(results[split])
    per_class = [a for a in metrics.get("per_class_top1") or [] if a is not None]
    metrics["class_avg_top1"] = sum(per_class) / len(per_class) if per_class else None
    return metrics


def _recipe(run_dir: Path, config: dict[str, Any]) -> str:
    """A study run's cell (also when kept: KEPT/<recipe>/seed<k>), else the run's config name."""
    marker = study_marker(run_dir)
    if marker.is_file():
        return read_json(marker).get("cell") or run_dir.parent.name
    if study_file(run_dir.parent.parent).is_file():  # a study run with steps still to run: STUDY/<cell>/seed<k>
        return run_dir.parent.name
    if kept_origin(run_dir).is_file():  # kept without the study's marker: the folder names the recipe
        return run_dir.parent.name
    return config.get("name", run_dir.name)


def rows_for(run_dir: Path, split: str = "test", recipe: str | None = None) -> list[dict[str, Any]]:
    """One row per stage of a run (stage 1 'last', its 'best' if selected, each stage 2), with what
    grouping needs: the recipe (``recipe``, else a study's cell, else the config's name), the seeds, the
    config. ``split="val"`` reads the validation metrics (for choosing between readings without the test
    set)."""
    results = load_run(run_dir)
    config = _config(run_dir)
    if recipe is None:
        recipe = _recipe(run_dir, config)
    pair = (config.get("seed"), (config.get("data") or {}).get("selection_seed"))
    base = {"run": run_dir.name, "recipe": recipe, "pair": pair, "path": run_dir}
    rows = []
    for key in ("last", "best"):
        if key in results:
            rows.append({**_metrics(results[key], split, run_dir), **base, "stage": key,
                         "label": recipe if key == "last" else f"{recipe} · best", "config": config,
                         "folder": run_dir,
                         "calibrators": _calibration(run_dir) if key == "last" and split == "test" else {}})
    for name, stage2 in results["stage2"].items():
        folder = run_dir / name
        label = stage2_label(folder) or stage2.get("method", "?")
        rows.append({**_metrics(stage2["last"], split, folder), **base, "stage": f"stage 2 ({label})",
                     "label": f"{recipe} · {label}", "config": _config(folder) or config, "folder": folder,
                     "calibrators": _calibration(folder) if split == "test" else {}})
    return rows


def pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.2f}"


def format_mean_std(values: Sequence[float], metric: str) -> str:
    if not values:
        return "–"
    mean, std = mean_std(values)
    scale, digits = (1, 3) if metric == "nll" else (100, 2)
    return f"{scale * mean:.{digits}f} ± {'–' if std is None else f'{scale * std:.{digits}f}'}"


def _paper_cells(group: Group, entry: dict[str, Any] | None, metric: str) -> list[str]:
    """The paper's value of ``metric`` (in %) and our mean minus it, or dashes."""
    paper = entry["metrics"].get(metric) if entry else None
    ours = group.values(metric)
    if paper is None:
        return ["–", "–"]
    return [f"{paper:.2f}", f"{100 * mean_std(ours)[0] - paper:+.2f}" if ours else "–"]


def summary_rows(groups: Sequence[Group], papers: Sequence[dict[str, Any]] | None) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the recipes' table: n, mean ± std of each metric and each calibrator's ECE,
    the paper's top-1 and ECE and our mean minus them where the setting matches (no paper columns
    when ``papers`` is None: a validation-split report)."""
    calibrators = sorted({m for g in groups for m in g.calibrators()})
    header = ["recipe", "n", *(title for _, title in METRICS), *(f"ECE after {m}" for m in calibrators)]
    if papers is not None:
        header += ["paper top-1", "ours − paper top-1", "paper ECE", "ours − paper ECE", "paper source"]
    cells = []
    for group in groups:
        row = [group.label, str(group.n), *(format_mean_std(group.values(m), m) for m, _ in METRICS),
               *(format_mean_std(group.calibrated_ece(m), "ece") for m in calibrators)]
        if papers is not None:
            entry = paper_entry_for(group.rows[0], papers)
            row += [*_paper_cells(group, entry, "top1"), *_paper_cells(group, entry, "ece"), _source(entry)]
        cells.append(row)
    return header, cells


def _source(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "–"
    text = f"{entry['paper']}, {entry['table']}, row {entry['row']!r} (model selection: {entry['selection']})"
    return text + "".join(f"; also {other}" for other in entry.get("also", []))


def pairwise_rows(groups: Sequence[Group], baselines: Sequence[str] = (),
                  split: str = "test") -> tuple[list[str], list[list[str]], int]:
    """Header and cells of the paired differences with two shared seeds or more, and how many pairs
    share only one: their difference is the recipes table's, and one run each says nothing of a
    1–2 point gap, so a report of many one-seed recipes does not list them."""
    header = ["A", "B", "metric", "n seeds", "A − B (mean)", "95% interval", "p (paired t)", "verdict"]
    unknown = sorted(set(baselines) - {g.label for g in groups})
    if unknown:
        raise ValueError(f"--baseline {unknown[0]!r} is not a group of this report; the groups are: "
                         + ", ".join(g.label for g in groups))
    cells, single_seed = [], 0
    for metric in PAIRED_METRICS[split]:
        for item in pairwise(groups, metric, baselines=baselines):
            if item["n"] < 2:
                single_seed += 1
                continue
            cells.append([item["a"], item["b"], dict(METRICS)[metric], str(item["n"]), f"{100 * item['mean']:+.2f}",
                          f"[{100 * item['low']:+.2f}, {100 * item['high']:+.2f}]", f"{item['p']:.3f}",
                          item["verdict"]])
    return header, cells, single_seed


def differences_note(cells: Sequence[Sequence[str]], single_seed: int) -> str:
    """What the differences section says besides its table."""
    if not cells and not single_seed:
        return "No two groups share a data setting and seeds."
    if not single_seed:
        return ""
    return (f"{single_seed} comparison(s) (a pair of groups on one metric) rest on a single shared seed: not listed, "
            "as one run each cannot tell a difference from seed noise (train more seeds: `seeds` in the study).")


def markdown(header: Sequence[str], cells: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def write_report(paths: Sequence[Path], out: Path, papers: str | Path | None = None,
                 baselines: Sequence[str] = (), split: str = "test") -> Path:
    """``out`` is a folder: report.md, report.html (self-contained) and the plots as PNGs. ``baselines``
    (group labels such as ``ce``) limits the paired differences to the pairs containing one of them.
    ``split="val"`` reports the validation split instead of the test set, with no paper column (the
    papers report test numbers) and no calibrators (they were fitted on that split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    runs, partial, untrained = expand_runs(paths)
    if not runs:
        raise FileNotFoundError(f"no finished runs in {', '.join(map(str, paths))} ({len(untrained)} not trained yet)")
    rows = [row for run in runs for row in rows_for(run, split)]
    try:
        groups = group_rows(rows)
    except ValueError as error:
        raise FileNotFoundError(str(error)) from None
    entries, papers_missing = None, ""
    if split == "test":
        try:
            entries = load_paper_numbers(papers)
        except PaperNumbersNotFound as error:
            if papers is not None or os.environ.get(PAPER_NUMBERS_ENV):
                raise  # a file the user named is missing
            entries, papers_missing = [], f" No paper numbers were read: {error}."  # an installed package
    paired_header, paired_cells, single_seed = pairwise_rows(groups, baselines, split)
    paired = (paired_header, paired_cells)
    paired_note = differences_note(paired_cells, single_seed)
    out.mkdir(parents=True, exist_ok=True)
    summary = summary_rows(groups, entries)
    runs_table = runs_rows(rows)
    plots = {"shot groups (mean ± std over seeds)": shot_group_bars(groups, out / "shot_groups.png"),
             "accuracy against class size (mean over seeds)": accuracy_by_class_size(groups, out / "class_size.png")}
    if any(g.calibrators() for g in groups):
        plots["ECE before and after each calibrator"] = calibration_bars(groups, out / "calibration.png")
    curves = {f"{row['label']} · seed {row['pair'][0]}": learning_curve(row["folder"], split)
              for row in rows if row["stage"] == "last"}
    curve_plot = learning_curves(curves, out / "learning_curves.png", split)
    if curve_plot is not None:
        plots["learning curves (evaluated every train.eval_every epochs)"] = curve_plot
    reliability = {g.label: g.rows[0]["folder"] / PLOTS_DIR / RELIABILITY_PLOT for g in groups}
    reliability = {label: path for label, path in reliability.items() if path.is_file() and split == "test"}
    note = " ".join([f"Metrics of the {'test set' if split == 'test' else 'validation split (for selection)'}.",
                     *([f"{len(partial)} study runs still have stage-2 or calibration steps to run (their finished "
                        "stages are included)."] if partial else []),
                     *([f"{len(untrained)} study runs are not trained yet."] if untrained else [])])
    papers_line = ("Paper values are shown only where dataset, imbalance factor, backbone, schedule length and method "
                   "match the run's config (benchmarks/paper_numbers.yaml)." + papers_missing
                   if entries is not None else "No paper column: the papers report the test set.")
    text = ["# longtail report", "",
            f"{len(runs)} runs in {len(groups)} groups (recipe · stage); mean ± sample std over the seeds, n = runs. "
            + note, "", "## Recipes", "", markdown(*summary), "", papers_line, "",
            "## Differences (paired over shared seeds)", "",
            *([markdown(*paired), ""] if paired[1] else []), *([paired_note, ""] if paired_note else []),
            "*within noise*: the 95% interval of the mean paired difference contains 0 (paired t-test, p ≥ 0.05).",
            "", "## Runs", "", markdown(*runs_table), "",
            *(f"![{title}]({path.name})" for title, path in plots.items()), ""]
    write_output(out / "report.md", "\n".join(text))
    write_output(out / "report.json", json.dumps(records(rows, entries), indent=2))
    write_html(out / "report.html", summary, paired, runs_table, plots, reliability, note, paired_note)
    return out / "report.md"


def runs_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Every stage of every run, with its folder and seeds."""
    header = ["run", "recipe", "stage", "seed", "subset", *(title for _, title in METRICS), "experts top-1"]
    cells = [[str(row["path"]), row["recipe"], row["stage"], str(row["pair"][0]), str(row["pair"][1]),
              *(("–" if row.get(m) is None else f"{row[m]:.3f}") if m == "nll" else pct(row.get(m))
                for m, _ in METRICS),
              ", ".join(pct(v) for v in row.get("expert_top1", [])) or "–"] for row in rows]
    return header, cells
