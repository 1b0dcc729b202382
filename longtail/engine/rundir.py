"""Run directories: never overwrite a previous run; record what produced the results (and every
later change of the config, in ``config_history.jsonl``); one process works in a run at a time
(``RUN/.lock``); claims that let several processes share a study; and the one way every command
writes an output file (atomically, never replacing a file silently)."""
from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import secrets
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Iterator, Literal

import torch

from longtail.config import Config, dump_config
from longtail.engine.precision import resolve_precision


# ----------------------------------------------------------------------------- the layout of a run
# Every file and folder name of a run is spelled here and nowhere else; the commands, the trainer,
# stage 2, calibration, the report and the study ask these names and functions.
#
#   RUN/config.yaml env.json config_history.jsonl .lock    what produced the run (write_run_record)
#   RUN/metrics.json plots/                                a finished stage (write_results)
#   RUN/checkpoints/last.pt best.pt                        the trainer's checkpoints
#   RUN/stage2/                                            a recipe's stage 2 (a run folder of its own)
#   RUN/stage2_<name>[-N]/                                 `longtail stage2` (likewise)
#   RUN[/stage2...]/calibration/<method>[-N]/calibrator.pt metrics.json table.md  `longtail calibrate`
#   RUN[/stage2...]/evals/<checkpoint>_<split>[-N]/ shifts_<checkpoint>[-N]/       `longtail eval`
#   RUN/study_run.json                                     `longtail study`: every step of the run is done
CONFIG_FILE = "config.yaml"
ENV_FILE = "env.json"
CONFIG_HISTORY_FILE = "config_history.jsonl"
LOCK_FILE = ".lock"
METRICS_FILE = "metrics.json"
METRICS_CSV = "metrics.csv"  # one row per epoch (engine/logging.py)
LOG_FILE = "train.log"
STARTED_FROM_FILE = "started_from.json"  # a run begun at another run's kept checkpoint (commands/start_from.py)
PLOTS_DIR = "plots"
RELIABILITY_PLOT = "reliability.png"  # in plots/: the test predictions' reliability diagram
RELIABILITY_BY_GROUP_PLOT = "reliability_by_group.png"  # in plots/: one diagram per shot group
PER_CLASS_PLOT = "per_class_accuracy.png"  # in plots/: per-class top-1 against class size
TENSORBOARD_DIR = "tensorboard"
EXPORT_DIR = "export"  # longtail export's default folder
SUMMARY_FILE = "summary.txt"  # in evals/<name>/: the metrics as printed
TABLE_FILE = "table.md"  # in calibration/<method>/ and shifts_<split>/: the markdown table
SHIFTS_FILE = "shifts.json"  # in shifts_<split>/
CHECKPOINTS_DIR = "checkpoints"
LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"
CHECKPOINT_SUFFIX = ".pt"
RECIPE_STAGE2_DIR = "stage2"
STAGE2_PREFIX = "stage2_"
CALIBRATION_DIR = "calibration"
CALIBRATOR_FILE = "calibrator.pt"
EVALS_DIR = "evals"
SHIFTS_PREFIX = "shifts_"
STUDY_MARKER = "study_run.json"
# a study folder: STUDY/study.yaml (the study as run), STUDY/<cell>/seed<k>/ (its runs)
STUDY_FILE = "study.yaml"
# a run's small files kept in the repository by benchmarks/reproduction.py: KEPT/<recipe>/seed<k>/, with
# origin.json naming the study it was trained in (the study folder itself lives on one machine)
KEPT_ORIGIN_FILE = "origin.json"


def checkpoints_dir(folder: Path) -> Path:
    return folder / CHECKPOINTS_DIR


def checkpoint_path(folder: Path, name: str = "last") -> Path:
    """``folder/checkpoints/<name>.pt``: ``last``, ``best`` or a file name (``.pt`` optional)."""
    file = {"last": LAST_CHECKPOINT, "best": BEST_CHECKPOINT}.get(name, name)
    return checkpoints_dir(folder) / (file if file.endswith(CHECKPOINT_SUFFIX) else file + CHECKPOINT_SUFFIX)


def last_checkpoint(folder: Path) -> Path:
    return checkpoints_dir(folder) / LAST_CHECKPOINT


def best_checkpoint(folder: Path) -> Path:
    return checkpoints_dir(folder) / BEST_CHECKPOINT


def kept_checkpoint(folder: Path, epoch: int) -> Path:
    """The checkpoint kept at the end of ``epoch`` (1-based, ``train.keep_epochs``)."""
    return checkpoints_dir(folder) / f"epoch{epoch}.pt"


def is_checkpoint_file(path: Path) -> bool:
    """A checkpoint inside a run folder (``RUN/checkpoints/*.pt``)."""
    return path.suffix == CHECKPOINT_SUFFIX and path.parent.name == CHECKPOINTS_DIR


def folder_of_checkpoint(file: Path) -> Path:
    """The run (or stage-2) folder of a checkpoint file: ``RUN`` for ``RUN/checkpoints/x.pt``, else the
    file's folder."""
    return file.parent.parent if file.parent.name == CHECKPOINTS_DIR else file.parent


def config_file(folder: Path) -> Path:
    return folder / CONFIG_FILE


def metrics_file(folder: Path) -> Path:
    return folder / METRICS_FILE


def kept_origin(run_dir: Path) -> Path:
    return run_dir / KEPT_ORIGIN_FILE


def kept_runs(folder: Path) -> list[Path]:
    """The runs kept under ``folder`` (``<recipe>/seed<k>`` with an origin.json), sorted."""
    return sorted(run for run in folder.glob("*/*") if kept_origin(run).is_file())


def is_finished(folder: Path) -> bool:
    """A stage (stage 1 in a run folder, stage 2 in its folder) that wrote its metrics.json."""
    return metrics_file(folder).is_file()


def recipe_stage2_dir(run_dir: Path) -> Path:
    """Where a recipe's ``stage2`` section trains (``longtail train``)."""
    return run_dir / RECIPE_STAGE2_DIR


def stage2_dir_name(name: str) -> str:
    """The folder name (before numbering) of ``longtail stage2 --name NAME`` (or the method)."""
    return STAGE2_PREFIX + name


def stage2_label(folder: Path) -> str | None:
    """The name a stage-2 folder was given (``stage2_<name>``), None for the recipe's ``stage2``."""
    return None if folder.name == RECIPE_STAGE2_DIR else folder.name.removeprefix(STAGE2_PREFIX)


def stage2_dirs(run_dir: Path) -> list[Path]:
    """Every stage-2 folder of a run: the recipe's, then those of ``longtail stage2`` by name."""
    return [recipe_stage2_dir(run_dir), *sorted(run_dir.glob(STAGE2_PREFIX + "*"))]


def calibration_dir(folder: Path) -> Path:
    return folder / CALIBRATION_DIR


def calibrator_file(calibration_folder: Path) -> Path:
    return calibration_folder / CALIBRATOR_FILE


def calibrator_files(folder: Path) -> list[Path]:
    """``folder/calibration/*/calibrator.pt``, oldest first."""
    return sorted(calibration_dir(folder).glob(f"*/{CALIBRATOR_FILE}"), key=lambda f: f.stat().st_mtime)


def calibration_records(folder: Path) -> list[Path]:
    """``folder/calibration/*/metrics.json``, by folder name."""
    return sorted(calibration_dir(folder).glob(f"*/{METRICS_FILE}"))


def evals_dir(folder: Path) -> Path:
    return folder / EVALS_DIR


def study_marker(run_dir: Path) -> Path:
    return run_dir / STUDY_MARKER


def study_file(study_dir: Path) -> Path:
    return study_dir / STUDY_FILE


class RunDirError(RuntimeError):
    """A run directory cannot be used (another process holds it); the message says what to do."""


class OutputError(RunDirError):
    """An output file cannot be written (it exists, it is a folder, the folder is not writable)."""


def new_run_dir(output_dir: str | Path, name: str) -> Path:
    """``output_dir/name``, or ``name-1``, ``name-2``... if it exists, so results are never overwritten.
    Claimed with an exclusive ``mkdir``, so two runs started at the same instant get different folders."""
    base = Path(output_dir) / name
    base.parent.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while True:
        candidate = base if suffix == 0 else base.with_name(f"{base.name}-{suffix}")
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            suffix += 1


def discard_if_unstarted(run_dir: Path) -> bool:
    """Remove a run directory a failed command created before anything was trained in it (it holds
    only the run record), so failures leave no empty ``NAME-N`` folders. Returns whether it did."""
    if not run_dir.is_dir() or checkpoints_dir(run_dir).exists() or metrics_file(run_dir).exists():
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` (an advisory ``flock``, released by the kernel even on ``kill -9``) while
    a command works in the run, so two processes never train or resume one run at once."""
    handle = try_claim(run_dir / LOCK_FILE)
    if handle is None:
        holder = lock_holder(run_dir / LOCK_FILE) or "another process"
        raise RunDirError(f"{run_dir} is in use by {holder}; wait for it to finish (or stop it) before "
                          "resuming or training in this run")
    try:
        yield
    finally:
        release(handle)


def _holder_text() -> str:
    return f"pid {os.getpid()} on {socket.gethostname()}"


def try_claim(path: Path) -> IO[str] | None:
    """Take the advisory ``flock`` on ``path`` (created if missing) without waiting: the open handle
    that holds it, or None when another live process holds it. The kernel releases it when the
    holder exits, however it exits, so a claim left by a dead process is simply taken again.
    ``release(handle)`` gives it back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    handle.truncate(0)
    handle.write(_holder_text() + "\n")
    handle.flush()
    return handle


def release(handle: IO[str]) -> None:
    fcntl.flock(handle, fcntl.LOCK_UN)
    handle.close()


def lock_holder(path: Path) -> str | None:
    """Who holds the ``flock`` on ``path`` (its recorded "pid N on HOST"), or None when nobody does
    or the file does not exist. Only looks: it creates nothing and keeps no lock."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        with os.fdopen(os.dup(fd)) as handle:
            return handle.read().strip() or "another process"
    finally:
        os.close(fd)  # closing the only descriptor also drops a lock taken above
    return None


def record_config_change(run_dir: Path, config: Config, changes: dict[str, tuple[Any, Any]]) -> None:
    """Rewrite ``config.yaml`` with the config now in force and append what changed (and when, and
    by which command) to ``config_history.jsonl``."""
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
             "changed": {key: {"from": old, "to": new} for key, (old, new) in changes.items()}}
    with open(run_dir / CONFIG_HISTORY_FILE, "a") as handle:
        handle.write(json.dumps(entry) + "\n")
    tmp = run_dir / f".config.yaml.tmp-{os.getpid()}"
    tmp.write_text(dump_config(config))
    os.replace(tmp, config_file(run_dir))


def git_commit() -> dict[str, object]:
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit or None, "dirty": dirty if commit else None}


def device_name(device: torch.device) -> str:
    """A human name of the device: the GPU's, or the CPU model with its core count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or "cpu"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"{model} ({os.cpu_count()} cores)"


def write_run_record(run_dir: Path, config: Config, device: torch.device, world_size: int) -> None:
    """The resolved config, the code version and the environment, beside the results."""
    config_file(run_dir).write_text(dump_config(config))
    env = {
        "git": git_commit(),
        "argv": sys.argv,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": str(device),
        "device_name": device_name(device),
        "cpu_threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision": resolve_precision(config.train.amp, config.train.channels_last, device).label,
    }
    (run_dir / ENV_FILE).write_text(json.dumps(env, indent=2))


# ----------------------------------------------------------------------------- output files
Exists = Literal["refuse", "number", "replace"]


@dataclass
class Output:
    """Where to write (``tmp``, a fresh file beside the target) and, once published, the file it became."""

    tmp: Path
    path: Path


def numbered(path: Path, number: int) -> Path:
    return path if number == 0 else path.with_name(f"{path.stem}-{number}{path.suffix}")


def check_output(path: Path, exist: Exists = "refuse", hint: str = "choose another name") -> Path:
    """Fail early (before any work) on an output path that cannot be written as asked: a folder, or
    an existing file under ``exist="refuse"``."""
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name inside it (e.g. {path / ('output' + path.suffix)})")
    if exist == "refuse" and (path.exists() or path.is_symlink()):
        raise OutputError(f"{path} exists and is never replaced silently; {hint}")
    return path


@contextmanager
def atomic_output(path: str | Path, exist: Exists = "refuse", hint: str = "choose another name") -> Iterator[Output]:
    """Write an output file atomically: the body writes ``output.tmp`` (in the target's folder), which
    then becomes ``path`` in one step, so a reader never sees half a file. An existing ``path`` is
    refused (``hint`` says what to do), or the output is numbered ``NAME-1.EXT``, ``NAME-2.EXT``...
    (``exist="number"``), or replaced (``exist="replace"``, e.g. under ``--force``). On any failure the
    temporary file and any folder made for it are removed, and a file-system error becomes
    ``OutputError("cannot write PATH: reason")``."""
    path = check_output(Path(path), exist, hint)
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
    output = Output(tmp, path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # fails now on an unwritable folder
        yield output
        output.path = _publish(tmp, path, exist, hint)
    except BaseException as error:
        with suppress(OSError):  # on a read-only folder even removing what was never made fails
            tmp.unlink(missing_ok=True)
        for folder in made:  # innermost first; leave no empty folder a failed write made
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(error, OSError) and not isinstance(error, OutputError):
            raise OutputError(f"cannot write {path}: {error.strerror or error}. Check that its folder exists, is "
                              "writable and has free space") from None
        raise


def _publish(tmp: Path, path: Path, exist: Exists, hint: str) -> Path:
    """``tmp`` becomes ``path`` (or the first free numbered name). A hard link never replaces an existing
    file, so two writers cannot both take one name; where links are not supported a rename is used."""
    if exist == "replace":
        os.replace(tmp, path)
        return path
    number = 0
    while True:
        target = numbered(path, number)
        try:
            os.link(tmp, target)
        except FileExistsError:
            if exist == "refuse":
                raise OutputError(f"{target} exists and is never replaced silently; {hint}") from None
            number += 1
            continue
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if target.exists():
                if exist == "refuse":
                    raise OutputError(f"{target} exists and is never replaced silently; {hint}") from None
                number += 1
                continue
            os.rename(tmp, target)
            return target
        tmp.unlink()
        return target


def write_output(path: str | Path, content: str | bytes, exist: Exists = "refuse",
                 hint: str = "choose another name") -> Path:
    """``content`` written to ``path`` with :func:`atomic_output`; returns the file written."""
    with atomic_output(path, exist, hint) as output:
        if isinstance(content, bytes):
            output.tmp.write_bytes(content)
        else:
            output.tmp.write_text(content, encoding="utf-8")
    return output.path
