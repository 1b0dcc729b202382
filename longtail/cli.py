"""The ``longtail`` command: train, stage2, eval, calibrate, data, list, report.

Errors a user can fix (bad config, missing data, corrupt image, NaN loss) print one clear message
and exit non-zero, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from longtail.config import load_config
from longtail.registry import ConfigError


class UserError(RuntimeError):
    """Something the user can fix; printed without a traceback."""


def _split_config_and_overrides(items: Sequence[str]) -> tuple[str | None, list[str]]:
    if items and "=" not in items[0]:
        return items[0], list(items[1:])
    return None, list(items)


def _run_dir_of(path: Path) -> Path:
    """A run directory from a run directory or one of its checkpoint files."""
    if path.is_dir():
        return path
    if path.suffix == ".pt" and path.parent.name == "checkpoints":
        return path.parent.parent
    raise UserError(f"{path} is neither a run directory nor a checkpoint inside one (RUN/checkpoints/*.pt)")


# ------------------------------------------------------------------ commands
def cmd_train(args: argparse.Namespace) -> int:
    from longtail.engine import distributed
    from longtail.engine.logging import LOG, setup_text_log
    from longtail.engine.rundir import new_run_dir, write_run_record
    from longtail.engine.trainer import Trainer

    config_path, overrides = _split_config_and_overrides(args.items)
    resume_from: Path | None = None
    if args.resume:
        resume_from = Path(args.resume)
        run_dir = _run_dir_of(resume_from)
        if config_path is not None:
            raise UserError("--resume continues a run with its own config.yaml; give overrides only")
        if not any(o.startswith("train.stop_at_epoch=") for o in overrides):
            overrides.append("train.stop_at_epoch=null")  # the earlier job's stop point is behind us
        config = load_config(run_dir / "config.yaml", overrides)
        if resume_from.is_dir():
            resume_from = run_dir / "checkpoints" / "last.pt"
    else:
        config = load_config(config_path, overrides)
    dist_info = distributed.init_distributed(config.device)
    try:
        if not args.resume:
            run_dir = new_run_dir(config.output_dir, config.name) if dist_info.is_main else None
            run_dir = distributed.broadcast_object(run_dir)
        setup_text_log(run_dir, dist_info.is_main)
        if dist_info.is_main and not args.resume:
            write_run_record(run_dir, config, dist_info.device, dist_info.world_size)
        results = Trainer(config, run_dir, dist_info, resume_from=resume_from).fit()
        if "stopped_at_epoch" in results:
            return 0
        if config.stage2 is not None:
            from longtail.stage2.runner import run_stage2
            run_stage2(config, run_dir, dist_info)
        if config.calibrate is not None:  # calibrates the final model: stage 2's when there is one
            from longtail.calibration.runner import calibrate_run
            final = run_dir / "stage2" if config.stage2 is not None else run_dir
            calibrate_run(final, config.calibrate.method, config.calibrate.params, dist_info=dist_info)
        if dist_info.is_main and args.print_json:
            print(json.dumps(results["last"]["test"], indent=2))
        LOG.info(f"done: {run_dir}")
    finally:
        distributed.shutdown()
    return 0


def cmd_stage2(args: argparse.Namespace) -> int:
    """Stage 2 on a finished stage-1 run, so one representation can be compared under several
    classifiers: the run's own config, with the ``stage2`` section of RECIPE (if given) and overrides."""
    import yaml

    from longtail.config import apply_overrides, config_from_dict, dump_config, read_recipe
    from longtail.engine import distributed
    from longtail.engine.logging import LOG, setup_text_log
    from longtail.engine.rundir import new_run_dir
    from longtail.stage2.runner import run_stage2

    run_dir = _run_dir_of(Path(args.run))
    recorded = run_dir / "config.yaml"
    if not recorded.is_file():
        raise UserError(f"{run_dir} has no config.yaml; give a run directory written by `longtail train`")
    raw = yaml.safe_load(recorded.read_text())
    recipe, overrides = _split_config_and_overrides(args.items)
    if recipe is not None:
        stage2 = read_recipe(recipe).get("stage2")
        if not stage2:
            raise UserError(f"{recipe} has no stage2 section; name a stage-2 recipe (e.g. configs/cifar10_lt/if100/crt.yaml)")
        raw["stage2"] = stage2
    config = config_from_dict(apply_overrides(raw, overrides), f"{recorded} (+ stage 2 of {recipe or 'the run'})")
    if config.stage2 is None:
        raise UserError("no stage-2 method: give a stage-2 recipe or stage2.method=crt|lws|tau_norm|ncm|mislas|ladc")
    dist_info = distributed.init_distributed(config.device)
    try:
        out_dir = new_run_dir(run_dir, f"stage2_{config.stage2.method}") if dist_info.is_main else None
        out_dir = distributed.broadcast_object(out_dir)
        setup_text_log(out_dir, dist_info.is_main)
        if dist_info.is_main:
            (out_dir / "config.yaml").write_text(dump_config(config))
        run_stage2(config, run_dir, dist_info, out_dir)
        LOG.info(f"done: {out_dir}")
    finally:
        distributed.shutdown()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from longtail.engine.evaluator import evaluate_checkpoint
    out = evaluate_checkpoint(Path(args.run), checkpoint=args.checkpoint, split=args.split,
                              overrides=args.overrides)
    print(f"results in {out}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from longtail.calibration.runner import calibrate_run
    from longtail.config import parse_value
    params = {}
    for item in args.param:
        key, _, value = item.partition("=")
        params[key] = parse_value(value)
    out = calibrate_run(_run_dir_of(Path(args.run)), args.method, params, checkpoint=args.checkpoint)
    print(f"results in {out}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from longtail.engine.builders import build_bundle
    from longtail.engine.rundir import new_run_dir
    from longtail.functional import imbalance_factor, shot_groups
    from longtail.report.plots import class_histogram

    config_path, overrides = _split_config_and_overrides(args.items)
    config = load_config(config_path, overrides)
    bundle = build_bundle(config)
    counts = bundle.train_counts
    groups = shot_groups(counts)
    print(f"dataset {config.data.dataset}: {bundle.num_classes} classes, {sum(counts)} training images, "
          f"imbalance factor {imbalance_factor(counts):.1f}")
    print(f"  validation: {0 if bundle.val is None else len(bundle.val.targets)} images; "
          f"test: {len(bundle.test.targets)} images")
    print("  shot groups: " + ", ".join(f"{g} {len(c)} classes" for g, c in groups.items()))
    width = max(len(n) for n in bundle.class_names)
    for cls, (name, count) in enumerate(zip(bundle.class_names, counts)):
        if bundle.num_classes <= 30 or cls < 5 or cls >= bundle.num_classes - 5:
            print(f"  {cls:4d} {name:<{width}} {count:6d}")
        elif cls == 5:
            print("  ...")
    out_dir = new_run_dir(config.output_dir, f"{config.name}_data")
    path = class_histogram(counts, out_dir / "class_histogram.png",
                           title=f"{config.data.dataset}: {sum(counts)} images, IF {imbalance_factor(counts):.0f}")
    (out_dir / "class_counts.json").write_text(json.dumps(
        {"class_names": bundle.class_names, "train_counts": counts, "shot_groups": groups}, indent=2))
    print(f"histogram: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from longtail.registry import ALL, load_all
    load_all()
    for kind, registry in ALL.items():
        print(f"{kind}: {', '.join(registry.names()) or '(none)'}")
    configs = Path(__file__).resolve().parents[1] / "configs"
    if configs.is_dir():
        print("recipes: " + ", ".join(str(p.relative_to(configs)) for p in sorted(configs.rglob("*.yaml"))))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from longtail.engine.rundir import new_run_dir
    from longtail.report.compare import write_report
    out = Path(args.out) if args.out else new_run_dir("runs", "report")
    if args.out and out.exists() and any(out.iterdir()):
        raise UserError(f"{out} exists and is not empty; choose another --out (reports are never overwritten)")
    print(f"report: {write_report([Path(r) for r in args.runs], out)}")
    return 0


# --------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtail", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe (default: the offline Digits-LT example)")
    train.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                       help="a YAML recipe, then overrides such as optim.lr=0.05 data.imbalance_factor=50")
    train.add_argument("--resume", metavar="RUN_OR_CHECKPOINT", help="continue a run exactly where it stopped")
    train.add_argument("--print-json", action="store_true", help="print the final test metrics as JSON")
    train.set_defaults(func=cmd_train)

    stage2 = sub.add_parser("stage2", help="run a decoupled stage 2 on a finished stage-1 run")
    stage2.add_argument("run", metavar="RUN_DIR")
    stage2.add_argument("items", nargs="*", metavar="STAGE2_RECIPE|key=value",
                        help="a recipe whose stage2 section to use, then overrides such as stage2.epochs=10")
    stage2.set_defaults(func=cmd_stage2)

    evaluate = sub.add_parser("eval", help="evaluate a run directory or checkpoint")
    evaluate.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/new/place")
    evaluate.add_argument("--checkpoint", default="last", help="last, best, or a checkpoint file name")
    evaluate.add_argument("--split", default="test", choices=["test", "val"])
    evaluate.set_defaults(func=cmd_eval)

    calibrate = sub.add_parser("calibrate", help="fit a post-hoc calibrator on validation data")
    calibrate.add_argument("run", metavar="RUN_DIR")
    calibrate.add_argument("--method", default="ts", help="kt_ts, ts, ets, vs, hist, iso (see `longtail list`)")
    calibrate.add_argument("--param", action="append", default=[], metavar="key=value")
    calibrate.add_argument("--checkpoint", default="last")
    calibrate.set_defaults(func=cmd_calibrate)

    data = sub.add_parser("data", help="show a dataset's class counts and write a histogram")
    data.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    data.set_defaults(func=cmd_data)

    listing = sub.add_parser("list", help="registered datasets, models, losses, samplers, ...")
    listing.set_defaults(func=cmd_list)

    report = sub.add_parser("report", help="compare finished runs in a Markdown table and plot")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="output folder (default runs/report, numbered if it exists)")
    report.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from longtail.engine.checkpoint import CheckpointError
    from longtail.engine.trainer import NonFiniteLossError
    user_errors: tuple[type[BaseException], ...] = (ConfigError, UserError, CheckpointError, FileNotFoundError)
    try:
        from longtail.data import DataError
        user_errors = (*user_errors, DataError)
    except ImportError:
        pass
    try:
        return args.func(args)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    except user_errors as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

