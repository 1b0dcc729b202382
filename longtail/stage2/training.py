"""What every stage-2 method shares: the context it runs in (model, data, cached features, loaders)
and the classifier training loop.

The loop trains only the heads (``model.heads``) with its own optimizer and schedule
(``stage2.optim``, ``stage2.schedule``). Each expert's head is trained on its own logits and the
losses are summed (SHIKE's stage 2, seed 003_c38ed24e8c8e66ce.txt eq. 11; one term for a single
model). Under DDP the heads start from rank 0's weights and their gradients are averaged over ranks,
which is what DistributedDataParallel would do for them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Protocol

import torch
from torch import nn

from longtail.config import Config
from longtail.engine import builders
from longtail.engine.distributed import DistInfo, all_reduce_sum
from longtail.engine.logging import LOG
from longtail.engine.optim import build_optimizer, build_scheduler
from longtail.engine.trainer import NonFiniteLossError, mixed_loss
from longtail.registry import LOSSES, SAMPLERS, ConfigError
from longtail.stage2.features import FeatureBatches, FeatureSet, FeatureTransform, expert_features, extract_features
from longtail.types import Batch, ModelOutput

__all__ = ["BATCH_NORMS", "Stage2Context", "ImageBatches", "set_bn_shift", "average_bn_statistics", "train_heads"]

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
SAMPLER_SEED_OFFSET = 1  # stage 2 draws its own sample sequence, apart from stage 1's


class BatchSource(Protocol):
    def __len__(self) -> int: ...

    def epoch(self, epoch: int, total_epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Batch | None]]: ...


@dataclass
class Stage2Context:
    """Everything a stage-2 method works with. ``model`` holds the stage-1 weights with its backbone
    frozen; a method replaces ``model.heads[i]`` and trains them."""

    config: Config
    model: nn.Module
    bundle: Any
    dist: DistInfo
    amp_dtype: torch.dtype | None
    augment: Any
    cached: dict[str, FeatureSet] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def counts(self) -> list[int]:
        return self.bundle.train_counts

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    @property
    def batch_size(self) -> int:
        return self.config.stage2.batch_size or self.config.data.batch_size

    def features(self, split: str) -> FeatureSet:
        """The frozen backbone's features of ``split`` (train, val or test), extracted once."""
        if split not in self.cached:
            imageset = getattr(self.bundle, split)
            if imageset is None:
                raise ValueError(f"the run has no {split} split")
            loader = builders.eval_loader(self.config, imageset, self.augment, self.dist)
            LOG.info(f"stage 2: caching {split} features of {len(imageset)} images")
            self.cached[split] = extract_features(self.model, loader, self.dist, len(imageset), self.amp_dtype)
        return self.cached[split]

    def sampler(self) -> Any:
        cfg = self.config.stage2
        return SAMPLERS.build(cfg.sampler or "instance", cfg.sampler_params, where="stage2.sampler_params",
                              targets=self.bundle.train.targets, num_classes=self.num_classes,
                              seed=self.config.seed + SAMPLER_SEED_OFFSET, rank=self.dist.rank,
                              world_size=self.dist.world_size)

    def feature_batches(self, transform: FeatureTransform | None = None) -> FeatureBatches:
        return FeatureBatches(self.features("train"), self.sampler(), self.batch_size, transform)

    def image_batches(self, bn_shift: bool) -> "ImageBatches":
        from longtail.data.loaders import TrainLoader
        loader = TrainLoader(self.bundle.train, self.sampler(), self.batch_size, self.augment, self.device,
                             seed=self.config.seed + SAMPLER_SEED_OFFSET, num_workers=self.config.data.num_workers,
                             decode_on_device=self.config.data.decode_on_device)
        return ImageBatches(self.model, loader, bn_shift, self.amp_dtype)

    def loss(self, default: nn.Module) -> nn.Module:
        """``stage2.loss`` when the config names one, else the method's ``default``."""
        cfg = self.config.stage2.loss
        if cfg is None:
            return default.to(self.device)
        return LOSSES.build(cfg.name, cfg.params, where="stage2.loss.params", class_counts=self.counts,
                            num_classes=self.num_classes, num_samples=len(self.bundle.train)).to(self.device)


def set_bn_shift(model: nn.Module, enabled: bool) -> None:
    """Eval mode, except BatchNorm layers in train mode when ``enabled``: their running statistics
    follow the stage-2 (re-sampled) batches while their affine weights stay frozen (MiSLAS's shift
    learning on BN, seed 001_9389938eb33d47c2.txt)."""
    model.eval()
    if enabled:
        for module in model.modules():
            if isinstance(module, BATCH_NORMS):
                module.train()


@torch.no_grad()
def average_bn_statistics(model: nn.Module) -> None:
    """Average BatchNorm running statistics over ranks (each rank shifted them on its own batches)."""
    if not torch.distributed.is_initialized():
        return
    world = torch.distributed.get_world_size()
    for module in model.modules():
        if isinstance(module, BATCH_NORMS) and module.track_running_stats:
            for buffer in (module.running_mean, module.running_var):
                buffer.copy_(all_reduce_sum(buffer.clone()) / world)


class ImageBatches:
    """Batches of features from backbone passes over augmented training images (no gradient), for
    methods that change the backbone's BN statistics and so cannot use cached features."""

    def __init__(self, model: nn.Module, loader: Any, bn_shift: bool, amp_dtype: torch.dtype | None) -> None:
        self.model, self.loader, self.bn_shift, self.amp_dtype = model, loader, bn_shift, amp_dtype

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, epoch: int, total_epochs: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, Batch]]:
        self.loader.set_epoch(epoch, total_epochs)
        set_bn_shift(self.model, self.bn_shift)
        for batch in self.loader:
            with torch.no_grad(), torch.autocast(self.loader.device.type, dtype=self.amp_dtype,
                                                 enabled=self.amp_dtype is not None):
                output: ModelOutput = self.model(batch.images)
            yield expert_features(output).float(), batch.targets, batch
        self.model.eval()


def _optimizer(groups: list[tuple[list[nn.Parameter], float]], ctx: Stage2Context) -> torch.optim.Optimizer:
    """``stage2.optim`` over parameter groups, each at ``lr_factor`` x the configured lr."""
    cfg = ctx.config.stage2.optim
    (first, first_factor), *rest = groups
    optimizer = build_optimizer(first, cfg, ctx.device)
    optimizer.param_groups[0]["lr"] = cfg.lr * first_factor
    for params, factor in rest:
        optimizer.add_param_group({"params": [p for p in params if p.requires_grad], "lr": cfg.lr * factor})
    return optimizer


def _expert_loss(loss_fn: nn.Module, expert_logits: torch.Tensor, features: torch.Tensor, targets: torch.Tensor,
                 batch: Batch | None) -> torch.Tensor:
    total = expert_logits.new_zeros(())
    for logits, feats in zip(expert_logits, features):
        output = ModelOutput(logits=logits, features=feats)
        total = total + (mixed_loss(loss_fn, output, batch) if batch is not None
                         else loss_fn(output, targets, None).mean())
    return total


def _sync_start(params: Iterable[nn.Parameter]) -> None:
    if torch.distributed.is_initialized():
        for p in params:
            torch.distributed.broadcast(p.data, src=0)


def _average_gradients(params: list[nn.Parameter], world_size: int) -> None:
    if world_size > 1:
        for p in params:
            if p.grad is not None:
                p.grad.copy_(all_reduce_sum(p.grad) / world_size)


def train_heads(ctx: Stage2Context, groups: list[tuple[list[nn.Parameter], float]], loss_fn: nn.Module,
                batches: BatchSource) -> list[dict[str, float]]:
    """Train the parameter ``groups`` (params, lr factor) of ``model.heads`` for ``stage2.epochs``
    epochs; returns one row per epoch (mean loss, lr)."""
    cfg = ctx.config.stage2
    if cfg.epochs < 1:
        raise ConfigError(f"stage2.method={cfg.method} trains the classifier; set stage2.epochs >= 1")
    params = [p for group, _ in groups for p in group if p.requires_grad]
    _sync_start(params)
    optimizer = _optimizer(groups, ctx)
    scheduler = build_scheduler(optimizer, cfg.schedule, len(batches), cfg.epochs)
    history = []
    for epoch in range(cfg.epochs):
        loss_sum = torch.zeros((), device=ctx.device)
        for features, targets, batch in batches.epoch(epoch, cfg.epochs):
            _, expert_logits = ctx.model.logits_from_features(features)
            loss = _expert_loss(loss_fn, expert_logits, features, targets, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            _average_gradients(params, ctx.dist.world_size)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.detach()
        mean_loss = float(all_reduce_sum(loss_sum)) / ctx.dist.world_size / max(len(batches), 1)
        if not math.isfinite(mean_loss):
            raise NonFiniteLossError(f"stage-2 loss became {mean_loss} in epoch {epoch + 1}; lower stage2.optim.lr")
        lr = optimizer.param_groups[0]["lr"]
        history.append({"epoch": epoch + 1, "train_loss": mean_loss, "lr": lr})
        LOG.info(f"stage 2 ({cfg.method}) epoch {epoch + 1}/{cfg.epochs} loss {mean_loss:.4f} lr {lr:.4g}")
    return history
