"""``longtail data`` (a dataset's class counts and histogram), ``longtail list`` (what is registered)
and ``longtail report`` (compare finished runs)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from longtail.commands.common import UserError, split_config_and_overrides
from longtail.config import load_config
from longtail.engine.builders import build_bundle
from longtail.engine.rundir import new_run_dir, write_output
from longtail.functional import imbalance_factor, shot_groups
from longtail.registry import ALL, load_all
from longtail.report.compare import write_report
from longtail.report.plots import class_histogram

__all__ = ["cmd_data", "cmd_list", "cmd_report"]


def cmd_data(args: argparse.Namespace) -> int:
    config_path, overrides = split_config_and_overrides(args.items)
    config = load_config(config_path, overrides)
    bundle = build_bundle(config)
    counts = bundle.train_counts
    groups = shot_groups(counts)
    print(f"dataset {config.data.dataset}: {bundle.num_classes} classes, {sum(counts)} training images, "
          f"imbalance factor {imbalance_factor(counts):.1f}")
    print(f"  validation: {0 if bundle.val is None else len(bundle.val.targets)} images; "
          f"test: {len(bundle.test.targets)} images; images {bundle.channels}x{bundle.image_size}x{bundle.image_size}"
          + (f" ({bundle.image_size_note})" if bundle.image_size_note else ""))
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
    write_output(out_dir / "class_counts.json", json.dumps(
        {"class_names": bundle.class_names, "train_counts": counts, "shot_groups": groups}, indent=2))
    print(f"histogram: {path}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    load_all()
    for kind, registry in ALL.items():
        print(f"{kind}: {', '.join(registry.names()) or '(none)'}")
    configs = Path(__file__).resolve().parents[2] / "configs"
    if configs.is_dir():
        files = [p.relative_to(configs) for p in sorted(configs.rglob("*.yaml"))]
        print("recipes: " + ", ".join(str(p) for p in files if p.parts[0] != "studies"))
        print("studies (longtail study): " + ", ".join(str(p) for p in files if p.parts[0] == "studies"))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else new_run_dir("runs", "report")
    if args.out and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not an empty folder; choose another --out (reports are never "
                        "overwritten)")
    try:
        report = write_report([Path(r) for r in args.runs], out, papers=args.papers, baselines=args.baseline,
                              split=args.split)
    except (ValueError, FileNotFoundError) as error:
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # nothing was written: leave no empty report folder behind
        raise UserError(str(error)) from None
    print(f"report: {report}, {report.with_suffix('.html')} and {report.with_suffix('.json')} (a record per row)")
    return 0
