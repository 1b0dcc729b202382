"""The machine's ceiling: a plain PyTorch training step written here, independent of longtail.

A CIFAR ResNet-32 (He et al. 2016, option-A shortcuts, as Cao et al.'s code) and a 3-expert variant
(stages 1-2 shared, one stage 3 and one linear head per expert, as RIDE/SHIKE without their extras),
trained the way a user would write it: SGD, cross-entropy, forward + backward + step on pre-made
tensors. ``best_ceiling`` times it in every precision and memory format the machine runs and keeps
the fastest, so a ratio against it is against the hardware, not against longtail's own settings.

    python benchmarks/plain_step.py               # the four variants of ResNet-32 on this machine
    python benchmarks/plain_step.py --experts 3
"""
from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride, self.pad = stride, (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.pad == 0 and self.stride == 1 else \
            F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + shortcut)


def stage(cin: int, cout: int, stride: int, blocks: int = 5) -> nn.Sequential:
    return nn.Sequential(Block(cin, cout, stride), *[Block(cout, cout, 1) for _ in range(blocks - 1)])


class PlainResNet32(nn.Module):
    """ResNet-32 with ``experts`` copies of stage 3 and the head; logits are the experts' mean."""

    def __init__(self, num_classes: int = 10, experts: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.shared = nn.Sequential(stage(16, 16, 1), stage(16, 32, 2))
        self.branches = nn.ModuleList(stage(32, 64, 2) for _ in range(experts))
        self.heads = nn.ModuleList(nn.Linear(64, num_classes) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = self.shared(self.stem(x))
        logits = [head(F.adaptive_avg_pool2d(branch(shared), 1).flatten(1))
                  for branch, head in zip(self.branches, self.heads)]
        return torch.stack(logits).mean(0)


class PlainStep:
    """One variant (precision x memory format) of the plain step, with its own model and optimizer."""

    def __init__(self, dtype: torch.dtype | None, channels_last: bool, experts: int = 1, batch: int = 128,
                 eval_batch: int = 1024, num_classes: int = 10, device: str = "cpu") -> None:
        torch.manual_seed(0)
        self.device = torch.device(device)
        self.dtype, self.channels_last, self.batch, self.eval_batch = dtype, channels_last, batch, eval_batch
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = PlainResNet32(num_classes, experts).to(self.device, memory_format=memory_format)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9, weight_decay=2e-4)
        self.images = torch.randn(batch, 3, 32, 32, device=self.device).contiguous(memory_format=memory_format)
        self.eval_images = torch.randn(eval_batch, 3, 32, 32, device=self.device).contiguous(
            memory_format=memory_format)
        self.targets = torch.randint(0, num_classes, (batch,), device=self.device)

    @property
    def name(self) -> str:
        precision = "bf16" if self.dtype == torch.bfloat16 else "fp32"
        return f"{precision}-{'channels_last' if self.channels_last else 'nchw'}"

    def step(self) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            logits = self.model(self.images)
        loss = F.cross_entropy(logits.float(), self.targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def forward(self) -> None:
        self.model.eval()
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            self.model(self.eval_images)
        self.model.train()

    def train_img_s(self, steps: int) -> float:
        return timed(self.device, self.step, steps, self.batch)

    def eval_img_s(self, steps: int) -> float:
        return timed(self.device, self.forward, steps, self.eval_batch)


def timed(device: torch.device, fn, steps: int, images_per_step: int) -> float:
    """img/s of ``steps`` calls of ``fn`` (device work finished before the clock stops)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * images_per_step / (time.perf_counter() - start)


def supported_dtypes(device: torch.device) -> list[torch.dtype | None]:
    """float32 always; bfloat16 where the hardware has it (AVX-512 BF16 / AMX on CPU, sm80+ on CUDA)."""
    if device.type == "cuda":
        return [None, torch.bfloat16] if torch.cuda.is_bf16_supported() else [None]
    return [None, torch.bfloat16] if torch.cpu._is_avx512_bf16_supported() else [None]


def all_variants(experts: int = 1, device: str = "cpu", num_classes: int = 10, batch: int = 128,
                 eval_batch: int = 1024) -> list[PlainStep]:
    dev = torch.device(device)
    return [PlainStep(dtype, cl, experts, batch, eval_batch, num_classes, device)
            for dtype, cl in itertools.product(supported_dtypes(dev), (False, True))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=1)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    variants = all_variants(args.experts, args.device)
    for variant in variants:
        variant.train_img_s(args.warmup)
        variant.eval_img_s(2)
    rows: dict[str, dict[str, list[float]]] = {v.name: {"train": [], "eval": []} for v in variants}
    for _ in range(args.rounds):
        for variant in variants:
            rows[variant.name]["train"].append(variant.train_img_s(args.steps))
            rows[variant.name]["eval"].append(variant.eval_img_s(max(1, args.steps // 8)))
    print(json.dumps({"experts": args.experts, "threads": torch.get_num_threads(),
                      "best": {name: {k: round(max(v), 1) for k, v in r.items()} for name, r in rows.items()},
                      "rounds": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
