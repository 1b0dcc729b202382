"""``longtail stage2``: a decoupled stage 2 on a finished stage-1 run, so one representation can be
compared under several classifiers; each lands in ``RUN/stage2_<method>[-N]`` (never overwritten), or
``RUN/stage2_<name>[-N]`` with ``--name`` (two variants of one method side by side).
``--resume STAGE2_DIR`` continues one that was stopped (``stage2.stop_at_epoch``) or interrupted."""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import yaml

from longtail.commands.common import UserError, as_trained, folder_name, run_dir_of, split_config_and_overrides
from longtail.commands.train import train_stage2
from longtail.config import apply_overrides, check_epochs, config_from_dict, dump_config, load_config, read_recipe
from longtail.engine import distributed
from longtail.engine.logging import LOG, setup_text_log
from longtail.engine.rundir import (config_file, discard_if_unstarted, is_finished, last_checkpoint, new_run_dir,
                                    run_lock, stage2_dir_name)

__all__ = ["cmd_stage2"]


def cmd_stage2(args: argparse.Namespace) -> int:
    if args.resume:
        return _resume(Path(args.run), args.items)
    run_dir = run_dir_of(Path(args.run))
    recorded = config_file(run_dir)
    if not recorded.is_file():
        raise UserError(f"{run_dir} has no config.yaml; give a run directory written by `longtail train`")
    if not is_finished(run_dir) and not args.allow_incomplete:
        raise UserError(f"stage 1 of {run_dir} is not finished (no metrics.json): its last checkpoint is an "
                        f"intermediate epoch. Finish it with `longtail train --resume {run_dir}`, or pass "
                        "--allow-incomplete to run stage 2 on it anyway")
    raw = yaml.safe_load(recorded.read_text())
    recipe, overrides = split_config_and_overrides(args.items)
    if recipe is not None:
        stage2 = read_recipe(recipe).get("stage2")
        if not stage2:
            raise UserError(f"{recipe} has no stage2 section; name a stage-2 recipe (e.g. configs/cifar10_lt/if100/crt.yaml)")
        raw["stage2"] = stage2
    config = as_trained(config_from_dict(apply_overrides(raw, overrides),
                                         f"{recorded} (+ stage 2 of {recipe or 'the run'})"))
    if config.stage2 is None:
        raise UserError("no stage-2 method: give a stage-2 recipe or stage2.method=NAME (see `longtail list`)")
    check_epochs(config, ("stage2",), can_scale=False)
    folder = stage2_dir_name(folder_name(args.name, '--name') if args.name else config.stage2.method)
    dist_info = distributed.init_distributed(config.device)
    out_dir = None
    try:
        out_dir = new_run_dir(run_dir, folder) if dist_info.is_main else None
        out_dir = distributed.broadcast_object(out_dir)
        setup_text_log(out_dir, dist_info.is_main)
        if dist_info.is_main:
            config_file(out_dir).write_text(dump_config(config))
        results = train_stage2(config, run_dir, dist_info, out_dir)
        if "stopped_at_epoch" in results:
            LOG.info(f"continue with `longtail stage2 --resume {out_dir}`")
        else:
            LOG.info(f"done: {out_dir}")
    except BaseException:
        if out_dir is not None and dist_info.is_main:
            discard_if_unstarted(out_dir)
        raise
    finally:
        distributed.shutdown()
    return 0


def _resume(out_dir: Path, overrides: list[str]) -> int:
    if not config_file(out_dir).is_file() or not last_checkpoint(out_dir).is_file():
        raise UserError(f"{out_dir} is not a stage-2 directory with a checkpoint (RUN/stage2_<method>/checkpoints/"
                        "last.pt); give the folder `longtail stage2` printed")
    if is_finished(out_dir):
        raise UserError(f"stage 2 in {out_dir} is already finished (metrics.json); start a new one with "
                        f"`longtail stage2 {out_dir.parent} ...`")
    config = as_trained(load_config(config_file(out_dir), overrides, check_epochs=False))
    if not any(o.startswith("stage2.stop_at_epoch=") for o in overrides):
        config.stage2.stop_at_epoch = None
    dist_info = distributed.init_distributed(config.device)
    try:
        with run_lock(out_dir) if dist_info.is_main else contextlib.nullcontext():
            setup_text_log(out_dir, dist_info.is_main)
            results = train_stage2(config, out_dir.parent, dist_info, out_dir, resume=True)
            if "stopped_at_epoch" not in results:
                LOG.info(f"done: {out_dir}")
    finally:
        distributed.shutdown()
    return 0
