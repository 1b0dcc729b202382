"""Build the pieces of a run from a config: data, model, loaders, the evaluation settings and the
stage-1 training job. Shared by train, eval, stage 2 and calibrate so that all of them see the same data
the same way. This is where config sections are read: what the trainer and the evaluation get is
explicit (a ``TrainingJob``, ``EvalSettings``)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from longtail.config import AugmentConfig, Config
from longtail.data import DataBundle, ImageSet, Sampler, build_data
from longtail.data.augment import BatchAugment
from longtail.data.bbn import PairedLoader
from longtail.data.loaders import EvalLoader, TrainLoader
from longtail.engine.cached_features import use_cached_features
from longtail.engine.distributed import DistInfo
from longtail.engine.evaluation import EvalSettings, evaluate
from longtail.engine.optim import build_optimizer, build_scheduler
from longtail.engine.precision import Precision, resolve_precision
from longtail.engine.trainer import TrainingJob
from longtail.models.finetune import layerwise_groups
from longtail.models.foundation import init_head_from_class_means, model_data_config
from longtail.models.heads import restore_heads
from longtail.registry import LOSSES, MODELS, SAMPLERS, ConfigError, load_all


# file datasets decode their images at data.image_size; in-memory ones keep their native size and a
# pretrained model resizes them itself (models/foundation.py)
RESIZING_DATASETS = ("image_folder", "list_files")


def build_bundle(config: Config) -> DataBundle:
    """The run's data. A timm/open_clip model's pretrained data config decides what the recipe leaves
    open: file images are decoded at its input size unless data.image_size is set, and images are
    normalised with its mean/std unless model.normalization=dataset."""
    load_all()
    pretrained = model_data_config(config.model.name, config.model.params)
    data = config.data
    if pretrained and data.image_size is None and data.dataset in RESIZING_DATASETS:
        data = data.model_copy(update={"image_size": pretrained["input_size"]})
    bundle = build_data(data)
    # a grey dataset on a network built with in_chans=1 has no use for RGB statistics
    if pretrained and config.model.normalization == "model" and len(pretrained["mean"]) == bundle.channels:
        bundle = dataclasses.replace(bundle, mean=pretrained["mean"], std=pretrained["std"])
    return bundle


def build_model(config: Config, bundle: DataBundle, device: torch.device, load_weights: bool = True) -> torch.nn.Module:
    """The recipe's model on ``device``. ``load_weights=False`` skips pretrained weights and head
    initialisation (a checkpoint is about to replace every weight)."""
    load_all()
    cfg = config.model
    accepted = MODELS.parameters(cfg.name)
    unsupported = [key for key, value, default in (("pretrained", cfg.pretrained, False),
                                                   ("finetune", cfg.finetune, "full"),
                                                   ("finetune_params", cfg.finetune_params, {}))
                   if value != default and key not in accepted]
    if unsupported:
        raise ConfigError(f"model.{', model.'.join(unsupported)} apply to pretrained timm/open_clip models; "
                          f"model {cfg.name!r} takes model.weights=PATH for its own weights")
    model = MODELS.build(cfg.name, cfg.params, where="model.params",
                         num_classes=bundle.num_classes, in_channels=bundle.channels,
                         image_size=bundle.image_size, pretrained_path=(cfg.weights or cfg.pretrained_path) if load_weights else None,
                         pretrained=cfg.pretrained, finetune=cfg.finetune, finetune_params=cfg.finetune_params,
                         class_names=list(bundle.class_names), load_weights=load_weights)
    model = model.to(device)
    if use_channels_last(config, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def eval_settings(config: Config, bundle: DataBundle, precision: Precision) -> EvalSettings:
    """How the run's models are scored (``engine.evaluation``): the evaluation view of ``bundle``
    (its mean/std), ``data.eval_batch_size``, ``data.num_workers``, ``data.decode_on_device``, ``eval.tta``
    and ``precision``'s autocast dtype."""
    data = config.data
    return EvalSettings(normalize=build_augment(config, bundle).normalize, batch_size=data.eval_batch_size,
                        num_workers=data.num_workers, decode_on_device=data.decode_on_device,
                        amp_dtype=precision.amp_dtype, tta=config.eval.tta, tta_resize=config.eval.tta_resize)


def evaluation_model(config: Config, model: torch.nn.Module) -> torch.nn.Module:
    """``model`` as evaluation scores it: wrapped in test-time ensembling when ``eval.tta`` asks."""
    return EvalSettings(normalize=lambda images: images, batch_size=config.data.eval_batch_size,
                        tta=config.eval.tta, tta_resize=config.eval.tta_resize).view(model)


def init_head(config: Config, model: torch.nn.Module, bundle: DataBundle, dist_info: DistInfo) -> None:
    """LIFT's class-mean head initialisation (``model.params.head_init=class_mean``): the normalised
    mean feature of each class's un-augmented training images, from one pass of the initial model."""
    if getattr(model, "head_init", "none") != "class_mean":
        return
    settings = eval_settings(config, bundle, precision(config, dist_info.device))
    outputs = evaluate(model, bundle.train, settings, dist_info, keep_features=True, test_time_augment=False,
                       metrics=False).outputs
    init_head_from_class_means(model, outputs["features"], outputs["targets"].long())


def load_trained_model(config: Config, bundle: DataBundle, state: dict[str, Any],
                       device: torch.device) -> torch.nn.Module:
    """The model of a saved checkpoint; a stage-2 checkpoint's re-built heads (cRT, LWS, NCM...) are
    restored from their specs first so its weights fit."""
    model = build_model(config, bundle, device, load_weights=False)
    if state.get("heads"):
        load_all()  # registers every head kind, also those of stage 2
        restore_heads(model, state["heads"])
    model.load_state_dict(state["model"])
    return model


def precision(config: Config, device: torch.device) -> Precision:
    """``train.amp`` and ``train.channels_last`` resolved for ``device`` (``engine/precision.py``)."""
    return resolve_precision(config.train.amp, config.train.channels_last, device)


def use_channels_last(config: Config, device: torch.device) -> bool:
    return precision(config, device).channels_last


def amp_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    return precision(config, device).amp_dtype


def build_augment(config: Config, bundle: DataBundle, augment_cfg: AugmentConfig | None = None) -> BatchAugment:
    return BatchAugment(augment_cfg or config.data.augment, bundle.mean, bundle.std, bundle.train_counts)


def eval_loader(config: Config, imageset: ImageSet, normalize: Callable[[torch.Tensor], torch.Tensor],
                dist_info: DistInfo) -> EvalLoader:
    """This rank's shard (``rank::world_size``, padded) of an evaluation split."""
    return EvalSettings(normalize, config.data.eval_batch_size, config.data.num_workers,
                        config.data.decode_on_device).loader(imageset, dist_info)


def build_sampler(config: Config, bundle: DataBundle, dist_info: DistInfo, name: str, params: dict[str, Any],
                  where: str, seed: int, batch_size: int | None = None) -> Sampler:
    """A registered sampler for this rank; ``batch_size`` (per process; default ``data.batch_size``) is
    context for samplers whose epoch is counted in batches (``class_aware``)."""
    return SAMPLERS.build(name, params, where=where, targets=bundle.train.targets, num_classes=bundle.num_classes,
                          seed=seed, rank=dist_info.rank, world_size=dist_info.world_size,
                          batch_size=batch_size or config.data.batch_size)


def train_loader(config: Config, bundle: DataBundle, sampler: Sampler, augment: BatchAugment, device: torch.device,
                 seed: int, batch_size: int | None = None) -> TrainLoader:
    data = config.data
    return TrainLoader(bundle.train, sampler, batch_size or data.batch_size, augment, device, seed=seed,
                       num_workers=data.num_workers, decode_on_device=data.decode_on_device,
                       drop_last=data.drop_last)


def stage1_job(config: Config, bundle: DataBundle, dist_info: DistInfo, resuming: bool = False) -> TrainingJob:
    """Stage 1 (representation learning): the recipe's model, loss, sampler(s), augmentation,
    optimiser and schedule as a ``TrainingJob``. Call ``trainer.seed_everything`` first: the model's
    initial weights come from the global generator. ``resuming``: a checkpoint will replace every
    weight, so pretrained weights are not read (the file may be gone) and no head is initialised.
    Every setting of the job (batch size, gradient clipping, compile, log interval, precision, how it is
    evaluated) is stage 1's: ``data.*``, ``train.*``, ``eval.*``."""
    data, device = config.data, dist_info.device
    model = build_model(config, bundle, device, load_weights=not resuming)
    if not resuming:
        init_head(config, model, bundle, dist_info)
    loss_fn = LOSSES.build(config.loss.name, config.loss.params, where="loss.params",
                           class_counts=bundle.train_counts, num_classes=bundle.num_classes,
                           num_samples=len(bundle.train.targets)).to(device)
    augment = build_augment(config, bundle)
    samplers = [build_sampler(config, bundle, dist_info, data.sampler, data.sampler_params, "data.sampler_params",
                              config.seed)]
    loader: TrainLoader | PairedLoader = train_loader(config, bundle, samplers[0], augment, device, config.seed)
    if data.pair_sampler:
        if data.augment.mixup_alpha > 0 or data.augment.remix:
            raise ConfigError("data.pair_sampler mixes the two samplers' labels itself (BBN); it cannot be combined "
                              "with data.augment.mixup_alpha or remix. Turn one of them off")
        samplers.append(build_sampler(config, bundle, dist_info, data.pair_sampler, {}, "data.pair_sampler",
                                      config.seed))
        second = train_loader(config, bundle, samplers[1], augment, device, config.seed + 7919)
        loader = PairedLoader(loader, second)
    parameters: Any = model.parameters()
    if getattr(model, "layer_decay", None) is not None:
        parameters = layerwise_groups(model, config.optim.lr)
    optimizer = build_optimizer(parameters, config.optim, device)
    scheduler = build_scheduler(optimizer, config.schedule, len(loader), config.train.epochs)
    train = config.train
    run_precision = precision(config, device)
    job = TrainingJob(label="stage 1", model=model, net=model, loss_fn=loss_fn, loader=loader, optimizer=optimizer,
                      scheduler=scheduler, epochs=train.epochs, precision=run_precision,
                      evaluation=eval_settings(config, bundle, run_precision), batch_size=data.batch_size,
                      grad_clip=train.grad_clip, compile=train.compile, log_interval=train.log_interval,
                      stop_at_epoch=train.stop_at_epoch, keep_epochs=tuple(train.keep_epochs),
                      select=train.select, eval_every=train.eval_every, checkpoint_every=train.checkpoint_every,
                      hooked=[model, loss_fn, *samplers])
    return use_cached_features(config, bundle, dist_info, job)  # a linear probe trains on cached features
