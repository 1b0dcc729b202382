"""Step time and memory of each ``model.finetune`` mode on a timm ViT (randomly initialised: the cost
does not depend on the weights), one training step as the trainer takes it (forward under the run's
autocast, float32 loss, backward, SGD step with momentum and weight decay).

Each mode runs in its own process, so its peak resident memory (``ru_maxrss``) is its own.

``linear_cached`` is ``linear`` as training runs it now (``model.finetune_params.cache_features``): the
backbone's one pass in eval mode without gradient (``extract_seconds_per_batch``: paid once per training
image, not per epoch) and then the head's step on the batch's features (``seconds_per_step``).

    python benchmarks/finetune_modes.py --arch vit_small_patch16_224 --batch 16 --steps 3 \
        --out benchmarks/results/finetune_modes-vit_small-cpu.json
    python benchmarks/finetune_modes.py --arch vit_base_patch16_224 --batch 16 --steps 3 \
        --out benchmarks/results/finetune_modes-vit_base-cpu.json
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

MODES = ("full", "linear", "linear_cached", "partial", "lora", "adaptformer", "vpt", "bitfit", "ssf")


def one_mode(arch: str, mode: str, batch: int, steps: int, amp: str, classes: int) -> dict:
    import longtail.models  # noqa: F401  (registers the models)
    from longtail.config import OptimConfig
    from longtail.engine.optim import build_optimizer
    from longtail.models.finetune import parameter_counts
    from longtail.registry import MODELS

    torch.manual_seed(0)
    cached = mode == "linear_cached"
    model = MODELS.build("timm", {"arch": arch}, num_classes=classes, finetune="linear" if cached else mode,
                         finetune_params={})
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=0.01, weight_decay=5e-4), torch.device("cpu"))
    images = torch.randn(batch, 3, 224, 224)
    targets = torch.randint(0, classes, (batch,))
    dtype = torch.bfloat16 if amp == "bf16" else None
    extract = []
    if cached:  # the one pass of cached_features.py: eval mode, no gradient; then steps on the features
        model.eval()
        for step in range(steps + 1):
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                features = model.backbone(images)[0].float()
            if step:
                extract.append(time.perf_counter() - start)
    times = []
    for step in range(steps + 1):  # the first step warms up (allocations, oneDNN primitives): not timed
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            logits = model.logits_from_features(features)[0] if cached else model(images).logits
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    extra = {"extract_seconds_per_batch": sum(extract) / len(extract)} if cached else {}
    return {"mode": mode, **parameter_counts(model), "seconds_per_step": sum(times) / len(times), **extra,
            "images_per_second": batch * len(times) / sum(times),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="vit_small_patch16_224")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--amp", choices=("none", "bf16"), default="none")
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--modes", nargs="*", default=list(MODES))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode and print its JSON
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_mode(args.arch, args.one, args.batch, args.steps, args.amp, args.classes)))
        return
    rows = []
    for mode in args.modes:
        command = [sys.executable, __file__, "--arch", args.arch, "--batch", str(args.batch), "--steps",
                   str(args.steps), "--amp", args.amp, "--classes", str(args.classes), "--one", mode]
        row = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        rows.append(row)
        once = row.get("extract_seconds_per_batch")
        once_text = "" if once is None else f"(+ {once:.2f} s/batch once: the extraction) "
        print(f"{mode:14s} trainable {row['trainable']:>11,} of {row['total']:,}  "
              f"{row['seconds_per_step']:.4f} s/step  {once_text}{row['images_per_second']:.1f} img/s  "
              f"peak RSS {row['peak_rss_mib']:.0f} MiB", flush=True)
    if args.out:
        record = {"arch": args.arch, "batch": args.batch, "timed_steps": args.steps, "amp": args.amp,
                  "classes": args.classes, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "machine": platform.processor() or platform.machine(), "rows": rows}
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
