#!/usr/bin/env bash
# Balanced softmax + IKL with ICL on the raw logits (seed 004 eq. 8 as printed) and on the logits the
# base loss trains (loss.params.icl_logits=adjusted), on the short CPU schedule of RESULTS.md (EPOCHS=10) with a
# 10 % validation split, one run after the other (2 cores). The reading is chosen by validation top-1.
#   bash benchmarks/ikl_icl_cpu.sh [raw adjusted]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench_cpu_ikl_icl}
COMMON=("train.epochs=${EPOCHS:-10}" schedule.name=cosine schedule.warmup_epochs=0.5 data.val_fraction=0.1
        train.eval_every=0 train.select=last "output_dir=$OUT")
for reading in "${@:-raw adjusted}"; do
  for name in $reading; do
    mkdir -p "$OUT"
    /usr/bin/time -v -o "$OUT/time_$name.txt" longtail train configs/cifar10_lt/if100/balanced_softmax_ikl.yaml \
      "${COMMON[@]}" "loss.params.icl_logits=$name" "name=cifar10_lt_if100_balanced_softmax_ikl_icl_$name"
  done
done
