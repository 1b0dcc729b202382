"""Runs grouped by recipe: mean ± std over seeds, and paired differences between recipes.

Two recipes are compared only on the seeds both ran (the same training seed and long-tailed subset),
with a paired t-test (``scipy.stats.ttest_rel``): with a handful of seeds the seed-to-seed swing of
long-tailed benchmarks is often as large as the gap between methods, and the report says so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import combinations
from typing import Any, Sequence

import numpy as np
from scipy import stats

__all__ = ["METRICS", "Group", "group_rows", "paired_difference", "pairwise", "mean_std"]

# (key in a row, column title); percentages except NLL. "class-avg" is the mean per-class top-1: equal to
# top-1 on a balanced test set, and the fair criterion on a long-tailed split (top-1 there rewards head bias)
METRICS = (("top1", "top-1"), ("class_avg_top1", "class-avg"), ("many_top1", "many"), ("medium_top1", "medium"),
           ("few_top1", "few"), ("ece", "ECE"), ("nll", "NLL"))
DATA_KEYS = ("data.dataset", "data.imbalance_factor", "data.profile", "data.max_count", "data.val_fraction",
             "data.val_source")


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof=1; None for one value)."""
    array = np.asarray(values, dtype=float)
    return float(array.mean()), (float(array.std(ddof=1)) if len(array) > 1 else None)


def config_value(config: dict[str, Any], dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


@dataclass
class Group:
    """Every run of one recipe (and stage) in one data setting."""

    label: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.rows)

    @property
    def data_setting(self) -> tuple:
        return tuple(config_value(self.rows[0]["config"], key) for key in DATA_KEYS)

    def values(self, metric: str) -> list[float]:
        return [row[metric] for row in self.rows if row.get(metric) is not None]

    def by_pair(self, metric: str) -> dict[tuple, float]:
        return {row["pair"]: row[metric] for row in self.rows if row.get(metric) is not None}

    def calibrators(self) -> list[str]:
        return sorted({method for row in self.rows for method in row.get("calibrators", {})})

    def calibrated_ece(self, method: str) -> list[float]:
        return [row["calibrators"][method] for row in self.rows if method in row.get("calibrators", {})]


def group_rows(rows: Sequence[dict[str, Any]]) -> list[Group]:
    """Rows with the same label (recipe · stage) form a group; the same label in two data settings
    (e.g. a grid over the imbalance factor without the grid in the name) is an error, not an average."""
    groups: dict[str, Group] = {}
    for row in rows:
        groups.setdefault(row["label"], Group(row["label"])).rows.append(row)
    for group in groups.values():
        settings = {tuple(config_value(r["config"], k) for k in DATA_KEYS) for r in group.rows}
        if len(settings) > 1:
            raise ValueError(f"runs labelled {group.label!r} differ in their data ({sorted(map(str, settings))}); "
                             "give them different names (a study's grid puts the values in the cell name)")
    return list(groups.values())


def paired_difference(a: dict[tuple, float], b: dict[tuple, float], alpha: float = 0.05) -> dict[str, Any]:
    """a − b over the seeds both have: mean, the (1 − alpha) t-interval, the paired t-test's p and a
    verdict (``within noise`` when the interval contains 0)."""
    common = sorted(set(a) & set(b))
    diffs = np.array([a[k] - b[k] for k in common], dtype=float)
    result: dict[str, Any] = {"n": len(common), "mean": float(diffs.mean()) if len(common) else math.nan,
                              "low": math.nan, "high": math.nan, "p": math.nan}
    if len(common) < 2:
        result["verdict"] = "cannot tell (fewer than 2 shared seeds)"
        return result
    spread = float(diffs.std(ddof=1))
    if spread == 0.0:  # the t statistic is undefined; every seed gave the same difference
        result.update(low=result["mean"], high=result["mean"], p=1.0 if result["mean"] == 0 else 0.0)
    else:
        half = float(stats.t.ppf(1 - alpha / 2, len(common) - 1)) * spread / math.sqrt(len(common))
        result.update(low=result["mean"] - half, high=result["mean"] + half,
                      p=float(stats.ttest_rel([a[k] for k in common], [b[k] for k in common]).pvalue))
    result["verdict"] = "within noise" if result["p"] >= alpha else "outside noise"
    return result


def pairwise(groups: Sequence[Group], metric: str, alpha: float = 0.05,
             baselines: Sequence[str] = ()) -> list[dict[str, Any]]:
    """Every pair of groups in the same data setting that share seeds: ``paired_difference`` of ``metric``.
    With ``baselines`` (group labels) only the pairs that contain one of them, as "other − baseline": a
    study of 20 groups has 190 pairs, and a reader usually asks "which beat CE?"."""
    out = []
    for first, second in combinations(groups, 2):
        if first.data_setting != second.data_setting:
            continue
        if baselines and first.label not in baselines and second.label not in baselines:
            continue
        if first.label in baselines and second.label not in baselines:
            first, second = second, first  # "method − baseline", so a gain reads positive
        a, b = first.by_pair(metric), second.by_pair(metric)
        if set(a) & set(b):
            out.append({"a": first.label, "b": second.label, "metric": metric, **paired_difference(a, b, alpha)})
    return out
