"""``longtail eval``: evaluate a saved checkpoint with the config it was trained with."""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from longtail.commands.common import DATA_DEFINITION, UserError, as_trained, changed_keys
from longtail.commands.results import write_results
from longtail.config import Config, apply_overrides, config_from_dict, dump_config, load_config
from longtail.engine import builders
from longtail.engine.checkpoint import load_run_checkpoint
from longtail.engine.distributed import DistInfo, init_distributed
from longtail.engine.predict import predict
from longtail.engine.rundir import new_run_dir, write_output
from longtail.metrics import compute_metrics, summary

__all__ = ["cmd_eval", "evaluate_checkpoint", "evaluate_zero_shot", "resolve_checkpoint", "LoadedRun", "load_run", "split_of"]


def resolve_checkpoint(path: Path, checkpoint: str) -> tuple[Path, Path]:
    """(run directory, checkpoint file) from a run directory + name, or a checkpoint file."""
    if path.is_file():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, path
    file = path / "checkpoints" / (checkpoint if checkpoint.endswith(".pt") else f"{checkpoint}.pt")
    if not file.is_file():
        available = sorted(p.name for p in (path / "checkpoints").glob("*.pt"))
        raise FileNotFoundError(f"no checkpoint {file}; available in {path}: {', '.join(available) or 'none'}"
                                + (" ('best' exists only for runs with train.select=val or test)"
                                   if checkpoint == "best" else ""))
    return path, file


@dataclass
class LoadedRun:
    """A trained model with the config, data and evaluation transform it was trained with."""

    run_dir: Path
    file: Path
    state: dict[str, Any]
    config: Config
    bundle: Any
    model: torch.nn.Module
    augment: Any
    dist_info: DistInfo


def load_run(path: Path, checkpoint: str = "last", overrides: list[str] | None = None) -> LoadedRun:
    """The model of a run directory (or checkpoint file) on the run's device, in eval mode."""
    run_dir, file = resolve_checkpoint(path, checkpoint)
    dist_info = init_distributed("auto")
    state = load_run_checkpoint(file, map_location=dist_info.device)
    trained = as_trained(config_from_dict(state["config"], str(file)))
    config = as_trained(config_from_dict(apply_overrides(state["config"], list(overrides or [])),
                                         f"{file} (+ overrides)"))
    redefined = [key for key in changed_keys(trained.model_dump(mode="json"), config.model_dump(mode="json"))
                 if key in DATA_DEFINITION]
    if redefined:
        raise UserError(f"{', '.join(redefined)} would change which images the run was trained on, and so its "
                        "shot groups and any validation split (a split carved now can hold images the model was "
                        "trained on). Eval takes the run's data as it was trained; only where the data is "
                        "(data.root, the list files, data.cache_dir) and how it is read may change. "
                        "Train a new run to use other data settings")
    bundle = builders.build_bundle(config)
    model = builders.load_trained_model(config, bundle, state, dist_info.device).eval()
    return LoadedRun(run_dir, file, state, config, bundle, model, builders.build_augment(config, bundle), dist_info)


def split_of(run: LoadedRun, split: str) -> Any:
    """The run's ``split`` images; a run trained without a validation split has none to evaluate."""
    imageset = getattr(run.bundle, split)
    if imageset is None:
        raise UserError(f"the run has no {split} split: it was trained with data.val_fraction=0, so every training "
                        "image was seen and a split carved now would score training images. Use --split test, "
                        "or train again with data.val_fraction=0.2 to keep a validation split")
    return imageset


def evaluate_checkpoint(path: Path, checkpoint: str = "last", split: str = "test",
                        overrides: list[str] | None = None) -> Path:
    run = load_run(path, checkpoint, overrides)
    run_dir, file, state, config, bundle, dist_info = (run.run_dir, run.file, run.state, run.config, run.bundle,
                                                       run.dist_info)
    imageset = split_of(run, split)
    loader = builders.eval_loader(config, imageset, run.augment.normalize, dist_info)
    outputs = predict(builders.evaluation_model(config, run.model), loader, dist_info, len(imageset.targets), builders.amp_dtype(config, dist_info.device))
    metrics: dict[str, Any] = compute_metrics(outputs["logits"], outputs["targets"], bundle.train_counts,
                                              outputs.get("expert_logits"))
    out_dir = new_run_dir(run_dir / "evals", f"{file.stem}_{split}")
    write_results(out_dir, {"selection": "evaluated", "checkpoint": str(file),
                            "last": {"epoch": int(state["epoch"]) + 1, split: metrics}},
                  outputs, bundle.train_counts, metrics)
    write_output(out_dir / "summary.txt", summary(metrics) + "\n")
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
    normalize = builders.build_augment(config, bundle).normalize
    loader = builders.eval_loader(config, imageset, normalize, dist_info)
    outputs = predict(builders.evaluation_model(config, model), loader, dist_info, len(imageset.targets),
                      builders.amp_dtype(config, dist_info.device))
    metrics = compute_metrics(outputs["logits"], outputs["targets"], bundle.train_counts)
    out_dir = new_run_dir(Path(config.output_dir), f"{config.name}_zero_shot")
    write_output(out_dir / "config.yaml", dump_config(config))
    write_results(out_dir, {"selection": "zero-shot (nothing trained)", "last": {"epoch": 0, split: metrics}},
                  outputs, bundle.train_counts, metrics)
    print(summary(metrics))
    return out_dir


def cmd_eval(args: argparse.Namespace) -> int:
    if args.zero_shot:
        print(f"results in {evaluate_zero_shot(Path(args.run), args.overrides, args.split)}")
        return 0
    if args.shifts:
        from longtail.commands.shifts import evaluate_shifts  # it builds on load_run
        out = evaluate_shifts(load_run(Path(args.run), args.checkpoint, args.overrides), args.split)
    else:
        out = evaluate_checkpoint(Path(args.run), checkpoint=args.checkpoint, split=args.split,
                                  overrides=args.overrides)
    print(f"results in {out}")
    return 0
