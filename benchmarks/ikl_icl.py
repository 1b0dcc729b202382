"""Balanced softmax + IKL with ICL on the raw logits (seed 004 eq. 8 as printed) or on the logits the
base loss trains (``loss.params.icl_logits=adjusted``), several seeds each, one run after another.
The reading is chosen on the validation split (never the test set); both are reported.

    python benchmarks/ikl_icl.py [--recipe configs/digits_lt/ce.yaml] [--seeds 5] [--readings raw adjusted none]
                                 [overrides ...]

Defaults: Digits-LT at IF 100, its MLP recipe (30 epochs), a 10 % stratified validation split,
exact medians and predictions (the set is tiny), last epoch reported.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DIGITS = ["data.imbalance_factor=100", "loss.name=ikl", "loss.params.base=balanced_softmax",
          "loss.params.median_cap=null", "loss.params.topk=null", "data.val_fraction=0.1", "train.select=last"]


def mean_per_class(split: dict) -> float:
    accuracies = [a for a in split["per_class_top1"] if a is not None]
    return sum(accuracies) / len(accuracies)


def main() -> None:
    from longtail.cli import main as cli
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default=str(REPO / "configs/digits_lt/ce.yaml"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--readings", nargs="+", default=["raw", "adjusted"],
                        help="raw, adjusted, and/or none (the base loss alone: IKL with max_alpha 0)")
    parser.add_argument("overrides", nargs="*", default=DIGITS)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as out:
        for reading in args.readings:
            runs = []
            for seed in range(args.seeds):
                name = f"{reading}_{seed}"
                choice = "loss.params.max_alpha=0" if reading == "none" else f"loss.params.icl_logits={reading}"
                assert cli(["train", args.recipe, *args.overrides, choice, f"seed={seed}", f"output_dir={out}",
                            f"name={name}"]) == 0
                runs.append(json.loads((Path(out) / name / "metrics.json").read_text())["last"])
            def avg(get):
                values = [100 * get(r) for r in runs]
                spread = statistics.stdev(values) if len(values) > 1 else 0.0
                return round(statistics.mean(values), 2), round(spread, 2)
            groups = {f"test_{g}": avg(lambda r, g=g: r["test"][f"{g}_top1"]) for g in ("many", "medium", "few")}
            rows[reading] = {"val_top1": avg(lambda r: r["val"]["top1"]),
                             "val_mean_per_class": avg(lambda r: mean_per_class(r["val"])),
                             "test_top1": avg(lambda r: r["test"]["top1"]), **groups}
    chosen = max((k for k in rows if k != "none"), key=lambda k: rows[k]["val_top1"][0], default=None)
    print(json.dumps({"recipe": args.recipe, "overrides": args.overrides, "seeds": args.seeds,
                      "mean_and_sd": rows, "chosen_by_val_top1": chosen}, indent=2))


if __name__ == "__main__":
    main()
