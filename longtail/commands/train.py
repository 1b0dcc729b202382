"""``longtail train``: stage 1, then the recipe's stage 2 and calibration steps, in one run directory.

``--resume RUN`` continues wherever the run stopped: inside stage 1, between the stages, or inside
stage 2 (its checkpoints are in ``RUN/stage2/checkpoints``)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from longtail.commands.calibrate import calibrate_run
from longtail.commands.common import (RESUMABLE_KEYS, UserError, as_trained, changed_keys, run_dir_of,
                                      split_config_and_overrides)
from longtail.commands.results import write_results
from longtail.commands.start_from import check_start, read_start_point, record_start
from longtail.config import Config, check_epochs, config_notes, dump_config, load_config
from longtail.engine import builders, distributed
from longtail.engine.distributed import DistInfo
from longtail.engine.logging import LOG, setup_text_log
from longtail.engine.rundir import (config_file, discard_if_unstarted, is_finished, last_checkpoint, metrics_file,
                                    new_run_dir, recipe_stage2_dir, record_config_change, run_lock, write_output,
                                    write_run_record)
from longtail.engine.trainer import Trainer, seed_everything
from longtail.models.finetune import parameter_counts
from longtail.stage2 import run_stage2

__all__ = ["cmd_train", "train_stage1", "train_stage2"]


def train_stage1(config: Config, run_dir: Path, dist_info: DistInfo, resume_from: Path | None = None,
                 start_from: Path | None = None) -> dict[str, Any]:
    """Stage 1 of ``config`` in ``run_dir``; writes metrics.json and plots at the end. Returns the
    results (``stopped_at_epoch`` when ``train.stop_at_epoch`` stopped it). ``start_from``: a new run
    that begins at another run's kept checkpoint (``longtail.commands.start_from``)."""
    start = read_start_point(start_from, dist_info.device) if start_from is not None else None
    seed_everything(config.seed, config.train.deterministic)
    bundle = builders.build_bundle(config)
    if bundle.image_size_note:
        _record_image_size(config, bundle.image_size, run_dir, dist_info)
        LOG.info(f"image size: {bundle.image_size_note}")
    for line in config_notes(config):
        LOG.info(line)
    job = builders.stage1_job(config, bundle, dist_info, resuming=resume_from is not None or start is not None)
    if start is not None:
        changes = check_start(start, config, len(job.loader))
        if dist_info.is_main:
            record_start(run_dir, start, changes)
    counts = parameter_counts(job.model)
    LOG.info(f"run {run_dir} | {len(bundle.train.targets)} training images in {bundle.num_classes} classes "
             f"(largest {max(bundle.train_counts)}, smallest {min(bundle.train_counts)}) | images "
             f"{bundle.channels}x{bundle.image_size}x{bundle.image_size} | model {config.model.name} | "
             f"loss {config.loss.name} | device {dist_info.device}"
             f"{f' x{dist_info.world_size}' if dist_info.distributed else ''} | "
             f"{builders.precision(config, dist_info.device).label} | parameters: {counts['trainable']:,} trainable "
             f"of {counts['total']:,}{f' (model.finetune={config.model.finetune})' if config.model.finetune != 'full' else ''}")
    fit = Trainer(config, job, bundle, run_dir, dist_info, resume_from, start_from).fit()
    if fit.stopped_at_epoch is None and dist_info.is_main:
        fit.results["parameters"] = counts
        write_results(run_dir, fit.results, fit.test_outputs, bundle.train_counts, fit.results["last"]["test"])
        LOG.info(f"results in {run_dir}")
    return fit.results


def _record_image_size(config: Config, image_size: int, run_dir: Path, dist_info: DistInfo) -> None:
    """The size the data chose (``data.image_size`` unset) goes into the config and the run's config.yaml,
    so eval, predict, export and --resume decode at that size even if the images change."""
    config.data.image_size = image_size
    recorded = config_file(run_dir)
    if dist_info.is_main and recorded.is_file():
        write_output(recorded, dump_config(config), exist="replace")


def train_stage2(config: Config, run_dir: Path, dist_info: DistInfo, out_dir: Path, resume: bool = False) -> dict[str, Any]:
    """Stage 2 of ``config`` on the stage-1 run in ``run_dir``, into ``out_dir``; writes metrics.json
    and plots there when it finishes."""
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    distributed.barrier()
    result = run_stage2(config, run_dir, dist_info, out_dir, resume=resume)
    if result.stopped_at_epoch is None and dist_info.is_main:
        write_results(out_dir, result.results, result.test_outputs, result.train_counts,
                      result.results["last"]["test"])
    return result.results


def _resume_config(run_dir: Path, overrides: list[str]) -> tuple[Config, dict[str, tuple[Any, Any]]]:
    """The run's config with the overrides ``--resume`` allows (RESUMABLE_KEYS) and what they change;
    any other override is refused: the checkpoint's optimiser and schedule state would silently win."""
    recorded = config_file(run_dir)
    if not recorded.is_file():
        raise UserError(f"{run_dir} has no config.yaml; give a run directory written by `longtail train`")
    before = as_trained(load_config(recorded, check_epochs=False))  # a run is continued as it was trained
    config = as_trained(load_config(recorded, overrides, check_epochs=False))
    changes = changed_keys(before.model_dump(mode="json"), config.model_dump(mode="json"))
    if "train.epochs" in changes or "stage2.epochs" in changes:
        check_epochs(config)
    refused = [key for key in changes if not key.startswith(RESUMABLE_KEYS)]
    if refused:
        raise UserError(f"--resume continues a run as it was trained and cannot change {', '.join(refused)} "
                        f"(allowed: {', '.join(RESUMABLE_KEYS)}). Start a new run with the changed values, e.g. "
                        f"`longtail train {recorded} {' '.join(overrides)}`")
    # the earlier job's stop points are behind us, unless the overrides set new ones
    if "train.stop_at_epoch" not in changes:
        config.train.stop_at_epoch = None
    if config.stage2 is not None and "stage2.stop_at_epoch" not in changes:
        config.stage2.stop_at_epoch = None
    return config, {k: v for k, v in changes.items() if not k.endswith("stop_at_epoch")}


def cmd_train(args: argparse.Namespace) -> int:
    config_path, overrides = split_config_and_overrides(args.items)
    resume_from: Path | None = None
    changes: dict[str, tuple[Any, Any]] = {}
    if args.resume:
        resume_from = Path(args.resume)
        run_dir = run_dir_of(resume_from)
        if config_path is not None:
            raise UserError("--resume continues a run with its own config.yaml; give overrides only")
        if getattr(args, "start_from", None):
            raise UserError("--resume continues a run that exists, --start-from begins a new one: give one of them")
        config, changes = _resume_config(run_dir, overrides)
        if resume_from.is_dir():
            resume_from = last_checkpoint(run_dir)
    else:
        config = load_config(config_path, overrides)
    dist_info = distributed.init_distributed(config.device)
    created = not args.resume
    run_dir = None if created else run_dir
    try:
        if created:
            run_dir = new_run_dir(config.output_dir, config.name) if dist_info.is_main else None
            run_dir = distributed.broadcast_object(run_dir)
        with run_lock(run_dir) if dist_info.is_main else contextlib.nullcontext():
            setup_text_log(run_dir, dist_info.is_main)
            if dist_info.is_main and created:
                write_run_record(run_dir, config, dist_info.device, dist_info.world_size)
            if dist_info.is_main and changes:
                record_config_change(run_dir, config, changes)
                LOG.info("resuming with " + ", ".join(f"{k}={new} (was {old})" for k, (old, new) in changes.items())
                         + "; recorded in config.yaml and config_history.jsonl")
            return _train_steps(args, config, run_dir, dist_info, resume_from)
    except KeyboardInterrupt:
        if dist_info.is_main and run_dir is not None:
            _report_interrupt(run_dir, created)
        return 130
    except BaseException:
        if created and dist_info.is_main and run_dir is not None:
            discard_if_unstarted(run_dir)
        raise
    finally:
        distributed.shutdown()


def _report_interrupt(run_dir: Path, created: bool) -> None:
    if created and discard_if_unstarted(run_dir):
        print("interrupted before the first checkpoint; nothing was kept", file=sys.stderr)
    else:
        print(f"interrupted; every checkpoint written is complete. Continue with:\n  longtail train --resume {run_dir}",
              file=sys.stderr)


def _train_steps(args: argparse.Namespace, config: Config, run_dir: Path, dist_info: DistInfo,
                 resume_from: Path | None) -> int:
    """Stage 1, then the recipe's stage 2 and calibration, each skipped when already finished."""
    if args.resume and is_finished(run_dir):
        LOG.info(f"stage 1 of {run_dir} is finished; continuing with the steps after it")
        results = json.loads(metrics_file(run_dir).read_text())
    else:
        results = train_stage1(config, run_dir, dist_info, resume_from,
                               Path(args.start_from) if getattr(args, "start_from", None) else None)
        if "stopped_at_epoch" in results:
            return 0
    final = run_dir
    if config.stage2 is not None:
        final = recipe_stage2_dir(run_dir)
        if not is_finished(final):
            stage2 = train_stage2(config, run_dir, dist_info, final, resume=bool(args.resume))
            if "stopped_at_epoch" in stage2:
                return 0
    if config.calibrate is not None:  # calibrates the final model: stage 2's when there is one
        calibrate_run(final, config.calibrate.method, config.calibrate.params, dist_info=dist_info)
    if dist_info.is_main and args.print_json:
        print(json.dumps(results["last"]["test"], indent=2))
    LOG.info(f"done: {run_dir}")
    return 0
