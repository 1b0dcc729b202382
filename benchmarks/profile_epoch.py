"""Where a training epoch's time goes: ``torch.profiler`` over steps of longtail's Trainer at its
defaults (CIFAR-10-LT IF 100), the operators grouped into model compute (convolutions, batch norm,
activations, pooling, linear, their backward and the optimizer) and everything else (augmentation,
sampling, loss, casts, logging), so what is not compute can be found and removed.

    python benchmarks/profile_epoch.py                               # ResNet-32, CE
    python benchmarks/profile_epoch.py --model shike_resnet32 --loss shike
    python benchmarks/profile_epoch.py --overrides train.amp=none train.channels_last=no
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import ARCHIVE, TrainerEpochs, make_config  # noqa: E402

# operator name fragments of the model's own forward/backward and the optimizer step
# (relu runs as clamp_min, the residual sums as add)
COMPUTE = ("conv", "mkldnn", "batch_norm", "relu", "clamp_min", "threshold", "addmm", "linear", "mm", "pool",
           "_foreach", "sgd", "pad", "aten::add", "native_layer_norm", "cat", "stack")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet32")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--data", default=str(ARCHIVE))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        config = make_config(args, Path(root))
        trainer = TrainerEpochs(config, torch.device(args.device))
        trainer.train_img_s()  # warm-up epoch
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            img_s = trainer.train_img_s()
    averages = prof.key_averages()
    total = sum(item.self_cpu_time_total for item in averages)
    compute = sum(item.self_cpu_time_total for item in averages if any(k in item.key for k in COMPUTE))
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.top))
    print(json.dumps({"precision": trainer.precision, "images_per_second_profiled": round(img_s, 1),
                      "self_cpu_s": round(total / 1e6, 2), "model_compute_share": round(compute / total, 3),
                      "other_ops": [(item.key, round(item.self_cpu_time_total / total, 4)) for item in
                                    sorted(averages, key=lambda i: -i.self_cpu_time_total)
                                    if not any(k in item.key for k in COMPUTE)][:15]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
