"""Seed 000 (second paper), Table 1, row "IF=10 / CIFAR-10": every registered calibrator on the
authors' released CIFAR-10-LT (IF = 10) logits, beside the paper's ECE %.

The arrays are those of JiahaoChen1/Calibration (``data/cifar10_{train,val,test}_{z,label,feature}.npy``,
each with a leading axis of 1, as their ``calibration_cifar10.py`` reads ``[0]``). That repository has no
licence: extract them to a scratch folder, never into longtail, e.g. with the bare git dir ``fetch``
gives::

    for f in $(git --git-dir=REPO ls-tree --name-only HEAD data/ | grep npy); do
        git --git-dir=REPO show HEAD:$f > /tmp/kt_arrays/$(basename $f); done
    python benchmarks/kt_table1.py --arrays /tmp/kt_arrays

As the authors' script: every calibrator (its defaults) is fitted on the validation logits (``val``)
and scored on ``test`` by top-label ECE with 15 equal-width bins, the calibrated probabilities in
float64 (a float32 copy moves isotonic outputs that sit exactly on a bin edge, shifting ECE by up to
0.05 points); ``kt_ts`` also gets the validation features and the
training features and labels (its Gaussians), with 4 head classes (their ``--num_head_cls 4``; the
mean-count rule gives the same 4).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import longtail.calibration  # noqa: F401 - registers the calibrators
from longtail.functional import ece
from longtail.registry import CALIBRATORS

# Table 1, IF=10, CIFAR-10 row. The paper's "IR" equals the one-vs-all map (longtail's iso) and its
# "IROvA" the pooled map on these arrays: the two columns are evidently swapped in print.
PAPER = {"uncalibrated": ("Base", 8.39), "ts": ("TS", 2.23), "ets": ("ETS", 1.64), "ts_ir": ("TS-IR", 2.03),
         "iso": ("IR (printed)", 2.29), "ir_pooled": ("IROvA (printed)", 2.42), "sbc": ("SBC", 2.49),
         "gpc": ("GPC", 2.01), "kt_ts": ("Ours (KT)", 1.00)}
# options that depart from a default, shown as extra rows
VARIANTS = [("sbc", {"split": "half"}), ("gpc", {"n_monte_carlo": 0})]


def load_split(folder: Path, split: str, with_features: bool) -> dict[str, torch.Tensor]:
    """One split of the authors' arrays as tensors (their files hold one perturbation: index 0)."""
    names = ["z", "label"] + (["feature"] if with_features else [])
    arrays = {}
    for name in names:
        path = folder / f"cifar10_{split}_{name}.npy"
        if not path.is_file():
            raise SystemExit(f"{path} not found: --arrays must be the folder holding the authors' "
                             "cifar10_{train,val,test}_{z,label,feature}.npy files")
        arrays[name] = torch.from_numpy(np.load(path)[0])
    return arrays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arrays", type=Path, required=True, help="folder with the authors' .npy files")
    args = parser.parse_args()
    val = load_split(args.arrays, "val", with_features=True)
    test = load_split(args.arrays, "test", with_features=False)
    train = load_split(args.arrays, "train", with_features=True)

    test_logits = test["z"].double()
    rows = [("uncalibrated", {}, float(ece(test_logits, test["label"])))]
    for name, params in [(name, {}) for name in CALIBRATORS.names()] + VARIANTS:
        calibrator = CALIBRATORS.build(name, params)
        extra = ({"features": val["feature"], "train_features": train["feature"], "train_targets": train["label"]}
                 if calibrator.needs_features else {})
        calibrator.fit(val["z"], val["label"], **extra)
        rows.append((name, params, float(ece(calibrator.transform(test_logits), test["label"]))))

    print(f"{'calibrator':<34}{'paper column':<18}{'paper ECE %':>12}{'longtail ECE %':>16}")
    for name, params, value in rows:
        column, paper = PAPER.get(name, ("-", float("nan"))) if not params else ("-", float("nan"))
        label = name + (" " + ",".join(f"{k}={v}" for k, v in params.items()) if params else "")
        print(f"{label:<34}{column:<18}{paper:>12.2f}{100 * value:>16.4f}")


if __name__ == "__main__":
    main()
