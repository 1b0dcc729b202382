"""Optimisers and learning-rate schedules (warm-up, then cosine / step / linear / constant)."""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch

from longtail.config import OptimConfig, ScheduleConfig


def build_optimizer(parameters: Iterable[torch.nn.Parameter] | list[dict[str, Any]], cfg: OptimConfig,
                    device: torch.device) -> torch.optim.Optimizer:
    """The optimiser of the trainable ``parameters``, or of parameter groups (dicts with ``params`` and
    their own ``lr``: layer-wise lr decay)."""
    params: list[Any] = list(parameters)
    if params and isinstance(params[0], dict):
        params = [group for group in params if group["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if not params:
        raise ValueError("nothing to optimise: every parameter is frozen")
    fused = device.type == "cuda"  # the fused CUDA kernels; CPU keeps the default (foreach) path
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay,
                             fused=fused or None)


def lr_factor(epoch: float, total_epochs: int, cfg: ScheduleConfig) -> float:
    """Multiplier of the base lr at (fractional) ``epoch``; warm-up is linear from
    ``warmup_start_factor`` to 1, as the seeds' code (e.g. MiSLAS, SHIKE) does."""
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        progress = epoch / cfg.warmup_epochs
        return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * progress
    if cfg.name == "constant":
        return 1.0
    if cfg.name == "step":
        passed = sum(epoch >= m for m in cfg.milestones)
        if cfg.factors is not None:
            return cfg.factors[passed - 1] if passed else 1.0
        return cfg.gamma ** passed
    span = max(total_epochs - cfg.warmup_epochs, 1e-12)
    progress = min(max((epoch - cfg.warmup_epochs) / span, 0.0), 1.0)
    if cfg.name == "cosine":
        shape = 0.5 * (1 + math.cos(math.pi * progress))
    else:  # linear
        shape = 1 - progress
    return cfg.final_lr_factor + (1 - cfg.final_lr_factor) * shape


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, steps_per_epoch: int,
                    total_epochs: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR; with ``per_step=False`` the lr only changes at epoch boundaries."""
    steps = max(steps_per_epoch, 1)

    def factor(step: int) -> float:
        epoch = step / steps if cfg.per_step else float(step // steps)
        return lr_factor(epoch, total_epochs, cfg)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
