#!/usr/bin/env bash
# Multi-expert and IKL recipes on the short CPU schedule of benchmarks/cpu_short_schedule.sh:
# CIFAR-10-LT IF=100 (shared JPEG CIFAR-10), 10 epochs, cosine lr, 80/20 split of the long-tailed
# training data, one run after another (never two at once: 2 cores).
#   bash benchmarks/multi_expert_cpu.sh [methods...]   (default: bbn ride shike balanced_softmax_ikl)
# Epoch-based switches are scaled to 10 epochs (RIDE's DRW and class-wise diversity temperatures at
# epoch 8 = 80 %, as ldam_drw in cpu_short_schedule.sh); SHIKE runs its 20 classifier-retraining epochs
# on cached features after the 10 representation epochs (stage2).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/bench_cpu}
# the baselines' schedule exactly: the recipes' per-epoch warm-up settings are reset to the defaults
COMMON=(train.epochs=10 schedule.name=cosine schedule.warmup_epochs=0.5 data.val_fraction=0.2
        train.eval_every=0 "output_dir=$OUT" schedule.warmup_start_factor=0 schedule.per_step=true)
methods=("$@")
[ ${#methods[@]} -eq 0 ] && methods=(bbn ride shike balanced_softmax_ikl)
mkdir -p "$OUT"
for name in "${methods[@]}"; do
  extra=()
  [ "$name" = ride ] && extra=(loss.params.base_params.drw_epoch=8 loss.params.reweight_epoch=8)
  # peak host memory and wall time of the whole command (GNU time)
  /usr/bin/time -v -o "$OUT/time_$name.txt" longtail train "configs/cifar10_lt/if100/$name.yaml" \
    "${COMMON[@]}" "${extra[@]}"
done
