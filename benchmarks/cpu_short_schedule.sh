#!/usr/bin/env bash
# The short CPU schedule of benchmarks/RESULTS.md: CIFAR-10-LT IF=100 (shared JPEG CIFAR-10),
# ResNet-32, 10 epochs, cosine lr, 80/20 split of the long-tailed training data (the validation 20%
# feeds calibration and stage-2 selection). One run after another, never two at once (2 cores).
#   bash benchmarks/cpu_short_schedule.sh [losses...]      (default: ce balanced_softmax ldam_drw)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench_cpu}
COMMON=(train.epochs=10 schedule.name=cosine schedule.warmup_epochs=0.5 data.val_fraction=0.2
        train.eval_every=0 "output_dir=$OUT")
for loss in "${@:-ce balanced_softmax ldam_drw}"; do
  for name in $loss; do
    extra=()
    [ "$name" = ldam_drw ] && extra=(loss.params.drw_epoch=8)
    mkdir -p "$OUT"
    # peak host memory and wall time of the whole command (GNU time)
    /usr/bin/time -v -o "$OUT/time_$name.txt" longtail train "configs/cifar10_lt/if100/$name.yaml" \
      "${COMMON[@]}" "${extra[@]}"
  done
done
