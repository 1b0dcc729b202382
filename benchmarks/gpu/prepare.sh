#!/usr/bin/env bash
# Run HERE (the CPU machine) before a device session: puts what the GPU machine lacks into two folders
# git ignores, which the device tool's `carry` then sends along (64 MiB limit; these are ~25 MiB):
#   .whl/    wheels of longtail's dependencies missing from the GPU image (pydantic and its needs;
#            torch, torchvision, scipy, scikit-learn, matplotlib, tensorboard... are there)
#   .carry/  the shared CIFAR-10 archive (../shared does not travel)
# Then, with the device tool:  run(command="bash benchmarks/gpu/checks.sh", carry=[".whl", ".carry"],
#                                  timeout_s=600)
set -euo pipefail
cd "$(dirname "$0")/../.."
mkdir -p .git/info
for folder in /.whl/ /.carry/; do
  grep -qxF "$folder" .git/info/exclude 2>/dev/null || echo "$folder" >> .git/info/exclude
done
rm -rf .whl && mkdir -p .whl .carry
pip_version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }  # the versions tested here
# the GPU image's python is 3.12 (device KINDS.md); --no-deps: each missing package is named
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "pydantic==$(pip_version pydantic)" "pydantic-core==$(pip_version pydantic-core)" \
  annotated-types typing-inspection typing-extensions
cp ../shared/data/cifar10_jpg.tar.gz .carry/
du -sh .whl .carry
