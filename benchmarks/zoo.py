"""The model zoo: trained weights kept in the repository, so a number can be checked in a minute.

    python benchmarks/zoo.py add RUN_DIR[/stage2_X] cifar100_lt_if100/ce --command "longtail study ..."
    python benchmarks/zoo.py verify            # every entry's sha256 and files
    python benchmarks/zoo.py table [--readme]  # the README table (--readme: written between its markers)

An entry is a run folder slimmed to what evaluation needs: ``checkpoints/last.pt`` with the model, its
config, its epoch and its stage-2 heads (no optimizer, scheduler, loss or RNG state: a ResNet-32 is
about 2 MB), the run's ``config.yaml`` and ``metrics.json``. It is a run folder like any other, so
``longtail eval``, ``predict``, ``export``, ``calibrate`` and ``stage2`` take it as they take a run
(their outputs land inside it and are ignored by git). ``zoo/zoo.json`` lists every entry with the
sha256 of its checkpoint, its recorded test numbers and the command that trained it; the golden-number
test (tests/test_zoo.py) re-scores each entry against them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from datetime import date
from pathlib import Path
from typing import Any, Sequence

from longtail.engine.checkpoint import load_run_checkpoint, save_checkpoint
from longtail.engine.rundir import CHECKPOINTS_DIR, CONFIG_FILE, ENV_FILE, LAST_CHECKPOINT, METRICS_FILE

ZOO = Path(__file__).resolve().parents[1] / "zoo"
MANIFEST = "zoo.json"
CHECKPOINT = Path(CHECKPOINTS_DIR) / LAST_CHECKPOINT
KEPT_STATE = ("epoch", "model", "config", "heads", "finished", "stage2")  # what evaluation and stage 2 read
KEPT_FILES = (CONFIG_FILE, METRICS_FILE)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(zoo: Path) -> dict[str, Any]:
    path = zoo / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {"entries": []}


def _test_metrics(run: Path) -> dict[str, Any]:
    results = json.loads((run / METRICS_FILE).read_text(encoding="utf-8"))
    test = results["last"]["test"]
    return {key: test.get(key) for key in ("top1", "many_top1", "medium_top1", "few_top1", "ece")}


def add(run: Path, name: str, command: str, zoo: Path = ZOO) -> dict[str, Any]:
    """Slim ``run`` (a run folder or a stage-2 folder of one) into ``zoo/name`` and list it in the
    manifest. An existing entry of that name is refused: remove it first, on purpose."""
    target = zoo / name
    if target.exists():
        raise FileExistsError(f"{target} exists; remove it (and its manifest entry) to replace it")
    state = load_run_checkpoint(run / CHECKPOINT)
    config = state["config"]
    slim = {key: state[key] for key in KEPT_STATE if key in state}
    save_checkpoint(slim, target / CHECKPOINT)
    for file in KEPT_FILES:
        source = run / file
        if file == CONFIG_FILE and not source.is_file():
            source = run.parent / file  # a recipe's own stage 2 (RUN/stage2) trains under the run's config.yaml
        shutil.copyfile(source, target / file)
    env = run / ENV_FILE if (run / ENV_FILE).is_file() else run.parent / ENV_FILE
    git = json.loads(env.read_text(encoding="utf-8")).get("git", {}) if env.is_file() else {}
    entry = {"name": name, "path": f"{name}/{CHECKPOINT.as_posix()}", "sha256": sha256(target / CHECKPOINT),
             "bytes": (target / CHECKPOINT).stat().st_size, "dataset": config["data"]["dataset"],
             "imbalance_factor": config["data"]["imbalance_factor"], "model": config["model"]["name"],
             "test": _test_metrics(run), "command": command, "commit": git.get("commit"),
             "added": date.today().isoformat()}
    manifest = read_manifest(zoo)
    manifest["entries"] = [e for e in manifest["entries"] if e["name"] != name] + [entry]
    (zoo / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return entry


def verify(zoo: Path = ZOO) -> list[str]:
    """The problems of the zoo: a listed checkpoint missing or with another sha256, a config or
    metrics file missing. Empty when every entry is intact."""
    problems = []
    for entry in read_manifest(zoo)["entries"]:
        path = zoo / entry["path"]
        if not path.is_file():
            problems.append(f"{entry['name']}: {path} is missing")
        elif sha256(path) != entry["sha256"]:
            problems.append(f"{entry['name']}: {path} has sha256 {sha256(path)}, the manifest says {entry['sha256']}")
        for file in KEPT_FILES:
            if not (zoo / entry["name"] / file).is_file():
                problems.append(f"{entry['name']}: {file} is missing")
    return problems


def table(zoo: Path = ZOO) -> str:
    """The README's zoo table: entry, data, model, recorded test top-1 / shot groups / ECE, size, sha256
    and the command that trained it."""
    lines = ["| entry | data | model | top-1 | many | medium | few | ECE | MB | sha256 (first 12) | trained by |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]

    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.2f}"

    for entry in read_manifest(zoo)["entries"]:
        test = entry["test"]
        lines.append(f"| `zoo/{entry['name']}` | {entry['dataset']} IF {entry['imbalance_factor']} | {entry['model']} | "
                     f"{pct(test['top1'])} | {pct(test['many_top1'])} | {pct(test['medium_top1'])} | "
                     f"{pct(test['few_top1'])} | {pct(test['ece'])} | {entry['bytes'] / 2**20:.1f} | "
                     f"`{entry['sha256'][:12]}` | `{entry['command'].replace('|', '&#124;')}` |")
    return "\n".join(lines)


README = ZOO.parent / "README.md"
TABLE_START, TABLE_END = "<!-- zoo table: python benchmarks/zoo.py table -->", "<!-- end of zoo table -->"


def write_readme_table(readme: Path = README, zoo: Path = ZOO) -> None:
    """Put ``table(zoo)`` between the README's zoo-table markers (the table is generated, never typed)."""
    text = readme.read_text(encoding="utf-8")
    if TABLE_START not in text or TABLE_END not in text:
        raise ValueError(f"{readme} lacks the markers {TABLE_START!r} and {TABLE_END!r} around its zoo table")
    head, rest = text.split(TABLE_START, 1)
    _, tail = rest.split(TABLE_END, 1)
    readme.write_text(f"{head}{TABLE_START}\n{table(zoo)}\n{TABLE_END}{tail}", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zoo", type=Path, default=ZOO, help="the zoo folder (default: the repository's zoo/)")
    sub = parser.add_subparsers(dest="action", required=True)
    adding = sub.add_parser("add", help="slim a finished run into the zoo")
    adding.add_argument("run", type=Path, help="a run folder, or a stage-2 folder of one")
    adding.add_argument("name", help="entry name, e.g. cifar100_lt_if100/ce")
    adding.add_argument("--command", required=True, help="the command that trained it (shown in the README)")
    sub.add_parser("verify", help="check every entry's sha256 and files")
    tabling = sub.add_parser("table", help="print the README table")
    tabling.add_argument("--readme", type=Path, nargs="?", const=README,
                         help="write it between the zoo-table markers of this README (default: the repository's)")
    args = parser.parse_args(argv)
    if args.action == "add":
        entry = add(args.run, args.name, args.command, args.zoo)
        print(f"added {entry['name']}: {entry['bytes'] / 2**20:.1f} MB, sha256 {entry['sha256']}")
    elif args.action == "verify":
        problems = verify(args.zoo)
        print("\n".join(problems) or f"{len(read_manifest(args.zoo)['entries'])} entries intact")
        return 1 if problems else 0
    elif args.readme:
        write_readme_table(args.readme, args.zoo)
        print(f"zoo table written into {args.readme}")
    else:
        print(table(args.zoo))
    return 0


if __name__ == "__main__":
    sys.exit(main())
