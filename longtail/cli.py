"""The ``longtail`` command: train, stage2, eval, calibrate, data, list, report, study.

This module only parses the command line; each command lives in ``longtail.commands``. Errors a
user can fix (bad config, missing data, corrupt image, unwritable or full disk) print one message
and exit 2, a NaN loss exits 3, Ctrl-C exits 130; none prints a traceback unless ``--debug`` is given.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from longtail.registry import ConfigError


def _command(module: str, name: str) -> Callable[[argparse.Namespace], int]:
    """The command ``name`` of ``longtail.commands.<module>``, imported when it runs (so ``--help``
    does not load torch)."""
    def run(args: argparse.Namespace) -> int:
        import importlib
        return getattr(importlib.import_module(f"longtail.commands.{module}"), name)(args)
    return run


# --------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longtail", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a recipe (default: the offline Digits-LT example)")
    train.add_argument("items", nargs="*", metavar="CONFIG|key=value",
                       help="a YAML recipe, then overrides such as optim.lr=0.05 data.imbalance_factor=50")
    train.add_argument("--resume", metavar="RUN_OR_CHECKPOINT", help="continue a run exactly where it stopped")
    train.add_argument("--start-from", metavar="CHECKPOINT",
                       help="a new run that begins at another run's kept checkpoint (RUN/checkpoints/epoch<k>.pt, "
                            "train.keep_epochs): for readings that differ only after epoch k, e.g. an lr decay")
    train.add_argument("--print-json", action="store_true", help="print the final test metrics as JSON")
    train.set_defaults(func=_command("train", "cmd_train"))

    stage2 = sub.add_parser("stage2", help="run a decoupled stage 2 on a finished stage-1 run")
    stage2.add_argument("run", metavar="RUN_DIR", help="the stage-1 run (with --resume: the stage-2 folder)")
    stage2.add_argument("items", nargs="*", metavar="STAGE2_RECIPE|key=value",
                        help="a recipe whose stage2 section to use, then overrides such as stage2.epochs=10")
    stage2.add_argument("--resume", action="store_true",
                        help="continue the stopped stage 2 in RUN_DIR (a RUN/stage2_<method> folder)")
    stage2.add_argument("--allow-incomplete", action="store_true",
                        help="run stage 2 on a stage 1 that has not finished (its last intermediate checkpoint)")
    stage2.add_argument("--name", metavar="NAME",
                        help="land in RUN/stage2_NAME instead of RUN/stage2_<method>, e.g. crt-cached beside crt")
    stage2.set_defaults(func=_command("stage2", "cmd_stage2"))

    evaluate = sub.add_parser("eval", help="evaluate a run directory or checkpoint")
    evaluate.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT", help="(with --zero-shot: a recipe)")
    evaluate.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. data.root=/new/place")
    evaluate.add_argument("--checkpoint", default="last", help="last, best, or a checkpoint file name")
    evaluate.add_argument("--split", default="test", choices=["test", "val"])
    evaluate.add_argument("--shifts", action="store_true",
                          help="also on forward/backward-LT test sets, with prior correction (recipe section shifts:)")
    evaluate.add_argument("--zero-shot", action="store_true",
                          help="RUN is a recipe with model.name=open_clip: score CLIP's zero-shot classifier on its data")
    evaluate.set_defaults(func=_command("evaluate", "cmd_eval"))

    calibrate = sub.add_parser("calibrate", help="fit a post-hoc calibrator on validation data")
    calibrate.add_argument("run", metavar="RUN_DIR")
    calibrate.add_argument("--method", default="ts",
                           help="kt_ts, ts, ets, vs, hist, iso, ts_ir, ir_pooled, sbc, gpc (see `longtail list`)")
    calibrate.add_argument("--param", action="append", default=[], metavar="key=value")
    calibrate.add_argument("--checkpoint", default="last")
    calibrate.set_defaults(func=_command("calibrate", "cmd_calibrate"))

    pred = sub.add_parser("predict", help="top-k classes of a trained run on new image files")
    pred.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    pred.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or list files")
    pred.add_argument("--out", help="a .csv or .jsonl file, never replaced without --force (default "
                                     "predictions.csv, numbered predictions-1.csv ... if it exists)")
    pred.add_argument("--force", action="store_true", help="replace an existing --out file")
    pred.add_argument("--top-k", type=int, default=5)
    pred.add_argument("--calibrated", action="store_true", help="apply the run's last fitted calibrator")
    pred.add_argument("--calibrator", metavar="NAME", help="apply RUN/calibration/NAME (implies --calibrated)")
    pred.add_argument("--checkpoint", default="last")
    pred.add_argument("--workers", type=int, help="decoding processes (default: the run's data.num_workers)")
    pred.set_defaults(func=_command("predict", "cmd_predict"))

    export = sub.add_parser("export", help="a trained run as one TorchScript or ONNX file")
    export.add_argument("run", metavar="RUN_DIR_OR_CHECKPOINT")
    export.add_argument("--format", required=True, choices=["torchscript", "onnx"])
    export.add_argument("--out", help="output file ending .pt (torchscript) or .onnx, never replaced without "
                                       "--force (default RUN/export/model[_CALIBRATOR].pt|.onnx, numbered if it exists)")
    export.add_argument("--force", action="store_true", help="replace an existing --out file")
    export.add_argument("--calibrated", action="store_true",
                        help="fold the last fitted calibrator into the logits (ts, kt_ts, vs; others are refused)")
    export.add_argument("--calibrator", metavar="NAME", help="fold RUN/calibration/NAME (implies --calibrated)")
    export.add_argument("--checkpoint", default="last")
    export.set_defaults(func=_command("export", "cmd_export"))

    data = sub.add_parser("data", help="show a dataset's class counts and write a histogram")
    data.add_argument("items", nargs="*", metavar="CONFIG|key=value")
    data.set_defaults(func=_command("inspect", "cmd_data"))

    listing = sub.add_parser("list", help="registered datasets, models, losses, samplers, ...")
    listing.set_defaults(func=_command("inspect", "cmd_list"))

    report = sub.add_parser("report", help="compare finished runs or studies: report.md and report.html")
    report.add_argument("runs", nargs="+", metavar="RUN_DIR|STUDY_DIR")
    report.add_argument("--out", help="output folder (default runs/report, numbered if it exists)")
    report.add_argument("--papers", metavar="YAML", help="published numbers to show beside matching settings "
                                                          "(default $LONGTAIL_PAPER_NUMBERS, else the source "
                                                          "checkout's benchmarks/paper_numbers.yaml)")
    report.add_argument("--split", choices=("test", "val"), default="test",
                        help="which split's metrics (val: to choose between recipes without the test set)")
    report.add_argument("--baseline", action="append", default=[], metavar="GROUP",
                        help="compare only against this group (e.g. ce, or 'ce · crt'); repeatable. "
                             "Default: every pair")
    report.set_defaults(func=_command("inspect", "cmd_report"))

    study = sub.add_parser("study", help="run many recipes x seeds from a study file, resumably")
    study.add_argument("study", metavar="STUDY.yaml", help="e.g. configs/studies/tiny_digits.yaml")
    study.add_argument("--out", help="study folder (default: the file's output_dir/name)")
    study.add_argument("--print-commands", action="store_true",
                       help="print the torchrun command lines of the unfinished runs instead of running them")
    study.add_argument("--recipes", metavar="NAME[,NAME]",
                       help="train (or print) only these recipes' runs, in the study's order; the others are left "
                            "to other processes or a later call (e.g. to let one recipe go first on a free core)")
    study.add_argument("--max-runs", type=int, metavar="N",
                       help="train at most N runs, then stop (rerun to continue); 0 only records the runs "
                            "whose steps all finished elsewhere (after --print-commands)")
    carry = study.add_mutually_exclusive_group()
    carry.add_argument("--pack", metavar="FILE.tar.gz",
                       help="write what the study needs to continue on another machine (records, and the "
                            "checkpoints of unfinished runs) to FILE, then stop; the runs must not be training")
    carry.add_argument("--unpack", metavar="FILE.tar.gz",
                       help="put a --pack file into the study folder (never over a file that differs), then stop; "
                            "run the study again to continue it")
    carry.add_argument("--status", action="store_true",
                       help="print where each run stands (finished; the step and epoch it is at, its pace and "
                            "time left, who runs it; not started), then stop; changes nothing")
    study.set_defaults(func=_command("study", "cmd_study"), run_command=lambda argv: main(argv))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from longtail.commands.common import UserError
    from longtail.data import DataError
    from longtail.engine.checkpoint import CheckpointError
    from longtail.engine.rundir import RunDirError
    from longtail.engine.trainer import NonFiniteLossError
    user_errors: tuple[type[BaseException], ...] = (ConfigError, UserError, CheckpointError, FileNotFoundError,
                                                    DataError, RunDirError)
    try:
        return args.func(args)
    except (NonFiniteLossError, *user_errors, OSError, KeyboardInterrupt) as error:
        if args.debug:
            raise
        if isinstance(error, KeyboardInterrupt):
            print("interrupted", file=sys.stderr)
            return 130
        if isinstance(error, NonFiniteLossError):
            print(f"error: {error}", file=sys.stderr)
            return 3
        if isinstance(error, OSError) and not isinstance(error, FileNotFoundError):
            print(f"error: {_os_error(error)}", file=sys.stderr)
        else:
            print(f"error: {error}", file=sys.stderr)
        return 2


def _os_error(error: OSError) -> str:
    """A file-system failure (read-only folder, full disk, permissions) as what failed and what to do."""
    where = f" {error.filename}" if error.filename else ""
    return (f"cannot write or read{where}: {error.strerror or error}. Check that the folder exists, is writable "
            "and has free space (output_dir for runs, data.cache_dir or $LONGTAIL_CACHE for caches)")
