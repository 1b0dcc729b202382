#!/usr/bin/env bash
# Run on the GPU machine (see prepare.sh), most important first so a cut-short run still has them;
# the whole script fits one 10-minute device call on an H100/H200. Results and logs go to $OUT (the
# device tool brings them back; at most 8 files): copy the JSON into benchmarks/results/ and the
# numbers into benchmarks/RESULTS.md.
#   1. the CUDA tests (augmentation on the device, nvJPEG against the host decoder)        ~1 min
#   2. throughput: ceiling / longtail trainer / reference loop, ResNet-32 (aim: >= 5x reference) ~1 min
#   3. file-set decoding: worker PIL against nvJPEG on the device                           ~1 min
#   4. the full 200-epoch CE recipe on CIFAR-10-LT IF=100 (aim: <= 2 min on one H100)       ~2-4 min
set -uo pipefail
cd "$(dirname "$0")/../.."
RESULTS=${OUT:-/tmp/gpu_out}
mkdir -p "$RESULTS"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || { echo "wheels missing: run benchmarks/gpu/prepare.sh here and carry .whl"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
ARCHIVE=$PWD/.carry/cifar10_jpg.tar.gz
export LONGTAIL_SHARED_DATA=$PWD/.carry  # the tests' real data (../shared does not travel)
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$RESULTS/gpu.txt" 2>&1
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)" \
  >> "$RESULTS/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $RESULTS/NAME.log
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$RESULTS/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$RESULTS/summary.txt"
}

step tests 120 python3 -m pytest -q -p no:cacheprovider tests/test_decoding.py tests/test_augment.py -k "cuda or nvjpeg or device"
step throughput 150 python3 benchmarks/throughput.py --device cuda --data "$ARCHIVE" --steps 200 --warmup 20 \
  --workers 8 --out "$RESULTS/throughput-resnet32-cuda.json"
step decoding 120 python3 benchmarks/decoding.py --device cuda --workers 8 --images 4096 \
  --out "$RESULTS/decoding-cuda.json"
step ce_200_epochs 300 python3 -m longtail train configs/cifar10_lt/if100/ce.yaml "data.root=$ARCHIVE" device=cuda \
  data.num_workers=0 output_dir=/tmp/runs
cp /tmp/runs/*/metrics.json "$RESULTS/ce_200_epochs_metrics.json" 2>/dev/null
cat "$RESULTS/summary.txt"
