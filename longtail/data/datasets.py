"""Datasets as the rest of longtail sees them (docs/ARCHITECTURE.md, "Data"): ``ImageSet`` (one
split, in memory or as files), ``DataBundle`` (train / val / test plus what a model needs to know), the
registered builders, and ``build_data``, the one entry point.

A builder (``DATASETS``, ``fn(cfg: DataConfig) -> DataBundle``) reads its source with
``longtail.data.sources`` and applies the long-tailed profile its benchmark defines; ``build_data``
then carves the validation split and checks the result, the same way for every dataset.
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from longtail.config import DataConfig
from longtail.data.cache import load_or_build, load_or_check, load_or_list
from longtail.data.memory import check_decode_fits
from longtail.data.sources import (DataError, Decoded, Listed, decode_archive, decode_files, is_archive, list_archive,
                                   list_tree, read_archive, read_cifar_python, read_digits, read_headers, read_list_file,
                                   read_mnist)
from longtail.functional.data import lt_counts
from longtail.registry import DATASETS

__all__ = ["ImageSet", "DataBundle", "build_data", "select_per_class", "long_tailed_indices", "make_long_tailed",
           "resolve_image_size", "stratified_split",
           "balanced_split", "split_validation", "check_bundle", "channel_stats", "CIFAR10_STATS",
           "CIFAR100_STATS", "IMAGENET_STATS", "DIGITS_TEST_PER_CLASS", "DEFAULT_FILE_IMAGE_SIZE"]

Stats = tuple[tuple[float, ...], tuple[float, ...]]
CIFAR10_STATS: Stats = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS: Stats = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS: Stats = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
DIGITS_TEST_PER_CLASS = 50
DIGITS_TEST_SEED = 0  # the Digits-LT test set never changes with data.selection_seed
DEFAULT_FILE_IMAGE_SIZE = 224
DEFAULT_IMBALANCE_FACTOR = 10.0  # of the benchmark sets (digits, CIFAR, MNIST) when data.imbalance_factor is unset
SHOWN_BAD_FILES = 20
LOG = logging.getLogger("longtail")


@dataclass
class ImageSet:
    """One split: int64 ``targets`` (N,) and either uint8 ``images`` (N, C, H, W) or image ``paths``.
    ``image_size`` is the side file images are decoded to (None for in-memory sets)."""

    targets: torch.Tensor
    num_classes: int
    class_names: list[str]
    images: torch.Tensor | None = None
    paths: list[str] | None = None
    image_size: int | None = None

    def __post_init__(self) -> None:
        if (self.images is None) == (self.paths is None):
            raise ValueError("an ImageSet holds either decoded images or image paths, exactly one of them")
        size = len(self.images) if self.images is not None else len(self.paths or [])
        if self.targets.dtype != torch.int64 or self.targets.shape != (size,):
            raise ValueError(f"targets must be int64 of shape ({size},), got {self.targets.dtype} "
                             f"{tuple(self.targets.shape)}")
        if self.images is not None and (self.images.dtype != torch.uint8 or self.images.dim() != 4):
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.paths is not None and self.image_size is None:
            raise ValueError("a file ImageSet needs image_size, the side its images are decoded to")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def class_counts(self) -> list[int]:
        return torch.bincount(self.targets, minlength=self.num_classes).tolist()

    def subset(self, indices: torch.Tensor) -> "ImageSet":
        """The images at ``indices``, in that order."""
        indices = torch.as_tensor(indices, dtype=torch.int64)
        images = None if self.images is None else self.images[indices]
        paths = None if self.paths is None else [self.paths[i] for i in indices.tolist()]
        return dataclasses.replace(self, targets=self.targets[indices], images=images, paths=paths)


@dataclass
class DataBundle:
    """The splits of one dataset plus what a model and the augmentation need: normalisation
    statistics, the image side and the number of channels."""

    train: ImageSet
    val: ImageSet | None
    test: ImageSet
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    channels: int
    image_size_note: str = ""  # how image_size was chosen when data.image_size is unset (the run header says it)

    @property
    def train_counts(self) -> list[int]:
        return self.train.class_counts()


# ------------------------------------------------------------------ long-tailed subsets and splits
def select_per_class(targets: torch.Tensor, counts: Sequence[int], selection: str = "random",
                     seed: int = 0) -> torch.Tensor:
    """Indices keeping ``counts[c]`` images of each class ``c``, class after class.

    ``random``: Cao et al.'s per-class shuffle: one ``np.random.RandomState(seed)``, ``shuffle`` of each
    class's indices in class order, keep the first ``counts[c]`` (as LDAM-DRW's ``IMBALANCECIFAR``, so
    torchvision's CIFAR folders give their subsets image by image). ``first``: the first ``counts[c]`` in
    file order (SHIKE's code).
    """
    if selection not in ("random", "first"):
        raise ValueError(f"unknown selection {selection!r}; allowed: random, first")
    labels = targets.cpu().numpy()
    rng = np.random.RandomState(seed)
    kept = []
    for cls, count in enumerate(counts):
        members = np.flatnonzero(labels == cls)
        if count > len(members):
            raise ValueError(f"class {cls} has {len(members)} images, fewer than the {count} asked for")
        if selection == "random":
            rng.shuffle(members)
        kept.append(members[:count])
    return torch.from_numpy(np.concatenate(kept).astype(np.int64))


def long_tailed_indices(targets: torch.Tensor, class_names: list[str], cfg: DataConfig) -> torch.Tensor:
    """Indices keeping ``lt_counts(C, max_count, imbalance_factor, profile)`` images per class (class 0
    largest), chosen by ``select_per_class``; ``max_count`` defaults to the smallest class's size, so every
    class can give what it is asked; ``imbalance_factor`` defaults to ``DEFAULT_IMBALANCE_FACTOR``.
    Depends only on the targets, so it can run before any image is decoded."""
    available = torch.bincount(targets, minlength=len(class_names)).tolist()
    empty = [name for name, have in zip(class_names, available) if have == 0]
    if empty:
        raise DataError(f"class {empty[0]!r} has no training images"
                        + (f" (nor do {', '.join(repr(n) for n in empty[1:4])})" if len(empty) > 1 else "")
                        + "; add images to its folder or remove the folder")
    factor = cfg.imbalance_factor if cfg.imbalance_factor is not None else DEFAULT_IMBALANCE_FACTOR
    max_count = cfg.max_count if cfg.max_count is not None else min(available)
    counts = lt_counts(len(class_names), max_count, factor, cfg.profile)
    for name, have, want in zip(class_names, available, counts):
        if want > have:
            raise DataError(f"class {name!r} has {have} training images but the {cfg.profile} profile with "
                            f"max_count {max_count} asks for {want}; lower data.max_count (at most {min(available)} "
                            "fits every class)")
        if want == 0:
            raise DataError(f"imbalance factor {factor} with max_count {max_count} leaves class "
                            f"{name!r} with 0 images; lower data.imbalance_factor or raise data.max_count")
    return select_per_class(targets, counts, cfg.selection, cfg.selection_seed)


def make_long_tailed(imageset: ImageSet, cfg: DataConfig) -> ImageSet:
    """The images ``long_tailed_indices`` keeps, in its order."""
    return imageset.subset(long_tailed_indices(imageset.targets, imageset.class_names, cfg))


def _class_permutations(targets: torch.Tensor, num_classes: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(targets == cls).flatten() for cls in range(num_classes)]
    return [idx[torch.randperm(len(idx), generator=generator)] for idx in members]


def stratified_split(targets: torch.Tensor, num_classes: int, fraction: float,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) indices, each sorted: every class gives ``round(fraction * n)`` of its ``n`` images
    (drawn by a seeded shuffle) to validation, but keeps at least one for training."""
    train, val = [], []
    for perm in _class_permutations(targets, num_classes, seed):
        n_val = min(int(fraction * len(perm) + 0.5), max(len(perm) - 1, 0))
        val.append(perm[:n_val])
        train.append(perm[n_val:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def balanced_split(targets: torch.Tensor, num_classes: int, fraction: float,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(val, rest) indices, each sorted: the same number of images of every class, ``round(fraction *
    smallest class)`` (at least 1), go to validation, drawn by a seeded shuffle."""
    perms = _class_permutations(targets, num_classes, seed)
    smallest = min(len(perm) for perm in perms)
    per_class = max(1, int(fraction * smallest + 0.5))
    if per_class >= smallest:
        raise DataError(f"the test set's smallest class has {smallest} images, too few to give {per_class} per class "
                        "to validation and keep some for testing; lower data.val_fraction or use val_source=train")
    val = torch.cat([perm[:per_class] for perm in perms])
    rest = torch.cat([perm[per_class:] for perm in perms])
    return val.sort().values, rest.sort().values


def split_validation(bundle: DataBundle, cfg: DataConfig) -> DataBundle:
    """Carve ``cfg.val_fraction`` for validation: a stratified split of the long-tailed training set
    (``val_source=train``) or a balanced split of the test set (``val_source=test``), seeded by
    ``data.selection_seed``."""
    if bundle.val is not None:
        raise DataError("the dataset already has a validation split (data.val_list or a val/ folder) and "
                        "data.val_fraction asks for another; set data.val_fraction=0 or drop the val split")
    if cfg.val_source == "train":
        train_idx, val_idx = stratified_split(bundle.train.targets, bundle.num_classes, cfg.val_fraction,
                                              cfg.selection_seed)
        return dataclasses.replace(bundle, train=bundle.train.subset(train_idx), val=bundle.train.subset(val_idx))
    val_idx, test_idx = balanced_split(bundle.test.targets, bundle.num_classes, cfg.val_fraction, cfg.selection_seed)
    return dataclasses.replace(bundle, val=bundle.test.subset(val_idx), test=bundle.test.subset(test_idx))


def check_bundle(bundle: DataBundle, dataset: str) -> None:
    """Every class needs a training and a test image (a class the model never sees cannot be learnt or scored)."""
    for split, imageset in (("training", bundle.train), ("test", bundle.test)):
        empty = [name for name, count in zip(imageset.class_names, imageset.class_counts()) if count == 0]
        if empty:
            raise DataError(f"{dataset}: class {empty[0]!r} has no {split} images"
                            + (f" (nor do {len(empty) - 1} other classes)" if len(empty) > 1 else "")
                            + "; add images of it or remove the class")


def channel_stats(images: torch.Tensor) -> Stats:
    """Per-channel mean and (population) std of uint8 images in [0, 1], from exact 256-bin histograms
    (no float copy of the whole set)."""
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for channel in range(images.shape[1]):
        hist = torch.bincount(images[:, channel].reshape(-1), minlength=256).double()
        mean = (hist * levels).sum() / hist.sum()
        means.append(float(mean))
        stds.append(float(((hist * (levels - mean) ** 2).sum() / hist.sum()).sqrt()))
    return tuple(means), tuple(stds)


# ------------------------------------------------------------------ shared builder steps
def _root(cfg: DataConfig, what: str, must_exist: bool = True) -> Path:
    if cfg.root is None:
        raise DataError(f"data.dataset={cfg.dataset} needs data.root: {what}")
    root = Path(cfg.root).expanduser()
    if must_exist and not root.exists():
        raise DataError(f"data.root {root} does not exist; set it to {what}")
    return root


def _in_memory_only(cfg: DataConfig, native_size: int) -> None:
    if cfg.in_memory == "no":
        raise DataError(f"data.dataset={cfg.dataset} is always held in memory (small images); "
                        "data.in_memory=no applies to image_folder and list_files")
    if cfg.image_size is not None and cfg.image_size != native_size:
        raise DataError(f"data.image_size={cfg.image_size}: {cfg.dataset} images are {native_size}x{native_size} "
                        "and are not resized; leave data.image_size unset")


def _decode_tree(root: Path, cfg: DataConfig, size: int | None) -> Decoded:
    """An image tree or its .tar.gz archive, decoded (RGB) and cached."""
    variant = f"tree rgb size={size}"
    if is_archive(root):
        return load_or_build([root], variant, lambda: read_archive(root, 3, size), cfg.cache_dir)
    listed = checked(list_tree(root), cfg, str(root))
    return load_or_build([root], variant, lambda: _decode_listed(listed, size), cfg.cache_dir)


def checked(listed: Listed, cfg: DataConfig, source: str) -> Listed:
    """``listed`` after a header check of every file of every split (cached for the listing), with the
    images' sizes from their headers: with ``data.bad_files=fail`` unreadable files stop the run here,
    all named, before any training; with ``skip`` they are left out and listed in the log."""
    paths = [path for split_paths in listed.paths.values() for path in split_paths]
    bad, sizes = load_or_check(paths, read_headers, cfg.cache_dir)
    if not bad:
        return dataclasses.replace(listed, sizes=sizes)
    names = "\n".join(f"  {path}: {reason}" for path, reason in list(bad.items())[:SHOWN_BAD_FILES])
    more = f"\n  ... and {len(bad) - SHOWN_BAD_FILES} more" if len(bad) > SHOWN_BAD_FILES else ""
    if cfg.bad_files == "fail":
        raise DataError(f"{len(bad)} image files of {source} cannot be read:\n{names}{more}\nReplace or delete them, "
                        "or set data.bad_files=skip to leave them out (they are then listed in the log)")
    LOG.warning(f"skipping {len(bad)} unreadable image files of {source} (data.bad_files=skip):\n{names}{more}")
    kept = {split: [i for i, path in enumerate(paths) if path not in bad] for split, paths in listed.paths.items()}
    return Listed(listed.class_names, {split: [listed.paths[split][i] for i in idx] for split, idx in kept.items()},
                  {split: listed.targets[split][idx] for split, idx in kept.items()}, sizes)


def resolve_image_size(given: int | None, sizes: list[tuple[int, int]], source: str) -> tuple[int, str]:
    """(the side file images are decoded to, a note for the run header when it was chosen here):
    ``data.image_size`` when set; else the images' own size when every image is one square size (their
    pixels are then the files'); else ``DEFAULT_FILE_IMAGE_SIZE``, saying why."""
    if given is not None:
        return given, ""
    if len(sizes) == 1 and sizes[0][0] == sizes[0][1]:
        side = sizes[0][0]
        return side, f"images kept at their own size {side}x{side} (data.image_size unset, every image of {source} has it)"
    if len(sizes) == 1:
        why = f"every image is {sizes[0][0]}x{sizes[0][1]}, not square"
    elif sizes:
        why = f"images differ in size (e.g. {sizes[0][0]}x{sizes[0][1]} and {sizes[1][0]}x{sizes[1][1]})"
    else:
        why = "no image size could be read"
    return DEFAULT_FILE_IMAGE_SIZE, (f"{why} in {source}: resized and centre-cropped to {DEFAULT_FILE_IMAGE_SIZE}x"
                                     f"{DEFAULT_FILE_IMAGE_SIZE} (set data.image_size to choose)")


def _kept(listed: Listed, keep: torch.Tensor | None) -> Listed:
    """``listed`` with only the training images at ``keep``, in that order (None: all)."""
    if keep is None:
        return listed
    paths, targets = dict(listed.paths), dict(listed.targets)
    paths["train"] = [listed.paths["train"][i] for i in keep.tolist()]
    targets["train"] = listed.targets["train"][keep]
    return Listed(listed.class_names, paths, targets, listed.sizes)


def _decode_in_memory(sources: list[Path], what: str, listed: Listed, keep: torch.Tensor | None, cfg: DataConfig,
                      image_size: int, variant: str, decode: Callable[[Listed], Decoded]) -> Decoded:
    """The images of ``listed`` (training images: those at ``keep`` only) decoded at ``image_size``, after
    checking that they fit in memory; cached per source, size and selection."""
    wanted = _kept(listed, keep)
    count = sum(len(paths) for paths in wanted.paths.values())
    check_decode_fits(count, 3, image_size, what, cfg.image_size is not None)
    kept = "all" if keep is None else hashlib.sha256(keep.numpy().tobytes()).hexdigest()[:16]
    return load_or_build(sources, f"{variant} rgb size={image_size} train={kept}", lambda: decode(wanted),
                         cfg.cache_dir)


def _decode_listed(listed: Listed, size: int | None) -> Decoded:
    return Decoded(listed.class_names, {split: decode_files(paths, 3, size) for split, paths in listed.paths.items()},
                   dict(listed.targets))


def _memory_sets(decoded: Decoded) -> dict[str, ImageSet]:
    num_classes = len(decoded.class_names)
    return {split: ImageSet(decoded.targets[split], num_classes, list(decoded.class_names), images=images)
            for split, images in decoded.images.items()}


def _file_sets(listed: Listed, image_size: int) -> dict[str, ImageSet]:
    num_classes = len(listed.class_names)
    return {split: ImageSet(listed.targets[split], num_classes, list(listed.class_names), paths=paths,
                            image_size=image_size)
            for split, paths in listed.paths.items()}


def _bundle(sets: dict[str, ImageSet], train: ImageSet, stats: Stats, image_size: int, channels: int,
            image_size_note: str = "") -> DataBundle:
    """A bundle whose test split is ``test`` if present, else ``val``; with both, ``val`` is validation."""
    test = sets.get("test", sets.get("val"))
    if test is None:
        raise DataError("the dataset has no test or val split to evaluate on")
    val = sets.get("val") if "test" in sets else None
    return DataBundle(train=train, val=val, test=test, num_classes=train.num_classes,
                      class_names=list(train.class_names), mean=stats[0], std=stats[1],
                      image_size=image_size, channels=channels, image_size_note=image_size_note)


# ------------------------------------------------------------------ registered datasets
@DATASETS.register("digits_lt")
def digits_lt(cfg: DataConfig) -> DataBundle:
    """Digits-LT, the offline default: scikit-learn's 1,797 8x8 grey digits (values 0..16 -> 0..255).

    Split: per class, ``DIGITS_TEST_PER_CLASS`` = 50 images drawn by a shuffle with a fixed seed form
    the balanced test set (500 images, the same for every run); the other 124-133 per class are the
    training pool, made long-tailed by ``make_long_tailed`` (largest class ``data.max_count``, default 124).
    Mean/std are computed on the whole pool.
    """
    _in_memory_only(cfg, 8)
    decoded = read_digits()
    (everything,) = _memory_sets(decoded).values()
    test_idx = select_per_class(everything.targets, [DIGITS_TEST_PER_CLASS] * 10, "random", DIGITS_TEST_SEED)
    is_test = torch.zeros(len(everything), dtype=torch.bool)
    is_test[test_idx] = True
    pool = everything.subset(torch.nonzero(~is_test).flatten())
    test = everything.subset(test_idx.sort().values)
    return _bundle({"test": test}, make_long_tailed(pool, cfg), channel_stats(pool.images), 8, 1)


def _cifar(cfg: DataConfig, num_classes: int, stats: Stats) -> DataBundle:
    what = (f"torchvision's CIFAR-{num_classes} python folder (add data.download=true to fetch it there), "
            f"a .tar.gz of the image tree train/<class>/<image> and test/<class>/<image>, or its extracted folder")
    _in_memory_only(cfg, 32)
    root = _root(cfg, what, must_exist=not cfg.download)
    if is_archive(root) or (root / "train").is_dir():
        decoded = _decode_tree(root, cfg, None)
    else:
        decoded = read_cifar_python(root, num_classes, cfg.download)
    if len(decoded.class_names) != num_classes:
        raise DataError(f"{root} holds {len(decoded.class_names)} classes but {cfg.dataset} has {num_classes}; "
                        f"point data.root at CIFAR-{num_classes}")
    sets = _memory_sets(decoded)
    if tuple(sets["train"].images.shape[1:]) != (3, 32, 32):
        raise DataError(f"{root}: CIFAR images are 3x32x32, found {tuple(sets['train'].images.shape[1:])}")
    return _bundle(sets, make_long_tailed(sets["train"], cfg), stats, 32, 3)


@DATASETS.register("cifar10_lt")
def cifar10_lt(cfg: DataConfig) -> DataBundle:
    """CIFAR-10-LT (Cao et al. 2019): per class ``lt_counts(10, 5000, IF, profile)`` training images
    (IF=100: 5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50), the balanced 10,000-image test set."""
    return _cifar(cfg, 10, CIFAR10_STATS)


@DATASETS.register("cifar100_lt")
def cifar100_lt(cfg: DataConfig) -> DataBundle:
    """CIFAR-100-LT (Cao et al. 2019): per class ``lt_counts(100, 500, IF, profile)`` (IF=100: 10,847
    images), classes in the official fine-label (alphabetical) order, the balanced test set."""
    return _cifar(cfg, 100, CIFAR100_STATS)


@DATASETS.register("image_folder")
def image_folder(cfg: DataConfig) -> DataBundle:
    """A plain image-folder tree ``root/train/<class>/...`` with ``root/test/`` (or ``root/val/``; with
    both, ``val/`` is the validation split), or its .tar.gz. Taken as it is, unless
    ``data.imbalance_factor`` > 1 or ``data.max_count`` is set: then made long-tailed with the profile.
    Images are resized and centre-cropped to ``data.image_size``; unset, they keep their own size when
    every image has one square size, else 224 (``resolve_image_size``). Files are decoded per batch by
    loader workers unless ``data.in_memory=yes`` (archives are always decoded into memory); an in-memory
    decode reads only the training images the long-tailed selection keeps, after checking they fit."""
    root = _root(cfg, "the image folder with train/<class>/<image> and test/<class>/<image> (or a .tar.gz of it)")
    archive = is_archive(root)
    if archive and cfg.in_memory == "no":
        raise DataError(f"{root} is an archive and can only be decoded into memory; extract it to use "
                        "data.in_memory=no")
    listed = (load_or_list(root, lambda: list_archive(root), cfg.cache_dir) if archive
              else checked(list_tree(root), cfg, str(root)))
    image_size, note = resolve_image_size(cfg.image_size, listed.sizes, str(root))
    long_tailed = (cfg.imbalance_factor or 1) > 1 or cfg.max_count is not None
    if cfg.in_memory == "yes" or archive:
        keep = long_tailed_indices(listed.targets["train"], listed.class_names, cfg) if long_tailed else None
        decode = ((lambda wanted: decode_archive(root, wanted, 3, image_size)) if archive
                  else (lambda wanted: _decode_listed(wanted, image_size)))
        sets = _memory_sets(_decode_in_memory([root], str(root), listed, keep, cfg, image_size, "tree", decode))
        train = sets["train"]
    else:
        sets = _file_sets(listed, image_size)
        train = make_long_tailed(sets["train"], cfg) if long_tailed else sets["train"]
    return _bundle(sets, train, IMAGENET_STATS, image_size, 3, note)


def _list_path(value: str, root: Path, key: str) -> Path:
    """A list file as given, or relative to data.root."""
    path = Path(value).expanduser()
    for candidate in (path, root / path):
        if candidate.is_file():
            return candidate
    raise DataError(f"data.{key} {value} does not exist (looked in the working directory and in {root})")


def _names_from_paths(paths: list[str], targets: torch.Tensor, num_classes: int) -> list[str]:
    """Each label's parent folder name (ImageNet-LT's wnid, Places-LT's scene, iNaturalist's category id)
    when they are distinct across labels, else the label number."""
    names = [str(cls) for cls in range(num_classes)]
    for path, label in zip(paths, targets.tolist()):
        names[label] = Path(path).parent.name
    return names if len(set(names)) == num_classes else [str(cls) for cls in range(num_classes)]


@DATASETS.register("list_files")
def list_files(cfg: DataConfig) -> DataBundle:
    """ImageNet-LT / Places-LT / iNaturalist 2018 from their split files: ``data.train_list``,
    ``data.test_list`` (for iNaturalist 2018, its val list) and optional ``data.val_list``, one
    ``relative/path label`` per line, paths relative to ``data.root``. Naturally long-tailed: nothing is
    subsampled (imbalance_factor and profile are ignored). Files are decoded per batch by loader workers
    unless ``data.in_memory=yes``."""
    root = _root(cfg, "the image folder the list files' relative paths start from")
    if cfg.train_list is None or cfg.test_list is None:
        raise DataError("data.dataset=list_files needs data.train_list and data.test_list (for iNaturalist 2018 "
                        "use its val list as test_list); data.val_list is optional")
    lists = {split: _list_path(value, root, f"{split}_list")
             for split, value in (("train", cfg.train_list), ("val", cfg.val_list), ("test", cfg.test_list))
             if value is not None}
    read = {split: read_list_file(path, root) for split, path in lists.items()}
    num_classes = int(read["train"][1].max()) + 1
    for split, (_, labels) in read.items():
        if int(labels.max()) >= num_classes:
            raise DataError(f"{lists[split]} has label {int(labels.max())} but the training list's labels end at "
                            f"{num_classes - 1}; the lists must come from the same dataset")
    names = _names_from_paths(read["train"][0], read["train"][1], num_classes)
    listed = checked(Listed(names, {split: paths for split, (paths, _) in read.items()},
                            {split: labels for split, (_, labels) in read.items()}), cfg, "the list files")
    image_size, note = resolve_image_size(cfg.image_size, listed.sizes, "the list files")
    if cfg.in_memory == "yes":
        sets = _memory_sets(_decode_in_memory(list(lists.values()), "the list files", listed, None, cfg, image_size,
                                              f"lists root={root.resolve()}",
                                              lambda wanted: _decode_listed(wanted, image_size)))
    else:
        sets = _file_sets(listed, image_size)
    return _bundle(sets, sets["train"], IMAGENET_STATS, image_size, 3, note)


@DATASETS.register("mnist_lt")
def mnist_lt(cfg: DataConfig) -> DataBundle:
    """MNIST-LT: MNIST's idx files in ``data.root`` (or torchvision's ``root/MNIST/raw``), training set
    made long-tailed (largest class ``data.max_count``, default the smallest class, 5,421), the
    10,000-image test set as is. Mean/std are computed on the full training set."""
    _in_memory_only(cfg, 28)
    root = _root(cfg, "the folder with MNIST's idx files (train-images-idx3-ubyte[.gz], ...)",
                 must_exist=not cfg.download)
    sets = _memory_sets(read_mnist(root, cfg.download))
    train = sets["train"]
    return _bundle(sets, make_long_tailed(train, cfg), channel_stats(train.images), int(train.images.shape[-1]), 1)


def build_data(cfg: DataConfig) -> DataBundle:
    """The dataset ``cfg.dataset`` with its long-tailed profile, the validation split, and checks
    (missing folders and list files, unreadable images and empty classes each fail naming the fix)."""
    bundle = DATASETS.get(cfg.dataset)(cfg)
    if cfg.val_fraction > 0:
        bundle = split_validation(bundle, cfg)
    check_bundle(bundle, cfg.dataset)
    return bundle
