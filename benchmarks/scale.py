"""IKL and LADC at iNaturalist 2018 scale (N = 435,888 images, C = 8,142 classes, D = 2,048 features)
on synthetic class-structured features, each part in a fresh process so its peak memory is its own:

- ikl:  the IKL loss with the bounded settings of docs/ARCHITECTURE.md ("IKL at scale") through one
        epoch of hook calls (batch 512): bytes of every buffer at the epoch's fullest point, against a
        dense N x C fp16 store and against the unbounded design (two N x k stores, dense C x C labels,
        N x D fp16 features); time of the step hook and of the epoch end (medians, soft labels).
- ladc: LADC's statistics (seed 002): head Gaussians with the automatic covariance choice, nearest
        head classes and calibrated means of every tail instance, from cached N x D float32 features
        built in chunks; build time, bytes of the bank, peak memory.

    python benchmarks/scale.py [--scale 0.1] [--part ikl|ladc|all] [--out benchmarks/results/scale.json]

Peak memory is the process's ru_maxrss (the features LADC reads count in it; their size is reported
beside it). Timings from a CPU shared with other work are not speed claims.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

INAT_IMAGES, INAT_CLASSES, FEATURE_DIM = 435_888, 8_142, 2_048
IKL_PARAMS = {"topk": 32, "label_topk": 32, "median_cap": 4, "median_dim": 128}
BATCH, CHUNK = 512, 16_384


def class_counts(num_classes: int, num_images: int) -> list[int]:
    """Exponential long-tailed counts (tail class: 2 images) whose sum is closest to ``num_images``."""
    from longtail.functional import lt_counts
    low, high = 4, 100_000
    while low < high:  # the smallest head count whose total reaches num_images
        mid = (low + high) // 2
        if sum(lt_counts(num_classes, mid, mid / 2)) < num_images:
            low = mid + 1
        else:
            high = mid
    return lt_counts(num_classes, low, low / 2)


def synthetic_features(counts: list[int], dim: int, seed: int = 0):
    """(labels, a function giving the features of a slice of samples): non-negative class-structured
    features, as after a ReLU, made chunk by chunk from a seed so no part holds more than it needs."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    centres = (torch.rand(dim, generator=g) + 1.5 * torch.randn(len(counts), dim, generator=g)).relu()

    def features(indices: torch.Tensor) -> torch.Tensor:
        noise = torch.randn(len(indices), dim, generator=torch.Generator().manual_seed(seed + 1 + int(indices[0])))
        return (centres[labels[indices]] + noise).relu()
    return labels, features


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_ikl(num_images: int, num_classes: int, dim: int, out: dict) -> None:
    import longtail.losses  # noqa: F401  (registers the losses)
    from longtail.registry import LOSSES
    from longtail.types import Batch, ModelOutput
    torch.set_num_threads(1)
    counts = class_counts(num_classes, num_images)
    labels, features = synthetic_features(counts, dim)
    n = len(labels)
    loss = LOSSES.build("ikl", IKL_PARAMS, class_counts=counts, num_classes=num_classes, num_samples=n)
    loss.on_epoch_start(0, 2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    step_s = 0.0
    g = torch.Generator().manual_seed(1)
    for start in range(0, n, BATCH):
        idx = order[start:start + BATCH]
        logits = torch.randn(len(idx), num_classes, generator=g)
        logits[torch.arange(len(idx)), labels[idx]] += 4.0
        output = ModelOutput(logits=logits, features=features(idx))
        batch = Batch(images=torch.zeros(len(idx), 1), targets=labels[idx], indices=idx)
        t0 = time.perf_counter()
        loss.on_step_end(output, batch)
        step_s += time.perf_counter() - t0
    buffers = {name: b.numel() * b.element_size() for name, b in loss.named_buffers() if b is not None}
    t0 = time.perf_counter()
    loss.on_epoch_end(0)
    end_s = time.perf_counter() - t0
    k = IKL_PARAMS["topk"]
    dense = n * num_classes * 2
    unbounded = 2 * n * k * (2 + 4) + 3 * n + 8 * n + num_classes ** 2 * 4 + n * dim * 2
    total = sum(buffers.values())
    out["ikl"] = {"images": n, "classes": num_classes, "feature_dim": dim, "params": IKL_PARAMS,
                  "buffers_bytes": buffers, "state_bytes": total, "dense_nxc_fp16_bytes": dense,
                  "state_over_dense": total / dense, "unbounded_design_bytes": unbounded,
                  "unbounded_over_dense": unbounded / dense, "step_hook_s_per_epoch": step_s,
                  "steps": -(-n // BATCH), "epoch_end_s": end_s, "peak_rss_mib": peak_mib()}


def run_ladc(num_images: int, num_classes: int, dim: int, out: dict) -> None:
    from longtail.functional import ladc_head_classes
    from longtail.stage2.ladc import TailGaussians, choose_covariance, memory_budget
    counts = class_counts(num_classes, num_images)
    labels, features = synthetic_features(counts, dim)
    n = len(labels)
    cached = torch.empty(n, dim)
    for start in range(0, n, CHUNK):
        cached[start:start + CHUNK] = features(torch.arange(start, min(start + CHUNK, n)))
    rss_features = peak_mib()
    head = ladc_head_classes(counts, 0.6)
    budget = memory_budget(torch.device("cpu"))
    kind = choose_covariance("auto", len(head), dim, 64, budget)
    t0 = time.perf_counter()
    bank = TailGaussians(cached, labels, counts, head, kind)
    build_s = time.perf_counter() - t0
    parts = {name: getattr(bank, name) for name in ("head_means", "factors", "variances", "neighbours", "weights",
                                                     "means", "is_tail", "position")}
    tail = torch.nonzero(bank.is_tail).flatten()[:BATCH]
    t0 = time.perf_counter()
    bank.sample(tail, torch.Generator().manual_seed(0))
    sample_s = time.perf_counter() - t0
    out["ladc"] = {"images": n, "classes": num_classes, "feature_dim": dim, "head_classes": len(head),
                   "tail_instances": int(bank.is_tail.sum()), "covariance_auto": kind,
                   "budget_bytes": budget, "full_covariance_bytes": len(head) * dim * dim * 4,
                   "features_bytes": cached.numel() * 4, "bank_bytes": {k: v.numel() * v.element_size()
                                                                       for k, v in parts.items()},
                   "build_s": build_s, "sample_512_s": sample_s, "rss_after_features_mib": rss_features,
                   "peak_rss_mib": peak_mib()}


def _child(part: str, args: tuple, queue: mp.Queue) -> None:
    out: dict = {}
    {"ikl": run_ikl, "ladc": run_ladc}[part](*args, out)
    queue.put(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of iNaturalist's images and classes")
    parser.add_argument("--dim", type=int, default=FEATURE_DIM)
    parser.add_argument("--part", choices=("ikl", "ladc", "all"), default="all")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    sizes = (round(INAT_IMAGES * args.scale), round(INAT_CLASSES * args.scale), args.dim)
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "scale": args.scale,
              "machine": platform.processor() or platform.machine(), "torch": torch.__version__}
    context = mp.get_context("spawn")
    for part in (("ikl", "ladc") if args.part == "all" else (args.part,)):
        queue = context.Queue()
        child = context.Process(target=_child, args=(part, sizes, queue))
        child.start()
        result.update(queue.get())
        child.join()
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
