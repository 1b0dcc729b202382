"""The command line the diagnosis scripts share (``ikl_diagnosis.py``, ``bbn_diagnosis.py``): run a
diagnosis on each run folder given, print one JSON document that says which command, commit, machine
and date made it, and write it with ``--json``."""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import subprocess
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]


def run_diagnosis(script: str, description: str, diagnose: Callable[..., dict[str, Any]],
                  options: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
    """``python benchmarks/<script> RUN [RUN ...] [OPTIONS] [--json FILE]``: ``diagnose(run, **options)``
    on each run, one thread (these machines run one torch process at a time beside the studies).
    ``options``: (flag, ``add_argument`` keywords) pairs, e.g. ``("--epoch", {"type": int, "default": 0})``."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    for flag, spec in options:
        parser.add_argument(flag, **spec)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    extra = {dest: getattr(args, dest) for dest in (flag.lstrip("-").replace("-", "_") for flag, _ in options)}
    results = [diagnose(path, **extra) for path in args.runs]
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    flags = "".join(f" --{name.replace('_', '-')} {value}" for name, value in extra.items())
    document = {"command": f"python benchmarks/{script} " + " ".join(str(p) for p in args.runs) + flags,
                "date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
                "commit": commit, "runs": results}
    text = json.dumps(document, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
