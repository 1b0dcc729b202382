"""What every stage-2 method shares: the context it runs in (model, data, cached features) and how its
classifier is trained — as a ``TrainingJob`` of the one ``engine.Trainer``, so stage 2 has the same
progress bar, loss terms, NaN stop, DDP, atomic checkpoints and exact ``--resume`` as stage 1.

Two feature modes (``stage2.features``; each method says which it supports, its default first):

- ``images``: every step passes augmented training images through the frozen backbone (no gradient)
  with its BatchNorm layers in train mode, so their running statistics follow the stage-2 batches,
  and trains the heads on the result — what the authors of cRT (Kang et al.) and SHIKE do;
- ``cached``: one pass of the frozen backbone over the un-augmented training images, BN frozen; the
  heads then train on those features in seconds (LADC, which samples features, needs it).

Each expert's head is trained on its own logits and the losses are summed (SHIKE's stage 2, Jin
et al., CVPR 2023, eq. 11; one term for a single model).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from longtail.config import Config
from longtail.data import DataBundle, Sampler
from longtail.data.augment import BatchAugment
from longtail.data.loaders import batch_bounds, samples_in_batches
from longtail.data.samplers import epoch_seed
from longtail.engine import builders
from longtail.engine.distributed import DistInfo, all_reduce_sum
from longtail.engine.evaluation import EvalSettings, evaluate
from longtail.engine.logging import LOG
from longtail.engine.optim import build_optimizer, build_scheduler
from longtail.engine.precision import Precision, resolve_precision
from longtail.engine.rundir import last_checkpoint
from longtail.engine.trainer import Trainer, TrainingJob
from longtail.losses.terms import ExpertSum
from longtail.models.heads import head_spec
from longtail.registry import LOSSES, ConfigError
from longtail.stage2.features import FeatureSet, expert_features
from longtail.types import Batch, ModelOutput

__all__ = ["BATCH_NORMS", "FEATURE_MODES", "Stage2Context", "FeatureView", "ImageView", "FeatureLoader",
           "set_bn_shift", "average_bn_statistics"]

BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
FEATURE_MODES = ("images", "cached")
SAMPLER_SEED_OFFSET = 1  # stage 2 draws its own sample sequence, apart from stage 1's
FEATURE_DRAW_STREAM = 103  # LADC's per-epoch feature draws, apart from the loaders' streams

# (features (M, B, D), training-set indices (B,), generator) -> the features to train on
FeatureTransform = Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]


def set_bn_shift(model: nn.Module, enabled: bool) -> None:
    """Eval mode, except BatchNorm layers in train mode when ``enabled``: their running statistics
    follow the stage-2 (re-sampled) batches while their affine weights stay frozen (MiSLAS's shift
    learning on BN, Zhong et al. 2021; cRT's backbone in train mode)."""
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


def _heads_output(model: nn.Module, features: torch.Tensor) -> ModelOutput:
    logits, expert_logits = model.logits_from_features(features)
    return ModelOutput(logits=logits, features=features[0], expert_logits=expert_logits, expert_features=features)


class FeatureView(nn.Module):
    """The model as stage 2 trains it in ``cached`` mode: cached features (M, B, D) -> the heads' output."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "FeatureView":
        self.training = mode
        self.model.eval()  # only the heads run, and they have no mode-dependent layers
        return self

    def forward(self, features: torch.Tensor) -> ModelOutput:
        return _heads_output(self.model, features)


class ImageView(nn.Module):
    """The model as stage 2 trains it in ``images`` mode: the frozen backbone runs without gradient
    (BN in train mode when ``bn_train``), the heads on its features with gradient."""

    def __init__(self, model: nn.Module, bn_train: bool) -> None:
        super().__init__()
        self.model, self.bn_train = model, bn_train

    def train(self, mode: bool = True) -> "ImageView":
        self.training = mode
        set_bn_shift(self.model, self.bn_train and mode)
        return self

    def forward(self, images: torch.Tensor) -> ModelOutput:
        with torch.no_grad():
            features = expert_features(self.model(images)).float()
        return _heads_output(self.model, features)


class FeatureLoader:
    """Training batches of cached features: this rank's sampler indices for the epoch in batches of
    ``batch_size`` (the last incomplete one dropped with ``drop_last``, else kept, cut as ``TrainLoader``
    does: ``data.loaders.batch_bounds``; stage 2 passes ``data.drop_last``), optionally transformed with a generator seeded from (seed,
    epoch) (LADC replaces tail features by draws from their calibrated Gaussians). ``Batch.images``
    holds the features (M, B, D)."""

    def __init__(self, cached: FeatureSet, sampler: Sampler, batch_size: int, seed: int,
                 transform: FeatureTransform | None = None, drop_last: bool = True) -> None:
        if len(sampler) < batch_size:
            raise ConfigError(f"stage-2 batch size {batch_size} is larger than the {len(sampler)} samples this rank "
                              "draws per epoch; lower stage2.batch_size")
        self.cached, self.sampler, self.batch_size, self.seed = cached, sampler, batch_size, seed
        self.drop_last = drop_last
        self.transform = transform
        self.order = torch.empty(0, dtype=torch.int64)
        self.generator = torch.Generator(device=cached.features.device)
        self.epoch = 0

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        self.epoch = epoch
        self.order = self.sampler.epoch_indices(epoch, total_epochs).to(self.cached.targets.device)

    def __len__(self) -> int:
        return len(batch_bounds(len(self.sampler), self.batch_size, self.drop_last))

    @property
    def samples_per_epoch(self) -> int:
        return samples_in_batches(len(self.sampler), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[Batch]:
        self.generator.manual_seed(epoch_seed(self.seed, self.epoch, FEATURE_DRAW_STREAM))
        for start, end in batch_bounds(len(self.order), self.batch_size, self.drop_last):
            index = self.order[start:end]
            features, targets = self.cached.features[:, index], self.cached.targets[index]
            if self.transform is not None:
                features = self.transform(features, index, self.generator)
            yield Batch(images=features, targets=targets, indices=index)


@dataclass
class Stage2Context:
    """Everything a stage-2 method works with. ``model`` holds the stage-1 weights with its backbone
    frozen; a method replaces ``model.heads[i]`` and trains them with ``train``. ``out_dir`` receives
    the checkpoints; ``resume`` continues from its ``checkpoints/last.pt``.

    The settings of stage 2's training job are ``stage2.*``; each one left unset is stage 1's
    (``batch_size``: ``data.batch_size``; ``grad_clip``, ``compile``, ``log_interval``, ``amp``: ``train.*``)."""

    config: Config
    model: nn.Module
    bundle: DataBundle
    dist: DistInfo
    augment: BatchAugment
    feature_mode: str
    out_dir: Path
    resume: bool = False
    cached: dict[str, FeatureSet] = field(default_factory=dict)
    bn_moved: bool = False

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def precision(self) -> Precision:
        """``stage2.amp`` (else ``train.amp``) with ``train.channels_last``, resolved for the device."""
        amp = self.config.stage2.amp or self.config.train.amp
        return resolve_precision(amp, self.config.train.channels_last, self.device)

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return self.precision.amp_dtype

    @property
    def evaluation(self) -> EvalSettings:
        """How stage 2 scores its model and extracts features: the run's evaluation view at stage 2's precision."""
        return builders.eval_settings(self.config, self.bundle, self.precision)

    @property
    def counts(self) -> list[int]:
        return self.bundle.train_counts

    @property
    def num_classes(self) -> int:
        return self.bundle.num_classes

    @property
    def batch_size(self) -> int:
        return self.config.stage2.batch_size or self.config.data.batch_size

    @property
    def grad_clip(self) -> float | None:
        clip = self.config.stage2.grad_clip
        return self.config.train.grad_clip if clip is None else clip

    @property
    def compile(self) -> bool:
        compiled = self.config.stage2.compile
        return self.config.train.compile if compiled is None else compiled

    @property
    def log_interval(self) -> int:
        return self.config.stage2.log_interval or self.config.train.log_interval

    @property
    def seed(self) -> int:
        return self.config.seed + SAMPLER_SEED_OFFSET

    def features(self, split: str) -> FeatureSet:
        """The frozen backbone's features of ``split`` (train, val or test), extracted once."""
        if split not in self.cached:
            imageset = getattr(self.bundle, split)
            if imageset is None:
                raise ValueError(f"the run has no {split} split")
            LOG.info(f"stage 2: caching {split} features of {len(imageset)} images")
            outputs = evaluate(self.model, imageset, self.evaluation, self.dist, expert_features=True,
                               test_time_augment=False, metrics=False).outputs
            self.cached[split] = FeatureSet(outputs["expert_features"].to(self.device),
                                            outputs["targets"].to(self.device))
        return self.cached[split]

    def sampler(self) -> Sampler:
        cfg = self.config.stage2
        return builders.build_sampler(self.config, self.bundle, self.dist, cfg.sampler or "instance",
                                      cfg.sampler_params, "stage2.sampler_params", self.seed,
                                      batch_size=self.batch_size)

    def loss(self, default: nn.Module) -> nn.Module:
        """``stage2.loss`` when the config names one, else the method's ``default``."""
        cfg = self.config.stage2.loss
        if cfg is None:
            return default.to(self.device)
        return LOSSES.build(cfg.name, cfg.params, where="stage2.loss.params", class_counts=self.counts,
                            num_classes=self.num_classes, num_samples=len(self.bundle.train)).to(self.device)

    def _optimizer(self, groups: list[tuple[list[nn.Parameter], float]]) -> torch.optim.Optimizer:
        """``stage2.optim`` over parameter groups, each at ``lr_factor`` x the configured lr."""
        cfg = self.config.stage2.optim
        (first, first_factor), *rest = groups
        optimizer = build_optimizer(first, cfg, self.device)
        optimizer.param_groups[0]["lr"] = cfg.lr * first_factor
        for params, factor in rest:
            optimizer.add_param_group({"params": [p for p in params if p.requires_grad], "lr": cfg.lr * factor})
        return optimizer

    def train(self, groups: list[tuple[list[nn.Parameter], float]], loss_fn: nn.Module,
              transform: FeatureTransform | None = None, bn_train: bool = True) -> list[dict[str, Any]]:
        """Train the parameter ``groups`` (params, lr factor) of ``model.heads`` for ``stage2.epochs``
        epochs with the Trainer; returns one row per epoch. ``bn_train``: in ``images`` mode, run the
        backbone's BatchNorm layers in train mode (cRT's authors; MiSLAS's ``bn_shift``)."""
        cfg = self.config.stage2
        if cfg.epochs < 1:
            raise ConfigError(f"stage2.method={cfg.method} trains the classifier; set stage2.epochs >= 1")
        sampler = self.sampler()
        if self.feature_mode == "images":
            if transform is not None:
                raise ConfigError(f"stage2.method={cfg.method} transforms cached features; set stage2.features=cached")
            loader = builders.train_loader(self.config, self.bundle, sampler, self.augment, self.device, self.seed,
                                           self.batch_size)
            net: nn.Module = ImageView(self.model, bn_train)
            self.bn_moved = bn_train
        else:
            # every rank draws its own feature noise
            draw_seed = self.seed * 1009 + self.dist.rank
            loader = FeatureLoader(self.features("train"), sampler, self.batch_size, draw_seed, transform,
                                   drop_last=self.config.data.drop_last)
            net = FeatureView(self.model)
        optimizer = self._optimizer(groups)
        scheduler = build_scheduler(optimizer, cfg.schedule, len(loader), cfg.epochs)
        loss = ExpertSum(loss_fn)
        job = TrainingJob(
            label=f"stage 2 ({cfg.method})", model=self.model, net=net, loss_fn=loss, loader=loader,
            optimizer=optimizer, scheduler=scheduler, epochs=cfg.epochs, precision=self.precision,
            evaluation=self.evaluation, batch_size=self.batch_size, grad_clip=self.grad_clip, compile=self.compile,
            log_interval=self.log_interval, stop_at_epoch=cfg.stop_at_epoch,
            select="last", eval_every=cfg.eval_every, evaluate_at_end=False, hooked=[sampler, loss_fn],
            checkpoint_extra=lambda: {"heads": [head_spec(h) for h in self.model.heads],
                                      "stage2": {"method": cfg.method, "features": self.feature_mode}},
            broadcast_buffers=False)  # each rank shifts BN on its own batches; averaged at the end
        last = last_checkpoint(self.out_dir)
        resume_from = last if self.resume and last.is_file() else None
        result = Trainer(self.config, job, self.bundle, self.out_dir, self.dist, resume_from).fit()
        if result.stopped_at_epoch is not None:
            raise Stage2Stopped(result.stopped_at_epoch)
        if self.bn_moved:
            average_bn_statistics(self.model)
        return result.results.get("history", [])


class Stage2Stopped(Exception):
    """Stage 2 stopped at ``stage2.stop_at_epoch``; its checkpoint is written and ``--resume`` continues."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"stage 2 stopped after epoch {epoch}")
        self.epoch = epoch
