"""``longtail eval``: evaluate a saved checkpoint with the config it was trained with."""
from __future__ import annotations

import argparse
from pathlib import Path

from longtail.commands.common import UserError
from longtail.commands.results import write_results
from longtail.commands.shifts import evaluate_shifts
from longtail.config import dump_config, load_config
from longtail.engine import builders
from longtail.engine.distributed import init_distributed
from longtail.engine.evaluation import evaluate
from longtail.engine.rundir import SUMMARY_FILE, config_file, evals_dir, new_run_dir, write_output
from longtail.metrics import summary
from longtail.runs import load_run, split_of

__all__ = ["cmd_eval", "evaluate_checkpoint", "evaluate_zero_shot"]


def evaluate_checkpoint(path: Path, checkpoint: str = "last", split: str = "test",
                        overrides: list[str] | None = None) -> Path:
    run = load_run(path, checkpoint, overrides)
    result = run.evaluate(split_of(run, split))
    metrics = result.metrics
    assert metrics is not None
    out_dir = new_run_dir(evals_dir(run.run_dir), f"{run.file.stem}_{split}")
    write_results(out_dir, {"selection": "evaluated", "checkpoint": str(run.file),
                            "last": {"epoch": int(run.state["epoch"]) + 1, split: metrics}},
                  result.outputs, run.bundle.train_counts, metrics)
    write_output(out_dir / SUMMARY_FILE, summary(metrics) + "\n")
    print(summary(metrics))
    return out_dir


def evaluate_zero_shot(recipe: Path, overrides: list[str], split: str = "test") -> Path:
    """CLIP's zero-shot classifier on a recipe's data, the baseline a fine-tuned foundation model is
    compared with: the recipe's open_clip model with ``head=zero_shot`` (its class-name prompts), nothing
    trained. Results land in ``output_dir/<name>_zero_shot[-N]``."""
    config = load_config(recipe, overrides)
    if config.model.name != "open_clip":
        raise UserError(f"--zero-shot needs a recipe with model.name=open_clip (CLIP's text tower gives the "
                        f"classifier); {recipe} has model.name={config.model.name}")
    config.model.params = {**config.model.params, "head": "zero_shot"}
    config.model.finetune, config.model.finetune_params = "linear", {}
    dist_info = init_distributed(config.device)
    bundle = builders.build_bundle(config)
    model = builders.build_model(config, bundle, dist_info.device).eval()
    imageset = getattr(bundle, split)
    if imageset is None:
        raise UserError(f"the recipe has no {split} split; use --split test")
    settings = builders.eval_settings(config, bundle, builders.precision(config, dist_info.device))
    result = evaluate(model, imageset, settings, dist_info, bundle.train_counts)
    metrics, outputs = result.metrics, result.outputs
    assert metrics is not None
    out_dir = new_run_dir(Path(config.output_dir), f"{config.name}_zero_shot")
    write_output(config_file(out_dir), dump_config(config))
    write_results(out_dir, {"selection": "zero-shot (nothing trained)", "last": {"epoch": 0, split: metrics}},
                  outputs, bundle.train_counts, metrics)
    print(summary(metrics))
    return out_dir


def cmd_eval(args: argparse.Namespace) -> int:
    if args.zero_shot:
        print(f"results in {evaluate_zero_shot(Path(args.run), args.overrides, args.split)}")
        return 0
    if args.shifts:
        out = evaluate_shifts(load_run(Path(args.run), args.checkpoint, args.overrides), args.split)
    else:
        out = evaluate_checkpoint(Path(args.run), checkpoint=args.checkpoint, split=args.split,
                                  overrides=args.overrides)
    print(f"results in {out}")
    return 0
