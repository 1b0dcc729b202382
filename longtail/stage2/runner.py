"""``run_stage2``: the decoupled classifier stage after stage 1 (``longtail train`` calls it when the
recipe has a ``stage2`` section).

It loads stage 1's checkpoint, freezes the backbone, lets the method (``stage2.method``) replace and
train the heads, checks that the backbone's weights are bit-identical afterwards (and its BatchNorm
statistics too, unless it ran the backbone's BN in train mode), folds the heads, evaluates and writes
the final ``checkpoints/last.pt`` (``finished: true``) to its output folder; the command writes
metrics.json and the plots.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from torch import nn

from longtail.config import AugmentConfig, Config
from longtail.engine import builders
from longtail.engine.checkpoint import CheckpointError, load_checkpoint, run_checkpoint, save_checkpoint
from longtail.engine.distributed import DistInfo, barrier
from longtail.engine.evaluation import final_scores
from longtail.engine.logging import LOG
from longtail.engine.rundir import checkpoint_path, last_checkpoint
from longtail.metrics import summary
from longtail.models.heads import fold_head, head_spec
from longtail.registry import STAGE2, ConfigError, load_all
from longtail.stage2.training import BATCH_NORMS, Stage2Context, Stage2Stopped

__all__ = ["run_stage2", "Stage2Result", "stage1_checkpoint", "backbone_state", "check_backbone"]


def stage1_checkpoint(run_dir: Path, choice: str) -> Path:
    """The checkpoint ``stage2.from_checkpoint`` names: ``last``/``best`` of the run, or a file."""
    path = checkpoint_path(run_dir, choice) if choice in ("last", "best") else Path(choice)
    if not path.is_file():
        hint = " ('best' exists only when stage 1 ran with train.select=val or test)" if choice == "best" else ""
        raise CheckpointError(f"stage 2 cannot find its stage-1 checkpoint {path}{hint}; set stage2.from_checkpoint "
                              "to last, best or a checkpoint file")
    return path


def backbone_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every parameter and buffer outside ``model.heads``."""
    in_heads = {id(t) for t in chain(model.heads.parameters(), model.heads.buffers())}
    return {name: tensor.detach().clone() for name, tensor in chain(model.named_parameters(), model.named_buffers())
            if id(tensor) not in in_heads}


def _bn_statistics(model: nn.Module) -> set[str]:
    return {f"{name}.{buffer}" for name, module in model.named_modules() if isinstance(module, BATCH_NORMS)
            for buffer in ("running_mean", "running_var", "num_batches_tracked")}


def check_backbone(model: nn.Module, before: dict[str, torch.Tensor], bn_statistics_may_change: bool) -> None:
    """Raise if stage 2 changed the frozen backbone (its BN statistics are allowed to change when
    the method shifts them)."""
    allowed = _bn_statistics(model) if bn_statistics_may_change else set()
    after = backbone_state(model)
    changed = [name for name, tensor in before.items() if name not in allowed and not torch.equal(tensor, after[name])]
    if changed or after.keys() != before.keys():
        raise RuntimeError(f"stage 2 changed the frozen backbone ({', '.join(changed[:5]) or 'its set of tensors'}); "
                           "this is a bug in the stage-2 method")


def _stage2_augment(config: Config) -> AugmentConfig:
    """``stage2.augment``, else stage 1's augmentation without mixing (MiSLAS's stage 2 turns mixup off)."""
    stage2 = config.stage2
    if stage2.augment is not None:
        return stage2.augment
    return config.data.augment.model_copy(update={"mixup_alpha": 0.0, "remix": False})


def _feature_mode(config: Config, method: Any) -> str:
    cfg = config.stage2
    mode = cfg.features or method.feature_modes[0]
    if mode not in method.feature_modes:
        raise ConfigError(f"stage2.features={mode} is not supported by stage2.method={cfg.method}; "
                          f"allowed: {', '.join(method.feature_modes)}")
    if cfg.augment is not None and mode != "images":
        raise ConfigError(f"stage2.augment is used when stage 2 passes images through the backbone "
                          f"(stage2.features=images); {cfg.method} runs on cached features of the un-augmented "
                          "images here. Remove stage2.augment or set stage2.features=images")
    return mode


@dataclass
class Stage2Result:
    """``results`` (what metrics.json holds) and the test predictions (for the plots); ``stopped_at_epoch``
    when ``stage2.stop_at_epoch`` stopped it (then only the training checkpoint was written)."""

    results: dict[str, Any]
    test_outputs: dict[str, torch.Tensor] | None = None
    train_counts: list[int] | None = None
    stopped_at_epoch: int | None = None


def run_stage2(config: Config, run_dir: Path, dist_info: DistInfo, out_dir: Path, resume: bool = False) -> Stage2Result:
    """Run the stage-2 method of ``config.stage2`` on the stage-1 run in ``run_dir``, writing its
    checkpoints to ``out_dir`` (``resume``: continue from ``out_dir/checkpoints/last.pt``)."""
    cfg = config.stage2
    if cfg is None:
        raise ConfigError("the config has no stage2 section; add one (e.g. stage2: {method: crt})")
    started = time.perf_counter()
    load_all()
    device = dist_info.device
    checkpoint = stage1_checkpoint(run_dir, cfg.from_checkpoint)
    bundle = builders.build_bundle(config)
    model = builders.load_trained_model(config, bundle, load_checkpoint(checkpoint, map_location=device), device)
    torch.manual_seed(config.seed)  # fresh heads start the same on every rank, and again on resume
    try:
        method = STAGE2.build(cfg.method, cfg.params, where="stage2.params", class_counts=bundle.train_counts,
                              num_classes=bundle.num_classes)
    except ConfigError:
        raise
    except ValueError as error:  # a bad value of a stage2.params key: a config error the user can fix
        raise ConfigError(f"stage2.params of {cfg.method}: {error}") from error
    mode = _feature_mode(config, method)
    if method.post_hoc and cfg.epochs:
        LOG.info(f"stage 2: {cfg.method} is post-hoc; stage2.epochs={cfg.epochs} is not used")
    for param in model.backbone_parameters():
        param.requires_grad_(False)
    before = backbone_state(model)
    augment = builders.build_augment(config, bundle, _stage2_augment(config))
    ctx = Stage2Context(config, model, bundle, dist_info, augment, mode, out_dir, resume)
    LOG.info(f"stage 2: {cfg.method} on {checkpoint} ({len(model.heads)} head(s), "
             f"{'post-hoc' if method.post_hoc else f'{mode} features'})")
    try:
        info = method.run(ctx)
    except Stage2Stopped as stop:
        return Stage2Result(results={"stopped_at_epoch": stop.epoch}, stopped_at_epoch=stop.epoch)
    train_seconds = time.perf_counter() - started
    check_backbone(model, before, ctx.bn_moved)
    for i, head in enumerate(list(model.heads)):
        model.heads[i] = fold_head(head)

    epochs = 0 if method.post_hoc else cfg.epochs
    last, test_outputs = final_scores(model, bundle, ctx.evaluation, dist_info, epochs)
    test_metrics = last["test"]
    results: dict[str, Any] = {"method": cfg.method, "params": cfg.params, "from_checkpoint": str(checkpoint),
                               "features": None if method.post_hoc else mode, "train_seconds": train_seconds,
                               **info, "last": last}
    results["seconds"] = time.perf_counter() - started
    if dist_info.is_main:
        stage2 = {"method": cfg.method, "from_checkpoint": str(checkpoint)}
        save_checkpoint(run_checkpoint(model, config, epochs - 1, heads=[head_spec(h) for h in model.heads],
                                       finished=True, stage2=stage2), last_checkpoint(out_dir))
        LOG.info(f"stage 2 ({cfg.method}, {results['seconds']:.1f} s): {summary(test_metrics)}")
    barrier()
    return Stage2Result(results=results, test_outputs=test_outputs, train_counts=bundle.train_counts)
