"""Per-epoch logs a person and a program can read: CSV, TensorBoard and a text log."""
from __future__ import annotations

import csv
import logging
import sys
from pathlib import Path
from typing import Any
from longtail.engine.rundir import LOG_FILE, METRICS_CSV, TENSORBOARD_DIR

LOG = logging.getLogger("longtail")


class _Stderr(logging.StreamHandler):
    """Writes to ``sys.stderr`` as it is at each message, not as it was at setup (a caller that
    redirects or captures stderr, as pytest does, would otherwise leave the log on a closed stream)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def setup_text_log(run_dir: Path | None, is_main: bool) -> None:
    LOG.setLevel(logging.INFO if is_main else logging.WARNING)
    if not LOG.handlers:
        console = _Stderr()
        console.setFormatter(logging.Formatter("%(message)s"))
        LOG.addHandler(console)
    if run_dir is not None and is_main:
        for handler in list(LOG.handlers):
            if isinstance(handler, logging.FileHandler):
                LOG.removeHandler(handler)
                handler.close()
        file_handler = logging.FileHandler(run_dir / LOG_FILE)
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        LOG.addHandler(file_handler)


class RunLogger:
    """Appends one row per epoch to ``metrics.csv`` and the same scalars to TensorBoard."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self.csv_path = run_dir / METRICS_CSV
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))

    def log_epoch(self, epoch: int, scalars: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"epoch": epoch, **{k: v for k, v in scalars.items() if isinstance(v, (int, float))}}
        rows = []
        if self.csv_path.exists():
            with self.csv_path.open() as handle:
                # a resumed run may repeat epochs after the checkpoint: keep only rows before this one
                rows = [r for r in csv.DictReader(handle) if int(r["epoch"]) < epoch]
        fields = list(dict.fromkeys([*(rows[0].keys() if rows else []), *row.keys()]))
        rows.append({k: row.get(k, "") for k in fields})
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=fields, restval="")
            writer.writeheader()
            writer.writerows(rows)
        tmp.replace(self.csv_path)
        assert self.writer is not None
        for key, value in row.items():
            if key != "epoch":
                self.writer.add_scalar(key.replace(".", "/"), value, epoch)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
