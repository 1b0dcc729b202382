"""Build the pieces of a run from a config: data, model, loaders. Shared by train, eval, stage 2
and calibrate so that all of them see the same data the same way."""
from __future__ import annotations

from typing import Any

import torch

from longtail.config import Config
from longtail.engine.distributed import DistInfo
from longtail.registry import MODELS, load_all


def build_bundle(config: Config) -> Any:
    load_all()
    from longtail.data import build_data
    return build_data(config.data)


def build_model(config: Config, bundle: Any, device: torch.device) -> torch.nn.Module:
    load_all()
    model = MODELS.build(config.model.name, config.model.params, where="model.params",
                         num_classes=bundle.num_classes, in_channels=bundle.channels,
                         image_size=bundle.image_size, pretrained_path=config.model.pretrained_path,
                         class_counts=bundle.train_counts)
    model = model.to(device)
    if use_channels_last(config, device):
        model = model.to(memory_format=torch.channels_last)
    return model


def load_trained_model(config: Config, bundle: Any, state: dict[str, Any], device: torch.device) -> torch.nn.Module:
    """The model of a saved checkpoint; a stage-2 checkpoint's re-built heads (cRT, LWS, NCM...) are
    restored from their specs first so its weights fit."""
    model = build_model(config, bundle, device)
    if state.get("heads"):
        from longtail.stage2.heads import restore_heads
        restore_heads(model, state["heads"])
    model.load_state_dict(state["model"])
    return model


def use_channels_last(config: Config, device: torch.device) -> bool:
    choice = config.train.channels_last
    return choice == "yes" or (choice == "auto" and device.type == "cuda")


def amp_dtype(config: Config, device: torch.device) -> torch.dtype | None:
    choice = config.train.amp
    if choice == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[choice]


def build_augment(config: Config, bundle: Any, augment_cfg: Any = None) -> Any:
    from longtail.data.augment import BatchAugment
    return BatchAugment(augment_cfg or config.data.augment, bundle.mean, bundle.std, bundle.train_counts)


def eval_loader(config: Config, imageset: Any, augment: Any, dist_info: DistInfo) -> Any:
    """This rank's shard (``rank::world_size``, padded) of an evaluation split."""
    from longtail.data.loaders import EvalLoader
    return EvalLoader(imageset, config.data.eval_batch_size, augment.normalize, dist_info.device,
                      rank=dist_info.rank, world_size=dist_info.world_size,
                      num_workers=config.data.num_workers, decode_on_device=config.data.decode_on_device)
