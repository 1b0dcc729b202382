"""What SHIKE's three experts and DKF cost over a plain ResNet-32: parameters, forward FLOPs per
32x32 image (torch.utils.flop_counter, 2 FLOPs per multiply-add) and forward time of a batch.

    python benchmarks/model_cost.py                  # CPU, batch 32, about 20 s
    python benchmarks/model_cost.py --device cuda --batch-size 128

Prints JSON. Times are the median of ``--repeats`` timed forwards (eval mode, no_grad) after a
warm-up; the models take turns in every round so a busy machine slows them alike, but only the
ratios within one run mean much.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import datetime, timezone

import torch
from torch.utils.flop_counter import FlopCounterMode

import longtail.models  # noqa: F401  (registers the models)
from longtail.registry import MODELS

VARIANTS = {  # label -> (registered name, params)
    "resnet32": ("resnet32", {}),
    "shike_resnet32_no_dkf": ("shike_resnet32", {"dkf": False}),
    "shike_resnet32": ("shike_resnet32", {}),
}


def forward_flops(model: torch.nn.Module, image: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image)
    return counter.get_total_flops()


def forward_seconds(models: dict[str, torch.nn.Module], batch: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median forward time of each model, timed in turns."""
    def sync() -> None:
        if batch.device.type == "cuda":
            torch.cuda.synchronize(batch.device)

    times: dict[str, list[float]] = {label: [] for label in models}
    with torch.no_grad():
        for model in models.values():
            model(batch)  # warm-up (kernel selection, allocator)
        for _ in range(repeats):
            for label, model in models.items():
                sync()
                start = time.perf_counter()
                model(batch)
                sync()
                times[label].append(time.perf_counter() - start)
    return {label: statistics.median(values) for label, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--num-classes", type=int, default=100)
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    batch = torch.randn(args.batch_size, 3, 32, 32, device=device)
    result = {"device": str(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
              "cpu_threads": torch.get_num_threads(), "batch_size": args.batch_size, "num_classes": args.num_classes,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "models": {}}
    models = {label: MODELS.build(name, params, num_classes=args.num_classes).to(device).eval()
              for label, (name, params) in VARIANTS.items()}
    seconds = forward_seconds(models, batch, args.repeats)
    for label, model in models.items():
        result["models"][label] = {
            "params": sum(p.numel() for p in model.parameters()),
            "forward_gflops_per_image": forward_flops(model, batch[:1]) / 1e9,
            "forward_ms_per_batch": 1e3 * seconds[label],
        }
    base = result["models"]["resnet32"]
    for entry in result["models"].values():
        entry["params_vs_resnet32"] = entry["params"] / base["params"]
        entry["flops_vs_resnet32"] = entry["forward_gflops_per_image"] / base["forward_gflops_per_image"]
        entry["time_vs_resnet32"] = entry["forward_ms_per_batch"] / base["forward_ms_per_batch"]
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
