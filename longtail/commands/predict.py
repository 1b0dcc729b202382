"""``longtail predict``: top-k class names and probabilities of a trained run on new image files, with
the run's evaluation transform (and its ``eval.tta`` views) and, when asked, its fitted calibrator. Unreadable files are reported
and skipped; the rest of the batch goes on."""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from longtail.calibration.calibrators import Calibrator
from longtail.commands.common import UserError
from longtail.data import DataError, ImageSet
from longtail.data.sources import read_image_file, resize_center_crop
from longtail.engine.rundir import Exists, check_output, write_output
from longtail.runs import LoadedRun, find_calibrator, load_run, run_dir_of

__all__ = ["cmd_predict", "collect_inputs", "eval_view", "predict_files", "Prediction"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
LIST_SUFFIXES = (".txt", ".lst", ".list")


@dataclass
class Prediction:
    path: str
    classes: list[str]
    probabilities: list[float]


def images_under(folder: Path) -> list[str]:
    """Image files under ``folder``, recursively, following linked folders (each real folder is searched
    once, so a link back up the tree is not followed round)."""
    found: list[str] = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            print(f"not searched again: {root} (a link to {real}, already searched)", file=sys.stderr)
            dirs.clear()
            continue
        seen.add(real)
        dirs.sort()
        found += [str(Path(root) / name) for name in sorted(files)
                  if Path(name).suffix.lower() in IMAGE_SUFFIXES and (Path(root) / name).is_file()]
    return found


def _list_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"list file {path} is not text: give one image path per line (UTF-8), or pass the "
                        "image files or their folder instead") from None
    except OSError as error:
        raise UserError(f"cannot read list file {path}: {error.strerror or error}") from None


def collect_inputs(inputs: list[str]) -> list[str]:
    """Image paths from image files, folders (searched recursively for image suffixes, linked folders
    included) and list files (one path per line, relative to the list file's folder unless absolute;
    a trailing label is ignored)."""
    paths: list[str] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            paths += images_under(path)
        elif path.suffix.lower() in LIST_SUFFIXES and path.is_file():
            for line in _list_lines(path):
                if line.strip():
                    listed = Path(line.split()[0]).expanduser()
                    paths.append(str(listed if listed.is_absolute() else path.parent / listed))
        elif path.exists() or path.suffix.lower() in IMAGE_SUFFIXES:
            paths.append(str(path))  # a missing image file is reported with the unreadable ones
        else:
            raise UserError(f"input {item} does not exist; give image files, folders of images, or a list file "
                            f"({', '.join(LIST_SUFFIXES)}) with one image path per line")
    if not paths:
        raise UserError(f"no images found in {' '.join(inputs)} (image suffixes: {', '.join(IMAGE_SUFFIXES)})")
    return paths


def eval_view(image: torch.Tensor, size: int) -> torch.Tensor:
    """The run's evaluation view of a decoded image, the one every dataset's test images get: as it is
    when it already is ``size`` x ``size``, else resize + centre crop (``resize_center_crop``)."""
    return resize_center_crop(image, size)


class _Files(Dataset):
    def __init__(self, paths: list[str], channels: int, size: int) -> None:
        self.paths, self.channels, self.size = paths, channels, size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            image = read_image_file(self.paths[index], self.channels)
        except DataError as error:
            return index, None, str(error)
        return index, eval_view(image, self.size), None


def _keep_all(items: list[Any]) -> list[Any]:
    return items


def predict_files(run: LoadedRun, paths: list[str], top_k: int = 5, calibrator: Calibrator | None = None,
                  num_workers: int = 0, progress: bool = True) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """(predictions, skipped (path, reason)) of ``run``'s model on image files, batched on its device:
    each batch of readable images is scored by the run's evaluation (``LoadedRun.evaluate``), with the
    calibrator's probabilities when one is given."""
    config, bundle = run.config, run.bundle
    loader = DataLoader(_Files(paths, bundle.channels, bundle.image_size),
                        batch_size=config.data.eval_batch_size, num_workers=num_workers, collate_fn=_keep_all)
    k = min(top_k, bundle.num_classes)
    predictions: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    with tqdm(total=len(paths), unit="img", disable=not progress, file=sys.stderr) as bar:
        for batch in loader:
            skipped += [(paths[index], reason) for index, image, reason in batch if image is None]
            good = [(index, image) for index, image, _ in batch if image is not None]
            bar.update(len(batch))
            if not good:
                continue
            images = ImageSet(targets=torch.zeros(len(good), dtype=torch.int64), num_classes=bundle.num_classes,
                              class_names=list(bundle.class_names), images=torch.stack([image for _, image in good]))
            probs = run.evaluate(images, calibrator=calibrator, probabilities=True,
                                 metrics=False).outputs["probabilities"]
            values, indices = probs.topk(k, dim=1)
            predictions += [Prediction(paths[index], [bundle.class_names[c] for c in row_idx.tolist()], row.tolist())
                            for (index, _), row, row_idx in zip(good, values, indices)]
    return predictions, skipped


def _rows(predictions: list[Prediction], calibrator: str | None) -> Iterator[dict[str, Any]]:
    for p in predictions:
        yield {"path": p.path, "top_k": [{"class": c, "probability": v} for c, v in zip(p.classes, p.probabilities)],
               "calibrated": calibrator is not None, "calibrator": calibrator}


def write_predictions(out: Path, predictions: list[Prediction], k: int, calibrator: str | None,
                      exist: Exists = "refuse") -> Path:
    """``.jsonl``: one JSON object per image; otherwise CSV with class_i / prob_i columns. Returns the
    file written (numbered under ``exist="number"``)."""
    text = io.StringIO()
    if out.suffix == ".jsonl":
        for row in _rows(predictions, calibrator):
            text.write(json.dumps(row) + "\n")
    else:
        writer = csv.writer(text)
        writer.writerow(["path", *(f"{what}_{i}" for i in range(1, k + 1) for what in ("class", "prob")),
                         "calibrated", "calibrator"])
        for p in predictions:
            writer.writerow([p.path, *(x for c, v in zip(p.classes, p.probabilities) for x in (c, f"{v:.6g}")),
                             calibrator is not None, calibrator or ""])
    return write_output(out, text.getvalue(), exist, hint=FORCE_HINT)


FORCE_HINT = "pass --force to replace it, or give another --out"
DEFAULT_OUT = "predictions.csv"


def cmd_predict(args: argparse.Namespace) -> int:
    if args.top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {args.top_k}")
    if args.workers is not None and args.workers < 0:
        raise UserError(f"--workers must be >= 0 (0 decodes in this process), got {args.workers}")
    # a file you name is never replaced without --force; the default name is numbered instead
    out = Path(args.out or DEFAULT_OUT)
    exist: Exists = "replace" if args.force else ("refuse" if args.out else "number")
    check_output(out, exist, FORCE_HINT)
    run = load_run(Path(args.run), args.checkpoint)
    calibrator_name, calibrator = None, None
    if args.calibrated or args.calibrator:
        calibrator_name, calibrator = find_calibrator(run_dir_of(run.run_dir), args.calibrator, run.file)
    paths = collect_inputs(args.inputs)
    workers = run.config.data.num_workers if args.workers is None else args.workers
    predictions, skipped = predict_files(run, paths, args.top_k, calibrator, workers)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not predictions:
        raise UserError(f"none of the {len(paths)} images could be read (each is named above); nothing was "
                        f"written to {out}")
    out = write_predictions(out, predictions, min(args.top_k, run.bundle.num_classes), calibrator_name, exist)
    print(f"{len(predictions)} images predicted"
          + (f" with calibrator {calibrator_name}" if calibrator_name else " (uncalibrated)")
          + (f", {len(skipped)} unreadable skipped" if skipped else "") + f"; written to {out}")
    return 0
