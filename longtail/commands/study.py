"""``longtail study STUDY.yaml``: many runs from one file, so methods are compared over seeds.

A study is a list of recipes (each a config with overrides, optional ``longtail stage2`` steps on its
stage-1 run and ``longtail calibrate`` steps on its final model), a list of training seeds and of
long-tailed subsets (``data.selection_seed``), and optionally a grid over config keys. Every run lands
in ``STUDY_DIR/<cell>/seed<k>/`` (``<cell>`` = recipe plus grid values) and is done when its
``study_run.json`` marker exists; a rerun skips finished runs, ``--resume``s a stopped one and
continues a stopped stage 2. ``--print-commands`` prints the ``torchrun`` lines of the runs left, to
spread them over machines (rerunning the study afterwards only writes the markers).

Several processes may work on one study at once: a process claims a run (the ``flock`` of
``STUDY/.claims/<cell>/seed<k>.claim``, released by the kernel when the process ends however it ends)
before it looks into, clears or trains the run, and skips runs another live process holds, so each
run is trained exactly once. The signature of what a run was started as is kept beside the claim
(``seed<k>.started``), so a stopped run whose recipe was edited since is refused like a finished one.

A recipe with ``start_from: {recipe, epoch}`` begins each run at the same seed's run of an earlier
recipe, from the checkpoint that run keeps at the end of ``epoch`` (``longtail train --start-from``).
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from tqdm import tqdm

from longtail.commands.common import UserError
from longtail.commands.study_carry import pack_study, unpack_study
from longtail.commands.study_status import study_status
from longtail.config import (Config, Section, apply_overrides, check_epochs, check_folder_name, config_from_dict,
                             format_validation_error, load_config, read_recipe)
from longtail.engine.rundir import (STUDY_MARKER, calibration_dir, config_file, is_finished, kept_checkpoint,
                                    last_checkpoint, lock_holder, recipe_stage2_dir, release, stage2_dir_name)
from longtail.engine.rundir import study_file as study_record  # study_file names the study's YAML below
from longtail.engine.rundir import study_marker, try_claim, write_output
from longtail.registry import CALIBRATORS, ConfigError, load_all

__all__ = ["Study", "StudyRun", "load_study", "plan_runs", "run_study", "cmd_study", "MARKER"]

MARKER = STUDY_MARKER  # the name tests and older code know it by



class Stage2Step(Section):
    """``longtail stage2 RUN [recipe] [overrides]`` on the recipe's stage-1 run."""

    recipe: str | None = Field(None, description="a recipe whose stage2 section to use (relative to the study file)")
    overrides: list[str] = Field(default_factory=list, description="e.g. stage2.method=crt stage2.epochs=10")
    name: str | None = Field(None, description="its folder RUN/stage2_<name> and its label in the report (default: "
                                               "the method); needed when two steps run the same method")

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str | None) -> str | None:
        return value if value is None else check_folder_name(value, "a stage2 step name")


class CalibrateStep(Section):
    """``longtail calibrate`` on the recipe's final model (its own stage 2 when it has one)."""

    method: str
    params: dict[str, Any] = Field(default_factory=dict)


class StartFrom(Section):
    """Begin each run at the same seed's (and grid cell's) run of an earlier recipe, at the end of ``epoch``
    (``longtail train --start-from``): for a reading that differs from it only after that epoch."""

    recipe: str = Field(description="an earlier recipe of the study; it keeps that epoch's checkpoint for this one")
    epoch: int = Field(ge=1, description="the epochs taken over from it (1-based: its checkpoint at that epoch's end)")


class StudyRecipe(Section):
    name: str = Field(description="folder name of the recipe's cells; also its row in the report")
    config: str = Field(description="the recipe YAML, relative to the study file")
    overrides: list[str] = Field(default_factory=list)
    start_from: StartFrom | None = None
    stage2: list[Stage2Step] = Field(default_factory=list)
    calibrate: list[CalibrateStep] = Field(default_factory=list)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        return check_folder_name(value, "a recipe name")


class Study(Section):
    name: str
    output_dir: str = Field("runs/studies", description="the study goes to output_dir/name (relative to the "
                                                        "current folder)")
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="training seeds (`seed`)")
    selection_seeds: list[int] = Field(default_factory=lambda: [0], min_length=1,
                                       description="long-tailed subsets (`data.selection_seed`)")
    overrides: list[str] = Field(default_factory=list, description="applied to every recipe, before its own")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="key: [values]; every combination")
    recipes: list[StudyRecipe] = Field(min_length=1)

    @field_validator("name")
    @classmethod
    def _folder_name(cls, value: str) -> str:
        return check_folder_name(value, "the study name (its folder in output_dir)")

    @model_validator(mode="after")
    def _distinct(self) -> "Study":
        names = [r.name for r in self.recipes]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"recipe names must be distinct (they are folder names): {', '.join(twice)}")
        for label, values in (("seeds", self.seeds), ("selection_seeds", self.selection_seeds)):
            if len(set(values)) != len(values):
                raise ValueError(f"{label} repeat a value: {values}")
        empty = [key for key, values in self.grid.items() if not values]
        if empty:
            raise ValueError(f"grid keys without values: {', '.join(empty)}")
        for index, recipe in enumerate(self.recipes):
            if recipe.start_from is not None and recipe.start_from.recipe not in names[:index]:
                raise ValueError(f"recipe {recipe.name}: start_from.recipe {recipe.start_from.recipe!r} must name a "
                                 f"recipe listed before it (listed: {', '.join(names[:index]) or 'none'})")
        last = [key.split(".")[-1] for key in self.grid]
        if len(set(last)) != len(last):  # cell folders are named by the last part of each key
            raise ValueError(f"grid keys must end differently (cell folders use the last part): {list(self.grid)}")
        return self


@dataclass
class Step:
    """One command of a run: its argv (after ``longtail``), where its results land, how to resume it."""

    argv: list[str]
    output: Path
    resume_argv: list[str] | None = None
    can_resume: Callable[[], bool] = lambda: False
    config: Config | None = None  # the training step's resolved config

    def done(self) -> bool:
        return is_finished(self.output)


@dataclass
class StudyRun:
    cell: str
    recipe: str
    grid: dict[str, Any]
    seed: int
    selection_seed: int
    run_dir: Path
    steps: list[Step] = field(default_factory=list)
    signature: str = ""  # what the run is (config and steps, not where it lives); kept in its marker
    steps_signature: str = ""  # its stage-2 and calibration steps alone (see ``unchanged``)
    start: tuple[Path, Path] | None = None  # (the run it starts from, that run's kept checkpoint) for start_from

    @property
    def finished(self) -> bool:
        return (self.run_dir / MARKER).is_file()

    @property
    def claim_file(self) -> Path:
        """Held (``flock``) by the process working on the run: ``STUDY/.claims/<cell>/<folder>.claim``,
        outside the run folder, so clearing the folder keeps the claim."""
        return self.run_dir.parent.parent / ".claims" / self.cell / f"{self.run_dir.name}.claim"

    @property
    def started_file(self) -> Path:
        """The signature the run was started with (written before its first step runs)."""
        return self.claim_file.with_suffix(".started")

    def has_progress(self) -> bool:
        """Whether any step of the run left something a rerun would keep (results or a checkpoint)."""
        return any(step.done() or step.can_resume() for step in self.steps)

    def _recorded(self) -> tuple[str | None, str | None]:
        """What the run was made as, (signature, steps signature): its marker's when finished, else (when it
        has progress to resume) the ones it was started with; None where not recorded or nothing to keep."""
        if self.finished:
            marker = json.loads((self.run_dir / MARKER).read_text())
            return marker.get("signature"), marker.get("steps_signature")
        if not self.has_progress():
            return None, None
        if self.started_file.is_file():
            lines = self.started_file.read_text().split()
            return (lines[0] if lines else None), (lines[1] if len(lines) > 1 else None)
        return self._config_signature(), None

    def unchanged(self) -> bool:
        """Whether the run (finished, or stopped with progress) is what the study file plans now.

        The exact signature first. Failing that (the signature digests the whole resolved config, so a
        longtail version that only adds settings changes it), the run's recorded config.yaml re-read by
        this version, where a setting it lacks takes its default, must equal the planned config, and its
        recorded stage-2 and calibration steps the planned ones: a run made before a new setting
        existed is reused exactly when the new setting's value is the default it was made with. Markers
        written before steps signatures were kept (December 2026) have only the exact comparison."""
        signature, steps_signature = self._recorded()
        if signature in (None, self.signature):
            return True
        if steps_signature != self.steps_signature:
            return False
        return self._config_signature() == self.signature

    def _config_signature(self) -> str | None:
        """A run started outside the study (e.g. from --print-commands): compare its recorded config.
        Stop points are left out: the study resumes past them."""
        recorded = config_file(self.run_dir)
        if not recorded.is_file() or self.steps[0].config is None:
            return None
        planned = self.steps[0].config.model_copy(deep=True)
        try:
            found = load_config(recorded, [f"output_dir={planned.output_dir}", f"name={planned.name}"],
                                check_epochs=False)
        except ConfigError:
            return "unreadable"
        for config in (planned, found):
            config.train.stop_at_epoch = None
            config.train.keep_epochs = []  # bookkeeping: which checkpoints a later start_from needs
            if config.stage2 is not None:
                config.stage2.stop_at_epoch = None
        return self.signature if found == planned else "different config"


def load_study(path: str | Path) -> Study:
    """The study file, validated like a recipe (an unknown key names the allowed ones)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"study file {path} does not exist; see configs/studies/ for examples")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"study file {path} must hold a mapping (name, seeds, recipes, ...)")
    try:
        return Study.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, str(path), Study)) from None


def _shown(path: Path) -> Path:
    """``path`` normalised, relative to the current folder when it is inside it (printed commands stay short)."""
    path = Path(os.path.normpath(path.absolute()))
    return path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path


def _value_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _stage2_method(step: Stage2Step, base: Path, recipe_config: Config) -> str:
    """The method a ``longtail stage2`` step will run, resolved as that command resolves it (the run's
    config, the step recipe's stage2 section, the overrides), so a bad stage-2 key fails here."""
    raw = recipe_config.model_dump(mode="json")
    if step.recipe is not None:
        raw["stage2"] = read_recipe(base / step.recipe).get("stage2")
        if not raw["stage2"]:
            raise ConfigError(f"stage2 step {step.recipe} has no stage2 section; name a stage-2 recipe "
                              "(e.g. configs/cifar10_lt/if100/crt.yaml)")
    config = config_from_dict(apply_overrides(raw, step.overrides), f"stage2 step {step.recipe or step.overrides}")
    if config.stage2 is None:
        raise ConfigError("a stage2 step needs a recipe with a stage2 section or stage2.method=NAME in its overrides")
    check_epochs(config, ("stage2",), can_scale=False)
    return config.stage2.method


def plan_runs(study: Study, study_file: Path, study_dir: Path) -> list[StudyRun]:
    """Every run of the study with its steps; each run's config is built here, so a bad key fails
    before anything trains."""
    base = _shown(study_file.parent)
    keys = list(study.grid)
    kept: dict[str, list[int]] = {}  # recipe -> the epochs later recipes start from
    for recipe in study.recipes:
        if recipe.start_from is not None:
            kept.setdefault(recipe.start_from.recipe, []).append(recipe.start_from.epoch)
    runs = []
    # seed-major: a study cut short has every recipe on the first seeds rather than some recipes on all
    for selection_seed in study.selection_seeds:
        for seed in study.seeds:
            folder = f"seed{seed}" + (f"-sel{selection_seed}" if len(study.selection_seeds) > 1 else "")
            for recipe in study.recipes:
                config_path = _shown(base / recipe.config)
                for values in itertools.product(*(study.grid[k] for k in keys)):
                    grid = dict(zip(keys, values))
                    cell = "__".join([recipe.name, *(f"{k.split('.')[-1]}={_value_text(v)}" for k, v in grid.items())])
                    grid_items = [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in grid.items()]
                    keep = [f"train.keep_epochs={json.dumps(sorted(set(kept[recipe.name])))}"] if recipe.name in kept else []
                    overrides = [*study.overrides, *recipe.overrides, *grid_items, *keep,
                                 f"seed={seed}", f"data.selection_seed={selection_seed}",
                                 f"output_dir={study_dir / cell}", f"name={folder}"]
                    config = load_config(config_path, overrides)
                    run = StudyRun(cell, recipe.name, grid, seed, selection_seed, study_dir / cell / folder)
                    if recipe.start_from is not None:
                        source_cell = "__".join([recipe.start_from.recipe, *cell.split("__")[1:]])
                        source = study_dir / source_cell / folder
                        run.start = (source, kept_checkpoint(source, recipe.start_from.epoch))
                    run.steps = _steps(recipe, config_path, overrides, config, run.run_dir, base, run.start, keep)
                    run.signature = _signature(config, recipe)
                    run.steps_signature = _steps_signature(recipe)
                    runs.append(run)
    return runs


def _steps(recipe: StudyRecipe, config_path: Path, overrides: list[str], config: Config, run_dir: Path,
           base: Path, start: tuple[Path, Path] | None = None, keep: list[str] | None = None) -> list[Step]:
    final = recipe_stage2_dir(run_dir) if config.stage2 is not None else run_dir
    start_argv = ["--start-from", str(start[1])] if start is not None else []
    # a source stopped before a later recipe asked for its checkpoints keeps them from its resume on
    train = Step(["train", str(config_path), *overrides, *start_argv], final,
                 resume_argv=["train", "--resume", str(run_dir), *(keep or [])],
                 can_resume=lambda: last_checkpoint(run_dir).is_file(), config=config)
    steps = [train]
    names = [step.name or _stage2_method(step, base, config) for step in recipe.stage2]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"recipe {recipe.name}: two stage2 steps land in the same folder (stage2_{twice[0]}); "
                          "give the second a `name:` of its own (e.g. crt-cached)")
    for step, name in zip(recipe.stage2, names):
        out = run_dir / stage2_dir_name(name)
        argv = ["stage2", str(run_dir), *([str(_shown(base / step.recipe))] if step.recipe else []), *step.overrides,
                *(["--name", step.name] if step.name else [])]
        steps.append(Step(argv, out, resume_argv=["stage2", "--resume", str(out)],
                          can_resume=lambda out=out: last_checkpoint(out).is_file()))
    load_all()
    for calibration in recipe.calibrate:  # a bad method or parameter fails here, before anything trains
        CALIBRATORS.build(calibration.method, calibration.params,
                          where=f"study recipe {recipe.name}: calibrate {calibration.method} params")
        params = [item for key, value in calibration.params.items()
                  for item in ("--param", f"{key}={json.dumps(value)}")]
        steps.append(Step(["calibrate", str(final), "--method", calibration.method, *params],
                          calibration_dir(final) / calibration.method))
    return steps


def _digest(described: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()[:16]


def _steps_described(recipe: StudyRecipe) -> dict[str, Any]:
    return {"stage2": [step.model_dump() for step in recipe.stage2],
            "calibrate": [step.model_dump() for step in recipe.calibrate]}


def _signature(config: Config, recipe: StudyRecipe) -> str:
    """A digest of the resolved config (less output_dir, name and the kept checkpoints, which change no
    result), where the run starts from, and the recipe's stage-2 and calibration steps: a finished run
    whose recipe was edited since is not silently reused."""
    start = {"start_from": recipe.start_from.model_dump()} if recipe.start_from is not None else {}
    return _digest({"config": config.model_dump(mode="json", exclude={"output_dir": True, "name": True,
                                                                        "train": {"keep_epochs"}}),
                    **start, **_steps_described(recipe)})


def _steps_signature(recipe: StudyRecipe) -> str:
    """A digest of the recipe's stage-2 and calibration steps alone (the config is compared as a config)."""
    return _digest(_steps_described(recipe))


def check_unchanged(runs: list[StudyRun]) -> None:
    """Finished and stopped runs must still be what the study file describes (a stopped run would
    resume with its old settings); else name them and the way out."""
    changed = [run for run in runs if not run.unchanged()]
    if changed:
        stopped = sum(not run.finished for run in changed)
        raise UserError(f"{len(changed)} finished or stopped runs ({stopped} stopped) were made from a different "
                        f"version of their recipe (first: {changed[0].run_dir}); give the study a new name (or "
                        "--out) to rerun them, or restore the file")


def _next_command(step: Step) -> list[str] | None:
    """What runs ``step`` from where it stands: nothing when done, ``--resume`` when it has a checkpoint."""
    if step.done():
        return None
    if step.resume_argv is not None and step.can_resume():
        return step.resume_argv
    return step.argv


def _clear_unresumable(step: Step, run_dir: Path) -> None:
    """A step that died before its first checkpoint left a folder a fresh start would not reuse
    (``new_run_dir`` numbers it instead): remove it, it holds no results."""
    folder = run_dir if step.argv[0] == "train" else step.output
    if folder.exists() and not step.can_resume():
        shutil.rmtree(folder)


def _mark_finished(run: StudyRun, study: Study) -> None:
    record = {"study": study.name, "cell": run.cell, "recipe": run.recipe, "grid": run.grid, "seed": run.seed,
              "selection_seed": run.selection_seed, "signature": run.signature,
              "steps_signature": run.steps_signature, "steps": [step.argv for step in run.steps],
              "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    write_output(study_marker(run.run_dir), json.dumps(record, indent=2), exist="replace")


class StudyInterrupted(Exception):
    """Ctrl-C while a step ran: the study stops with exit 130 and says how to continue."""


def _busy(run: StudyRun) -> str | None:
    """Who holds the run or one of its step folders (e.g. a `longtail train` started by hand or from
    --print-commands), or None."""
    folders = [run.run_dir, *(step.output for step in run.steps[1:])]
    return next((holder for holder in (lock_holder(folder / ".lock") for folder in folders) if holder), None)


def run_study(study: Study, runs: list[StudyRun], execute: Callable[[list[str]], int],
              max_runs: int | None = None, resume_hint: str = "rerun the study") -> tuple[int, list[str]]:
    """Run what is left of ``runs`` one after another with ``execute(argv)``: (how many this process ran,
    the runs it skipped because another live process holds them). Each run is claimed before it is
    looked at, so processes sharing the study never train one run twice. Progress over the whole
    study (runs done / total, ETA) on stderr."""
    done = sum(run.finished for run in runs)
    ran = 0
    held: list[str] = []
    with tqdm(total=len(runs), initial=done, desc=f"study {study.name}", unit="run", file=sys.stderr,
              dynamic_ncols=True) as bar:
        for run in runs:
            if run.finished or (max_runs is not None and ran >= max_runs and not run.has_progress()):
                continue
            claim = try_claim(run.claim_file)
            if claim is None:
                held.append(f"{run.run_dir} (claimed by {lock_holder(run.claim_file) or 'another process'})")
                continue
            try:
                if run.finished:  # another process finished it between our look and our claim
                    continue
                holder = _busy(run)
                if holder is not None:
                    held.append(f"{run.run_dir} (in use by {holder})")
                    continue
                if all(step.done() for step in run.steps):  # ran elsewhere (--print-commands): only record it
                    _mark_finished(run, study)
                    bar.update(1)
                    continue
                if max_runs is not None and ran >= max_runs:
                    continue
                if not run.unchanged():  # edited since check_unchanged
                    raise UserError(f"{run.run_dir} was started from a different version of its recipe; give the "
                                    "study a new name (or --out) to rerun it, or restore the file")
                waits = _waits_for_start(run)
                if waits is not None:
                    held.append(f"{run.run_dir} ({waits})")
                    continue
                if not run.has_progress():
                    write_output(run.started_file, f"{run.signature}\n{run.steps_signature}\n", exist="replace")
                bar.set_postfix_str(f"{run.cell}/{run.run_dir.name}")
                _run_steps(run, execute, resume_hint)
                _mark_finished(run, study)
                ran += 1
                bar.update(1)
            finally:
                release(claim)
    return ran, held


def _waits_for_start(run: StudyRun) -> str | None:
    """Why a run with ``start_from`` cannot begin yet (its source has not kept the checkpoint), or None."""
    if run.start is None or run.has_progress():
        return None
    source, checkpoint = run.start
    if checkpoint.is_file():
        return None
    if (source / MARKER).is_file():
        raise UserError(f"{run.run_dir} starts from {checkpoint}, which {source} did not keep: it was trained before "
                        "the start was planned. Give the study a new name (or --out) to train both again, or drop "
                        "the recipe's start_from to train it from the first epoch")
    return f"waits for {source} to keep {checkpoint.name}; rerun the study when it has"


def _run_steps(run: StudyRun, execute: Callable[[list[str]], int], resume_hint: str) -> None:
    for step in run.steps:
        command = _next_command(step)
        if command is None:
            continue
        if command is step.argv:
            _clear_unresumable(step, run.run_dir)
        code = execute(command)
        if code == 130:
            raise StudyInterrupted(f"interrupted in {run.run_dir}; every checkpoint written is complete. "
                                   f"Continue with:\n  {resume_hint}")
        if code != 0:
            raise UserError(f"`longtail {shlex.join(command)}` failed (exit {code}) in {run.run_dir}; fix the cause "
                            f"and rerun the study (`{resume_hint}`): finished runs are skipped, this one resumes")


def print_commands(runs: list[StudyRun]) -> None:
    """One shell line per unfinished run (its steps joined by ``&&``), ready for any machine that
    sees the same folders; ``NPROC`` sets the processes per node."""
    for run in runs:
        if run.finished:
            continue
        commands = [_next_command(step) or [] for step in run.steps]
        lines = []
        for command in (c for c in commands if c):
            launcher = ["torchrun", "--nproc_per_node=${NPROC:-1}"] if command[0] in ("train", "stage2") else []
            words = [*launcher, "-m", "longtail"] if launcher else ["longtail"]
            lines.append(" ".join([*words, shlex.join(command)]))
        print(" && ".join(lines) if lines else f"# {run.run_dir}: all steps done")


def _carry(args: argparse.Namespace, study_dir: Path, resume: str) -> int:
    """--pack / --unpack (study_carry.py): the study moved between machines."""
    if args.pack:
        carried = pack_study(study_dir, Path(args.pack))
        print(f"packed {carried.files} files of {study_dir} into {args.pack}: {len(carried.finished)} finished runs "
              f"(records only), {len(carried.to_continue)} to continue (with their checkpoints)")
        return 0
    carried = unpack_study(Path(args.unpack), study_dir)
    print(f"unpacked {carried.files} files into {study_dir}: {len(carried.finished)} finished runs, "
          f"{len(carried.to_continue)} to continue; continue with:\n  {resume}")
    return 0


def selected_recipes(runs: list[StudyRun], names: list[str], selection: str | None) -> list[StudyRun]:
    """The runs of the recipes named in ``selection`` (``--recipes a,b``; all when None): this process
    trains those, in the study's order, and leaves the rest to other processes or a later call."""
    if selection is None:
        return runs
    chosen = [name.strip() for name in selection.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in names]
    if unknown or not chosen:
        raise UserError(f"--recipes {selection!r}: {', '.join(unknown) or 'no name given'} is not a recipe of the "
                        f"study; its recipes are {', '.join(names)}")
    return [run for run in runs if run.recipe in chosen]


def cmd_study(args: argparse.Namespace) -> int:
    """``args.run_command(argv)`` runs one ``longtail`` command (the cli passes its own ``main``, so the
    steps run in this process, one after another)."""
    if args.max_runs is not None and args.max_runs < 0:
        raise UserError(f"--max-runs must be >= 0, got {args.max_runs} (0 only records runs finished elsewhere)")
    study_file = Path(args.study)
    study = load_study(study_file)
    study_dir = Path(args.out) if args.out else Path(study.output_dir) / study.name
    resume = shlex.join(["longtail", "study", str(study_file), *(["--out", str(args.out)] if args.out else [])])
    resume_all = resume
    if args.recipes is not None:
        resume += " " + shlex.join(["--recipes", args.recipes])
    if args.recipes is not None and (args.pack or args.unpack or args.status):
        raise UserError("--recipes chooses what this process trains; --pack, --unpack and --status act on the "
                        "whole study: leave --recipes out")
    if args.pack or args.unpack:
        return _carry(args, study_dir, resume)
    runs = plan_runs(study, study_file, study_dir)
    if args.status:  # before check_unchanged: a changed run is shown as such, not an error
        print(study_status(study.name, study_dir, runs))
        return 0
    check_unchanged(runs)
    every_run, runs = runs, selected_recipes(runs, [recipe.name for recipe in study.recipes], args.recipes)
    if args.print_commands:
        print(f"# {sum(r.finished for r in runs)}/{len(runs)} runs of {study.name} finished; the rest, one line "
              "each (NPROC: processes per node, default 1):")
        print_commands(runs)
        return 0
    study_dir.mkdir(parents=True, exist_ok=True)
    write_output(study_record(study_dir), yaml.safe_dump(study.model_dump(mode="json"), sort_keys=False),
                 exist="replace")
    try:
        ran, held = run_study(study, runs, args.run_command, args.max_runs, resume)
    except (StudyInterrupted, KeyboardInterrupt) as error:
        print(str(error) if isinstance(error, StudyInterrupted) else
              f"interrupted; every checkpoint written is complete. Continue with:\n  {resume}", file=sys.stderr)
        return 130
    left = sum(not r.finished for r in runs)
    if held:
        print(f"{len(held)} runs are being worked on by other processes and were left to them (first: {held[0]})")
    if left:
        print(f"ran {ran} runs; {left} left: rerun `{resume}` to continue")
    elif any(not r.finished for r in every_run):
        print(f"the runs of --recipes {args.recipes} are finished ({ran} of them here); "
              f"{sum(not r.finished for r in every_run)} runs of other recipes are left: `{resume_all}` continues them")
    else:
        print(f"study {study.name} finished ({len(runs)} runs, {ran} of them here); compare with "
              f"`longtail report {study_dir}`")
    return 0
