#!/usr/bin/env bash
# Label-shift evaluation of benchmarks/RESULTS.md ("Under label shift"): Digits-LT (IF 10, 30 epochs,
# 80/20 split of the long-tailed training data), CE and balanced softmax, calibrators ts / kt_ts / vs
# fitted on the validation 20%, then `longtail eval --shifts` (forward/backward-LT test sets at
# IF 2, 5, 10, 25, 50 plus the balanced one). Balanced softmax already removes the training prior from
# its softmax, so its prior correction starts from a uniform prior (shifts.model_prior=uniform).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/label_shift}
for loss in ce balanced_softmax; do
  longtail train "output_dir=$OUT" "name=digits_lt_$loss" "loss.name=$loss" data.val_fraction=0.2
  for method in ts kt_ts vs; do
    longtail calibrate "$OUT/digits_lt_$loss" --method "$method"
  done
  prior=train; [ "$loss" = balanced_softmax ] && prior=uniform
  longtail eval "$OUT/digits_lt_$loss" "shifts.model_prior=$prior" --shifts
done
