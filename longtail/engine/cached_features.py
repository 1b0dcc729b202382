"""Stage 1 on cached features when nothing before the head trains (``model.finetune=linear``).

A linear probe's backbone is frozen, so each training image's features are the same every epoch as
long as the image is: one pass of the backbone over the training set, then the head trains on the
stored features in seconds per epoch (as stage 2's ``stage2.features=cached`` does for cRT and
friends; written here again in a few lines, since the engine does not import stage 2).

``model.finetune_params.cache_features`` (linear only):

- ``auto`` (default): cache when it is exact: ``data.augment`` draws nothing per epoch (no crop, flip,
  AutoAugment/RandAugment, Cutout, mixup/Remix) and no second sampler (BBN) pairs the batches. With
  random augmentation the cached features would be those of the un-augmented images, not of each
  epoch's augmented ones, so ``auto`` trains on the images instead;
- ``true``: cache anyway; the features are the un-augmented images' (the evaluation view, stage 2's
  convention) and ``data.augment``'s random ops are **not applied**: the run header says which;
- ``false``: never (every epoch passes the images through the frozen backbone).

Cached features come from the backbone in eval mode (dropout off, batch norm on its running
statistics), as stage 2's cached mode; a linear probe's backbone stays in eval mode when it trains
on images too (``FoundationBackbone.train``), so a cached run equals an uncached one wherever
nothing random is drawn per epoch (tests/test_linear_cache.py). They are extracted
lazily, at the first epoch, so ``--resume`` extracts them from the checkpoint's weights.
Evaluation is unchanged: it runs the whole model on the evaluation images.
"""
from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from longtail.config import AugmentConfig, Config
from longtail.data.datasets import DataBundle
from longtail.data.loaders import batch_bounds
from longtail.engine.distributed import DistInfo
from longtail.engine.evaluation import EvalSettings, evaluate
from longtail.engine.logging import LOG
from longtail.engine.trainer import TrainingJob
from longtail.registry import ConfigError
from longtail.types import Batch, ModelOutput

__all__ = ["CACHE_SETTINGS", "random_augmentations", "cache_decision", "use_cached_features", "CachedFeatureLoader",
           "HeadsOnFeatures"]

CACHE_SETTINGS = ("auto", True, False)


def random_augmentations(cfg: AugmentConfig) -> list[str]:
    """The ``data.augment`` settings that draw something per epoch (what a cache of the un-augmented
    images leaves out)."""
    ops = []
    if cfg.crop_padding > 0:
        ops.append(f"crop_padding={cfg.crop_padding}")
    if cfg.random_resized_crop:
        ops.append("random_resized_crop")
    if cfg.flip:
        ops.append("flip")
    if cfg.autoaugment != "none":
        ops.append(f"autoaugment={cfg.autoaugment}")
    if cfg.randaugment:
        ops.append("randaugment")
    if cfg.cutout > 0:
        ops.append(f"cutout={cfg.cutout}")
    if cfg.mixup_alpha > 0:
        ops.append("remix" if cfg.remix else f"mixup_alpha={cfg.mixup_alpha}")
    return ops


def _setting(config: Config) -> Any:
    value = config.model.finetune_params.get("cache_features", "auto")
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value not in CACHE_SETTINGS or isinstance(value, int) and not isinstance(value, bool):
        raise ConfigError(f"model.finetune_params.cache_features={value!r}; allowed: auto, true, false")
    return value


def cache_decision(config: Config) -> tuple[bool, str]:
    """(cache the features?, the run-header line that says so and why; '' when it does not apply)."""
    if config.model.finetune != "linear":
        return False, ""
    setting = _setting(config)
    augment = random_augmentations(config.data.augment)
    paired = config.data.pair_sampler
    if setting is False:
        return False, "stage 1: features not cached (model.finetune_params.cache_features=false)"
    if paired:
        if setting is True:
            raise ConfigError("model.finetune_params.cache_features=true cannot be combined with data.pair_sampler "
                              f"({paired}): the paired batches pass images. Set cache_features to auto or false")
        return False, f"stage 1: features not cached (data.pair_sampler={paired} pairs image batches)"
    if augment and setting == "auto":
        return False, (f"stage 1: features not cached: data.augment draws per epoch ({', '.join(augment)}), so the "
                       "frozen backbone runs on each epoch's augmented images (cache_features=true caches the "
                       "un-augmented images' features instead)")
    line = ("stage 1: model.finetune=linear on cached features: one pass of the frozen backbone (eval mode) over "
            "the un-augmented training images, then the head trains on them")
    if augment:
        line += f"; data.augment NOT applied ({', '.join(augment)}: cache_features=true)"
    return True, line


class HeadsOnFeatures(nn.Module):
    """The model as a cached stage 1 trains it: cached features (M, B, D) -> the heads' output. The
    backbone is not called, so it stays in eval mode whatever ``train()`` asks."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def train(self, mode: bool = True) -> "HeadsOnFeatures":
        self.training = mode
        self.model.eval()
        self.model.heads.train(mode)
        return self

    def forward(self, features: torch.Tensor) -> ModelOutput:
        # as Classifier.forward after its backbone
        logits, expert_logits = self.model.logits_from_features(features)
        if len(self.model.heads) == 1:
            return ModelOutput(logits=logits, features=features[0])
        return ModelOutput(logits=logits, features=torch.cat(list(features), dim=1), expert_logits=expert_logits,
                           expert_features=features)


class CachedFeatureLoader:
    """The training loader of a cached stage 1: at the first ``set_epoch`` the frozen model's features
    of the un-augmented training images are extracted (one pass of ``engine.evaluation.evaluate``: eval mode, gathered
    over ranks), then each epoch's batches are the rows of the stage's own sampler's indices, cut as
    ``TrainLoader`` cuts them (``batch_bounds``, ``drop_last``): the uncached loader's batches.
    ``Batch.images`` holds the features (1, B, D)."""

    def __init__(self, bundle: DataBundle, settings: EvalSettings, dist_info: DistInfo, model: nn.Module,
                 sampler: Any, batch_size: int, seed: int, drop_last: bool) -> None:
        self.bundle, self.settings, self.dist, self.model = bundle, settings, dist_info, model
        self.sampler, self.batch_size, self.seed, self.drop_last = sampler, batch_size, seed, drop_last
        self.features: torch.Tensor | None = None  # (N, D) float32 on the training device
        self.targets: torch.Tensor | None = None
        self.order: torch.Tensor | None = None
        self.extractions = 0  # how many times the training set was passed through the backbone

    def _extract(self) -> None:
        imageset = self.bundle.train
        LOG.info(f"stage 1: caching the features of {len(imageset.targets)} training images (model.finetune=linear)")
        outputs = evaluate(self.model, imageset, self.settings, self.dist, keep_features=True,
                           test_time_augment=False, metrics=False).outputs
        self.features = outputs["features"].to(self.dist.device)
        self.targets = outputs["targets"].long().to(self.dist.device)
        self.extractions += 1

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        if self.features is None:
            self._extract()
        self.order = self.sampler.epoch_indices(epoch, total_epochs).to(self.dist.device)

    def _bounds(self, total: int) -> list[tuple[int, int]]:
        return batch_bounds(total, self.batch_size, self.drop_last)

    def __len__(self) -> int:
        return len(self._bounds(len(self.sampler)))

    @property
    def samples_per_epoch(self) -> int:
        bounds = self._bounds(len(self.sampler))
        return bounds[-1][1] if bounds else 0

    def __iter__(self) -> Iterator[Batch]:
        if self.order is None or self.features is None or self.targets is None:
            raise RuntimeError("call CachedFeatureLoader.set_epoch(epoch, total_epochs) before iterating")
        for start, end in self._bounds(len(self.order)):
            index = self.order[start:end]
            yield Batch(images=self.features[index].unsqueeze(0), targets=self.targets[index], indices=index)


def use_cached_features(config: Config, bundle: DataBundle, dist_info: DistInfo, job: TrainingJob) -> TrainingJob:
    """``job`` (stage 1) trained on cached features when ``cache_decision`` says so (its net becomes
    ``HeadsOnFeatures``, its loader a ``CachedFeatureLoader``); else ``job`` unchanged. Logs the
    decision (the run header)."""
    cache, line = cache_decision(config)
    if line:
        LOG.info(line)
    if not cache:
        return job
    model = job.model
    if len(getattr(model, "heads", ())) != 1:
        raise ConfigError("cached features are for one-head models (timm/open_clip); "
                          "set model.finetune_params.cache_features=false")
    trainable = [name for name, p in model.named_parameters() if p.requires_grad and not name.startswith("heads.")]
    if trainable:  # linear freezes every backbone parameter; anything else would be silently left untrained
        raise ConfigError(f"cached features need a frozen backbone, but {trainable[0]} trains; "
                          "set model.finetune_params.cache_features=false")
    loader = job.loader
    job.loader = CachedFeatureLoader(bundle, job.evaluation, dist_info, model, loader.sampler, loader.batch_size,
                                     loader.seed, loader.drop_last)
    job.net = HeadsOnFeatures(model)
    return job
