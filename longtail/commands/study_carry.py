"""A study carried to another machine: ``longtail study STUDY.yaml --pack FILE`` / ``--unpack FILE``.

A study of long runs outlives the machine it started on (a session that ends, a preempted cloud VM).
The pack holds what ``longtail study`` needs to go on elsewhere exactly where it stopped: every run's
records (config, metrics, logs, markers), the signatures the study started its runs with, and the
checkpoints of the runs not finished yet (a stopped run resumes from its ``last.pt``) and those a
finished run kept for a later recipe to start from (``train.keep_epochs``). Finished runs' other
weights stay out (a ResNet-32's checkpoint is ~4 MB; keep the ones you want with ``benchmarks/zoo.py``
or a copy), and so do the per-machine lock files. Unpacking never overwrites a file that differs.
"""
from __future__ import annotations

import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from longtail.commands.common import UserError
from longtail.engine.rundir import CONFIG_FILE, LOCK_FILE, STUDY_MARKER, lock_holder

CLAIM_SUFFIX = ".claim"  # the study's per-run flock files (study.py): meaningful on this machine only
KEPT_CHECKPOINT = re.compile(r"epoch\d+\.pt")  # rundir.kept_checkpoint's names


@dataclass
class Carried:
    """What a pack holds (or an unpack brought): files, and the runs by state."""

    files: int
    finished: list[str]
    to_continue: list[str]


def _compression(archive: Path) -> str:
    """tarfile's write mode for the archive's suffix: gzip for .tar.gz/.tgz, plain tar for .tar."""
    name = archive.name
    if name.endswith((".tar.gz", ".tgz")):
        return "w:gz"
    if name.endswith(".tar"):
        return "w"
    raise UserError(f"{archive}: a pack is a .tar, .tar.gz or .tgz file; give one of those names")


def _run_of(relative: Path) -> Path | None:
    """The ``<cell>/seed<k>`` a study file belongs to, or None (the study's own files, ``.claims``)."""
    parts = relative.parts
    if len(parts) < 3 or parts[0].startswith("."):
        return None
    return Path(parts[0], parts[1])


def _packed(study_dir: Path) -> tuple[list[Path], Carried]:
    """The files of ``study_dir`` a pack holds (relative paths) and what they amount to."""
    finished = {run.parent.relative_to(study_dir) for run in study_dir.glob(f"*/*/{STUDY_MARKER}")}
    started = {path.parent.relative_to(study_dir) for path in study_dir.glob(f"*/*/{CONFIG_FILE}")}
    files = []
    for path in sorted(p for p in study_dir.rglob("*") if p.is_file()):
        relative = path.relative_to(study_dir)
        if path.name == LOCK_FILE or path.name.endswith((CLAIM_SUFFIX, ".tmp")):
            continue
        # a finished run's weights stay out, except the checkpoints it kept (train.keep_epochs) for a
        # later recipe to start from (study start_from): those are what that recipe will need
        if path.suffix == ".pt" and _run_of(relative) in finished and not KEPT_CHECKPOINT.fullmatch(path.name):
            continue
        files.append(relative)
    to_continue = sorted(str(run) for run in started - finished)
    return files, Carried(len(files), sorted(map(str, finished)), to_continue)


def pack_study(study_dir: Path, archive: Path) -> Carried:
    """Write the pack of ``study_dir`` to ``archive`` (a new file; written whole, then renamed)."""
    if not study_dir.is_dir():
        raise UserError(f"no study folder at {study_dir}: nothing to pack (run the study first, or give --out)")
    if archive.exists():
        raise UserError(f"{archive} exists; remove it or give another name (a pack is never overwritten)")
    busy = [str(lock.parent) for lock in study_dir.glob(f"*/*/{LOCK_FILE}") if lock_holder(lock)]
    if busy:
        raise UserError(f"{busy[0]} is training now ({len(busy)} run(s) in use); stop the study (Ctrl-C or "
                        "SIGTERM: every checkpoint written is complete), then pack")
    files, carried = _packed(study_dir)
    partial = archive.with_name(archive.name + ".tmp")
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(partial, _compression(archive)) as tar:
        for relative in files:
            tar.add(study_dir / relative, arcname=str(relative), recursive=False)
    os.replace(partial, archive)
    return carried


def unpack_study(archive: Path, study_dir: Path) -> Carried:
    """Extract ``archive`` into ``study_dir``; refuse (naming the files) when any file there differs."""
    if not archive.is_file():
        raise UserError(f"no pack at {archive}; give the file `longtail study ... --pack` wrote")
    try:
        tar = tarfile.open(archive, "r:*")
    except tarfile.TarError as error:
        raise UserError(f"{archive} is not a readable pack ({error}); it may be truncated: pack the study again")
    with tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        conflicts, new = [], []
        for member in members:
            target = study_dir / member.name
            if not target.exists():
                new.append(member)
                continue
            source = tar.extractfile(member)
            if source is None or source.read() != target.read_bytes():
                conflicts.append(str(target))
        if conflicts:
            raise UserError(f"{len(conflicts)} file(s) of the pack differ from the ones in {study_dir} (first: "
                            f"{conflicts[0]}); unpack into an empty folder (--out) or move the study away first")
        study_dir.mkdir(parents=True, exist_ok=True)
        try:
            tar.extractall(study_dir, members=new, filter="data")
        except tarfile.FilterError as error:
            raise UserError(f"{archive} holds a file that would land outside {study_dir} ({error}); "
                            "it is not a study pack") from None
    _, carried = _packed(study_dir)
    return Carried(len(new), carried.finished, carried.to_continue)
