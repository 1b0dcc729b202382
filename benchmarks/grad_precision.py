"""bfloat16 autocast against float32: the gradients of the same weights on the same training batches.

    python benchmarks/grad_precision.py RUN [RUN ...] [--epoch 64] [--batches 3] [--json FILE]

For each run (its last checkpoint, its own recipe's loader, loss and epoch hooks set to ``--epoch``, so
BBN's alpha and paired batches are those of that epoch) the first ``--batches`` training batches are
pushed through the model in train mode twice from the same state, once in float32 and once under
bfloat16 autocast (the CPU default), and each parameter's two gradients are compared: cosine
similarity and norm ratio (bfloat16 / float32), the range over the batches, per top-level module. A
method whose training were precision-sensitive would show lower cosines than plain CE's. The loss and
every statistic are float32 either way, as in the trainer.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from longtail.engine import builders  # noqa: E402
from longtail.losses.terms import batch_loss  # noqa: E402
from longtail.runs import load_run  # noqa: E402
from longtail.types import Batch  # noqa: E402

from benchmarks.diagnosis_cli import run_diagnosis  # noqa: E402


def gradients(model: torch.nn.Module, loss_fn: torch.nn.Module, batch: Batch,
              bfloat16: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """(loss, every parameter's gradient) of one training step's forward and backward, no update."""
    model.zero_grad(set_to_none=True)
    images = batch.images.contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
        output = model(images)
    output = output.float32() if bfloat16 else output
    loss, _ = batch_loss(loss_fn, output, batch)
    loss.backward()
    return loss.item(), {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def module_of(name: str) -> str:
    """``stem`` / ``shared`` / ``heads.0`` ...: the top-level module a parameter belongs to (heads per head)."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "heads" else parts[0]


def compare(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> dict[str, list[tuple[float, float]]]:
    """Per module: (cosine, norm ratio second / first) of each parameter's two gradients."""
    rows: dict[str, list[tuple[float, float]]] = {}
    for name, a in first.items():
        b = second[name]
        rows.setdefault(module_of(name), []).append(
            (F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item(),
             (b.norm() / a.norm().clamp(min=1e-30)).item()))
    return rows


def diagnose(run_path: Path, epoch: int, batches: int) -> dict[str, Any]:
    run = load_run(run_path)
    job = builders.stage1_job(run.config, run.bundle, run.dist_info, resuming=True)
    job.model.load_state_dict(run.model.state_dict())
    model = job.model.train().to(memory_format=torch.channels_last)
    total = run.config.train.epochs
    if hasattr(model, "on_epoch_start"):
        model.on_epoch_start(epoch, total)
    job.loader.set_epoch(epoch, total)
    per_module: dict[str, list[tuple[float, float]]] = {}
    losses = []
    for _, batch in zip(range(batches), job.loader):
        state = {key: value.clone() for key, value in model.state_dict().items()}  # BN statistics move
        loss32, grads32 = gradients(model, job.loss_fn, batch, bfloat16=False)
        model.load_state_dict(state)
        loss16, grads16 = gradients(model, job.loss_fn, batch, bfloat16=True)
        model.load_state_dict(state)
        losses.append({"float32": loss32, "bfloat16": loss16})
        for module, pairs in compare(grads32, grads16).items():
            per_module.setdefault(module, []).extend(pairs)
    return {"run": str(run_path), "epoch": epoch, "losses": losses,
            "modules": {module: {"cosine_min": min(c for c, _ in pairs), "cosine_max": max(c for c, _ in pairs),
                                 "norm_ratio_min": min(r for _, r in pairs), "norm_ratio_max": max(r for _, r in pairs)}
                        for module, pairs in per_module.items()}}


def main() -> None:
    run_diagnosis("grad_precision.py", __doc__, diagnose,
                  options=[("--epoch", {"type": int, "default": 0, "help": "0-based epoch of the batches"}),
                           ("--batches", {"type": int, "default": 3})])


if __name__ == "__main__":
    main()
