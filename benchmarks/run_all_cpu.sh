#!/usr/bin/env bash
# Every CPU row of benchmarks/RESULTS.md, one after another (never two jobs at once: on 2 cores a
# second torch process slows the first 10-80x). Most important first, so a cut-short run still has them:
#   1. throughput (ceiling / trainer / reference loop) for ResNet-32
#   2. the short schedule with CE, then stage 2 (cRT, LWS, tau-norm, MiSLAS, LADC) and the post-hoc
#      calibrators (TS, ETS, histogram binning, isotonic, KT-TS) on that one CE run
#   3. balanced softmax with and without IKL, SHIKE on the short schedule
#   4. SHIKE throughput, scaling, 1-vs-2-process DDP, model cost
#   5. RIDE, BBN and LDAM-DRW on the short schedule
# Each step's output goes to runs/bench_cpu/logs/<step>.log; a failed step is reported and skipped.
#   bash benchmarks/run_all_cpu.sh                      # everything (about 3.5 hours on 2 cores)
#   FROM=short_shike bash benchmarks/run_all_cpu.sh     # continue from a step
set -uo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-runs/bench_cpu}
LOGS=$OUT/logs
FROM=${FROM:-}
mkdir -p "$LOGS"

step() {  # step NAME COMMAND...: run, log, time; never stop the whole run
  local name=$1; shift
  if [ -n "$FROM" ]; then
    [ "$name" != "$FROM" ] && return 0
    FROM=""
  fi
  local start=$SECONDS
  echo "$(date -u +%FT%TZ) start $name: $*"
  "$@" >"$LOGS/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) end   $name: exit $? after $((SECONDS - start)) s"
}

CE_RUN=$OUT/cifar10_lt_if100_ce
step throughput_resnet32 python benchmarks/throughput.py --steps 20 --warmup 3
step short_ce bash benchmarks/cpu_short_schedule.sh ce
for method in crt lws tau_norm mislas ladc; do
  step "stage2_$method" longtail stage2 "$CE_RUN" "configs/cifar10_lt/if100/$method.yaml"
done
for method in ts ets hist iso kt_ts; do
  step "calibrate_$method" longtail calibrate "$CE_RUN" --method "$method"
done
step short_balanced_softmax bash benchmarks/cpu_short_schedule.sh balanced_softmax
for method in balanced_softmax_ikl shike; do
  step "short_$method" bash benchmarks/multi_expert_cpu.sh "$method"
done
step throughput_shike python benchmarks/throughput.py --model shike_resnet32 --loss shike --steps 10 --warmup 2
step scaling python benchmarks/scaling.py
step ddp python benchmarks/ddp.py
step model_cost python benchmarks/model_cost.py
for method in ride bbn; do
  step "short_$method" bash benchmarks/multi_expert_cpu.sh "$method"
done
step short_ldam_drw bash benchmarks/cpu_short_schedule.sh ldam_drw
echo "$(date -u +%FT%TZ) all done"
