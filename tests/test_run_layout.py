"""The run-folder layout has one owner (docs/ARCHITECTURE.md, "Run folders"): every file and folder
name of a run is spelled in ``longtail/engine/rundir.py`` and nowhere else in the package."""
from __future__ import annotations

import ast
from pathlib import Path

from longtail.engine import rundir

PACKAGE = Path(__file__).resolve().parents[1] / "longtail"
OWNER = PACKAGE / "engine" / "rundir.py"
# names that only mean a run's file or folder (``stage2``, ``plots`` and ``calibration`` are also config
# keys, parser names and metric keys, so they are not searched for)
NAMES = (rundir.CONFIG_FILE, rundir.ENV_FILE, rundir.CONFIG_HISTORY_FILE, rundir.METRICS_FILE, rundir.CHECKPOINTS_DIR,
         rundir.LAST_CHECKPOINT, rundir.BEST_CHECKPOINT, rundir.STAGE2_PREFIX, rundir.CALIBRATOR_FILE, rundir.EVALS_DIR,
         rundir.SHIFTS_PREFIX, rundir.STUDY_MARKER, rundir.STUDY_FILE, rundir.RELIABILITY_PLOT, rundir.METRICS_CSV,
         rundir.LOG_FILE, rundir.RELIABILITY_BY_GROUP_PLOT, rundir.PER_CLASS_PLOT,
         rundir.TENSORBOARD_DIR, rundir.SUMMARY_FILE, rundir.TABLE_FILE, rundir.SHIFTS_FILE)  # not EXPORT_DIR: also a command name


def spelled(path: Path) -> list[tuple[int, str]]:
    """(line, name) of every string constant in ``path`` (f-string parts included) that is a layout name."""
    tree = ast.parse(path.read_text(), str(path))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in NAMES]


def test_every_run_folder_name_is_spelled_once_in_rundir():
    owner = [name for _, name in spelled(OWNER)]
    assert sorted(owner) == sorted(NAMES)  # each defined exactly once
    elsewhere = [f"{path.relative_to(PACKAGE)}:{line} {name!r}" for path in sorted(PACKAGE.rglob("*.py"))
                 if path != OWNER for line, name in spelled(path)]
    assert elsewhere == []


def test_checkpoint_paths_follow_the_layout(tmp_path):
    assert rundir.checkpoint_path(tmp_path, "last") == rundir.last_checkpoint(tmp_path)
    assert rundir.checkpoint_path(tmp_path, "best") == rundir.best_checkpoint(tmp_path)
    assert rundir.checkpoint_path(tmp_path, "epoch3") == tmp_path / rundir.CHECKPOINTS_DIR / "epoch3.pt"
    assert rundir.folder_of_checkpoint(rundir.last_checkpoint(tmp_path)) == tmp_path
    assert rundir.stage2_label(tmp_path / rundir.stage2_dir_name("crt")) == "crt"
    assert rundir.stage2_label(rundir.recipe_stage2_dir(tmp_path)) is None
