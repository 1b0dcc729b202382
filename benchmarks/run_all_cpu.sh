#!/usr/bin/env bash
# Everything this CPU's RESULTS.md rows need, in order (see benchmarks/RESULTS.md for the numbers).
set -uo pipefail
cd "$(dirname "$0")/.."
python benchmarks/throughput.py --steps 20 --warmup 3
bash benchmarks/cpu_short_schedule.sh ce balanced_softmax ldam_drw
