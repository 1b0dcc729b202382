"""Readers of datasets in their own on-disk formats (docs/ARCHITECTURE.md, "Data"): scikit-learn's digits,
image-folder trees, ``.tar.gz`` archives of such trees, torchvision's CIFAR python folders, list
files (``relative/path label``) and MNIST idx files.

Readers only read: they return every split decoded to uint8 (``Decoded``) or as file paths
(``Listed``) with class names, and never subsample. Long-tailed profiles, splits and caching live in
``longtail.data.datasets`` and ``longtail.data.cache``.

Images are decoded with PIL, serially: on the CIFAR-10 archive (60,000 32x32 JPEGs, ~7 s on one
core) a thread pool was 1.5x slower (the GIL dominates on tiny images). ``torchvision.io`` decodes
the same pixels 3.5x faster but is deprecated since torchvision 0.29 in favour of TorchCodec (not a
dependency), and ``longtail.data.cache`` makes the decoding a one-time cost per source anyway.
"""
from __future__ import annotations

import gzip
import io
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

__all__ = ["DataError", "Decoded", "Listed", "ARCHIVE_SUFFIXES", "is_archive", "decode_bytes", "read_image_file",
           "resize_center_crop", "file_image_view", "decode_files", "read_digits", "read_archive", "list_archive",
           "decode_archive", "list_tree", "read_cifar_python", "read_list_file", "unreadable_files", "read_headers",
           "read_mnist", "read_idx"]

ARCHIVE_SUFFIXES = (".tar.gz", ".tgz")
SPLIT_NAMES = ("train", "val", "test")
EVAL_CROP_FRACTION = 0.875  # resize the shorter side to size / 0.875, then centre-crop (ImageNet's 256 -> 224)


class DataError(RuntimeError):
    """Data on disk is missing, unreadable or inconsistent; the message names the file and the fix."""


@dataclass
class Decoded:
    """Every split of one source decoded in memory: uint8 images (N, C, H, W) and int64 targets."""

    class_names: list[str]
    images: dict[str, torch.Tensor]
    targets: dict[str, torch.Tensor]

    def to_state(self) -> dict:
        return {"class_names": list(self.class_names), "images": dict(self.images), "targets": dict(self.targets)}

    @classmethod
    def from_state(cls, state: dict) -> "Decoded":
        return cls(list(state["class_names"]), dict(state["images"]), dict(state["targets"]))


@dataclass
class Listed:
    """Every split of one source as image files (or archive members): paths and int64 targets, and
    ``sizes``, the distinct (width, height) of the images as their headers say (at most
    ``SIZES_KEPT``: enough to tell one size from several), empty when the headers were not read."""

    class_names: list[str]
    paths: dict[str, list[str]]
    targets: dict[str, torch.Tensor]
    sizes: list[tuple[int, int]] = field(default_factory=list)


SIZES_KEPT = 2


def is_archive(path: Path) -> bool:
    return path.name.endswith(ARCHIVE_SUFFIXES)


# ------------------------------------------------------------------ decoding
def decode_bytes(data: bytes, name: str, channels: int = 3) -> torch.Tensor:
    """Encoded image bytes -> uint8 (channels, H, W); ``name`` (a path, or archive:member) goes in the error."""
    mode = "RGB" if channels == 3 else "L"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode in WIDE_GREY_MODES:  # PIL's convert() clips these at 255 instead of scaling
                image = Image.fromarray(_to_uint8(np.asarray(image), image.mode))
            array = np.asarray(image if image.mode == mode else image.convert(mode))
    except Image.DecompressionBombError as error:  # not an OSError: PIL's guard against huge images
        raise DataError(f"cannot decode image {name}: {error} It is far larger than any training image; "
                        "shrink it or leave it out") from None
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise DataError(f"cannot decode image {name}: {error}. The file is corrupt or not an image; "
                        "replace it (re-extract or re-download the dataset) or delete it") from None
    array = array[:, :, None] if array.ndim == 2 else array
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """16-bit grey levels (PIL's ``I;16*``, and ``I``, which is how PIL opens 16-bit PNGs) scaled to
    0..255 (x / 257, so 65535 -> 255), not clipped."""
    return np.clip(np.rint(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)


def read_image_file(path: str | Path, channels: int = 3) -> torch.Tensor:
    """Read and decode one image file to uint8 (channels, H, W)."""
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise DataError(f"cannot read image {path}: {error.strerror}; check the file exists and is readable") from None
    return decode_bytes(data, str(path), channels)


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view of a file image: shorter side to ``size / 0.875``, centre ``size`` x ``size``.
    An image that already is ``size`` x ``size`` is returned as it is: its pixels are the file's, not a
    zoom of its centre."""
    if tuple(image.shape[-2:]) == (size, size):
        return image
    image = TF.resize(image, [round(size / EVAL_CROP_FRACTION)], antialias=True)
    return TF.center_crop(image, [size, size])


def file_image_view(image: torch.Tensor, size: int, crop_seed: int | None) -> torch.Tensor:
    """A file image's ``size`` x ``size`` view: the evaluation view when ``crop_seed`` is None, else an
    Inception-style RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3) drawn from ``crop_seed`` alone, so
    a view does not depend on which worker, process or device cuts it."""
    if crop_seed is None:
        return resize_center_crop(image, size)
    with torch.random.fork_rng(devices=[]):  # torchvision draws from the global generator
        torch.manual_seed(crop_seed)
        top, left, height, width = RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
    return TF.resized_crop(image, top, left, height, width, [size, size], antialias=True)


class _Filler:
    """Decoded images written one by one into a preallocated uint8 (N, C, H, W) tensor, so a decode
    holds the final tensor plus one image, never a list of every image and its stacked copy. Without
    ``size`` the first image gives (H, W) and every other image must match it."""

    def __init__(self, count: int, channels: int, size: int | None, where: str) -> None:
        self.count, self.channels, self.size, self.where = count, channels, size, where
        self.out: torch.Tensor | None = None
        self.first = ""

    def put(self, row: int, image: torch.Tensor, name: str) -> None:
        if self.size is not None:
            image = resize_center_crop(image, self.size)
        if self.out is None:
            self.out = torch.empty((self.count, *image.shape), dtype=torch.uint8)
            self.first = name
        elif image.shape != self.out.shape[1:]:
            raise DataError(f"images in {self.where} differ in size ({self.first} is {tuple(self.out.shape[1:])}, "
                            f"{name} is {tuple(image.shape)}); set data.image_size to resize them to one size")
        self.out[row] = image

    def result(self) -> torch.Tensor:
        if self.out is None:
            side = self.size or 0
            return torch.empty((0, self.channels, side, side), dtype=torch.uint8)
        return self.out


def decode_files(paths: list[str], channels: int = 3, size: int | None = None) -> torch.Tensor:
    """Decode image files into one uint8 (N, C, H, W) tensor, resized and centre-cropped when ``size`` is
    set (an image already ``size`` x ``size`` is kept as it is)."""
    filler = _Filler(len(paths), channels, size, "the image folder")
    for row, path in enumerate(paths):
        filler.put(row, read_image_file(path, channels), path)
    return filler.result()


# ------------------------------------------------------------------ scikit-learn digits
def read_digits() -> Decoded:
    """scikit-learn's bundled 1,797 8x8 digits (values 0..16 scaled to 0..255) as one split ``"all"``."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return Decoded([str(d) for d in range(10)], {"all": torch.from_numpy(images)},
                   {"all": torch.as_tensor(digits.target, dtype=torch.int64)})


# ------------------------------------------------------------------ image-folder trees
def _split_and_class(parts: tuple[str, ...]) -> tuple[str, str] | None:
    """(split, class) of an archive member ``[prefix/]split/class/.../file``, or None if it is not one."""
    for i, part in enumerate(parts[:-2]):
        if part in SPLIT_NAMES:
            return part, parts[i + 1]
    return None


def _archive_error(path: Path, error: BaseException) -> DataError:
    return DataError(f"cannot read archive {path}: {error}. It is truncated or not a .tar.gz; "
                     "copy it again or point data.root at the extracted folder")


def _image_members(path: Path, visit: Callable[[tarfile.TarFile, tarfile.TarInfo, tuple[str, str]], None]) -> list[str]:
    """Call ``visit(archive, member, (split, class))`` for every image member of the archive, in one
    sequential pass; return the names of the other files (for the error when there is no tree)."""
    other_members: list[str] = []
    try:
        with tarfile.open(path, "r:gz") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                where = _split_and_class(tuple(member.name.split("/")))
                if where is None or not member.name.lower().endswith(IMG_EXTENSIONS):
                    other_members.append(member.name)
                    continue
                visit(archive, member, where)
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, OSError) as error:
        raise _archive_error(path, error) from None
    return other_members


def _member_bytes(archive: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = archive.extractfile(member)
    return handle.read() if handle is not None else b""


def list_archive(path: Path) -> Listed:
    """The image tree inside a ``.tar.gz`` (``[prefix/]train/<class>/<file>``, ``test/...``, optionally
    ``val/...``) without decoding pixels: member names per split (``paths``), targets and the images'
    sizes from their headers. Class index = sorted folder name of ``train/``; members are sorted by name
    within a class (as ``ImageFolder`` on the extracted tree). A member whose header cannot be read is
    named here, before anything is decoded."""
    found: dict[str, list[tuple[str, str]]] = {}
    sizes: list[tuple[int, int]] = []

    def visit(archive: tarfile.TarFile, member: tarfile.TarInfo, where: tuple[str, str]) -> None:
        name = f"{path}:{member.name}"
        try:
            with Image.open(io.BytesIO(_member_bytes(archive, member))) as image:
                size = image.size
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            raise DataError(f"cannot decode image {name}: {error}. The file is corrupt or not an image; "
                            "replace it (re-extract or re-download the dataset) or delete it") from None
        if size not in sizes and len(sizes) < SIZES_KEPT:
            sizes.append(size)
        found.setdefault(where[0], []).append((where[1], member.name))

    other_members = _image_members(path, visit)
    if "train" not in found or ("test" not in found and "val" not in found):
        example = ", ".join(other_members[:3]) or "(no files)"
        raise DataError(f"archive {path} does not hold an image tree train/<class>/<image> and test/<class>/<image> "
                        f"(it holds e.g. {example}). torchvision's own CIFAR download must be extracted and "
                        "data.root set to the extracted folder")
    class_names = sorted({cls for cls, _ in found["train"]})
    index = {name: i for i, name in enumerate(class_names)}
    listed = Listed(class_names, {}, {}, sizes)
    for split, items in found.items():
        unknown = sorted({cls for cls, _ in items} - set(index))
        if unknown:
            raise DataError(f"archive {path}: {split}/ has classes that train/ lacks: {', '.join(unknown[:5])}; "
                            "every split needs the same class folders")
        items.sort(key=lambda item: (index[item[0]], item[1]))
        listed.paths[split] = [name for _, name in items]
        listed.targets[split] = torch.tensor([index[cls] for cls, _ in items], dtype=torch.int64)
    return listed


def decode_archive(path: Path, listed: Listed, channels: int = 3, size: int | None = None) -> Decoded:
    """Decode the members ``listed`` names (per split, in its order; e.g. only the images a long-tailed
    selection keeps) in one sequential pass over the archive, each written straight into its split's
    preallocated tensor; resized and centre-cropped when ``size`` is set."""
    rows = {split: {name: row for row, name in enumerate(names)} for split, names in listed.paths.items()}
    fillers = {split: _Filler(len(names), channels, size, f"archive {path}") for split, names in listed.paths.items()}
    seen = {split: 0 for split in listed.paths}

    def visit(archive: tarfile.TarFile, member: tarfile.TarInfo, where: tuple[str, str]) -> None:
        row = rows.get(where[0], {}).get(member.name)
        if row is None:
            return
        name = f"{path}:{member.name}"
        fillers[where[0]].put(row, decode_bytes(_member_bytes(archive, member), name, channels), name)
        seen[where[0]] += 1

    _image_members(path, visit)
    missing = [split for split, names in listed.paths.items() if seen[split] != len(names)]
    if missing:
        raise DataError(f"archive {path} changed while it was read ({missing[0]}/ lacks members it listed); "
                        "run again once it is complete")
    return Decoded(list(listed.class_names), {split: filler.result() for split, filler in fillers.items()},
                   dict(listed.targets))


def read_archive(path: Path, channels: int = 3, size: int | None = None) -> Decoded:
    """Decode every image of a ``.tar.gz`` image tree (``list_archive``, then ``decode_archive``)."""
    return decode_archive(path, list_archive(path), channels, size)


def list_tree(root: Path) -> Listed:
    """List an image-folder tree ``root/train/<class>/...`` plus ``root/test/`` and/or ``root/val/``
    with torchvision's ``find_classes``/``make_dataset`` (sorted classes, sorted files)."""
    if not (root / "train").is_dir():
        raise DataError(f"{root} has no train/ folder; an image-folder dataset needs root/train/<class>/<image> "
                        "and root/test/<class>/<image> (or root/val/...)")
    class_names, class_to_idx = find_classes(root / "train")
    listed = Listed(class_names, {}, {})
    for split in SPLIT_NAMES:
        folder = root / split
        if not folder.is_dir():
            continue
        if split != "train":
            extra = sorted(set(find_classes(folder)[0]) - set(class_names))
            if extra:
                raise DataError(f"{folder} has class folders that {root / 'train'} lacks: {', '.join(extra[:5])}; "
                                "every split needs the same class folders")
        samples = make_dataset(folder, class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        listed.paths[split] = [path for path, _ in samples]
        listed.targets[split] = torch.tensor([target for _, target in samples], dtype=torch.int64)
    if "test" not in listed.paths and "val" not in listed.paths:
        raise DataError(f"{root} has train/ but neither test/ nor val/; add the evaluation images as "
                        "root/test/<class>/<image>")
    return listed


# ------------------------------------------------------------------ torchvision CIFAR folders
CIFAR_FOLDERS = {10: "cifar-10-batches-py", 100: "cifar-100-python"}


def read_cifar_python(root: Path, num_classes: int, download: bool = False) -> Decoded:
    """torchvision's CIFAR-10/100 python folder (``root`` is the folder or its parent), read with
    ``torchvision.datasets.CIFAR10/100``; downloads only when ``download`` is set."""
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset_cls = CIFAR10 if num_classes == 10 else CIFAR100
    parent = root.parent if root.name == CIFAR_FOLDERS[num_classes] else root
    decoded = Decoded([], {}, {})
    for split, train in (("train", True), ("test", False)):
        try:
            dataset = dataset_cls(str(parent), train=train, download=download)
        except RuntimeError as error:
            raise DataError(f"cannot read torchvision's CIFAR-{num_classes} folder under {parent}: {error} "
                            f"(expected {parent / CIFAR_FOLDERS[num_classes]}; set data.download=true to fetch it)"
                            ) from None
        decoded.class_names = list(dataset.classes)
        decoded.images[split] = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()
        decoded.targets[split] = torch.as_tensor(dataset.targets, dtype=torch.int64)
    return decoded


# ------------------------------------------------------------------ list files
def read_list_file(list_file: Path, image_root: Path) -> tuple[list[str], torch.Tensor]:
    """Read ``relative/path label`` lines (ImageNet-LT, Places-LT, iNaturalist 2018 split files);
    paths are joined to ``image_root``."""
    paths: list[str] = []
    labels: list[int] = []
    with open(list_file, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            fields = line.rsplit(maxsplit=1)
            if len(fields) != 2 or not fields[1].lstrip("-").isdigit() or int(fields[1]) < 0:
                raise DataError(f"{list_file}:{number}: expected 'relative/path label' with a label >= 0, "
                                f"got {line.strip()!r}")
            paths.append(str(image_root / fields[0].lstrip("/")))
            labels.append(int(fields[1]))
    if not paths:
        raise DataError(f"list file {list_file} is empty; it needs one 'relative/path label' line per image")
    return paths, torch.tensor(labels, dtype=torch.int64)


def read_headers(paths: Iterable[str]) -> tuple[dict[str, str], list[tuple[int, int]]]:
    """(every file whose image header PIL cannot read (missing, unreadable, not an image, or a header
    that ends early) with the reason, the distinct (width, height) of the readable ones, at most
    ``SIZES_KEPT``). PIL reads the format and size without decoding the pixels, so this is fast enough
    to run over every file before training instead of failing hours into it."""
    bad: dict[str, str] = {}
    sizes: list[tuple[int, int]] = []
    for path in paths:
        try:
            with Image.open(path) as image:
                size = image.size  # parsed with the header
        except FileNotFoundError:
            bad[path] = "missing"
            continue
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
            bad[path] = str(error) or type(error).__name__
            continue
        if size not in sizes and len(sizes) < SIZES_KEPT:
            sizes.append(size)
    return bad, sizes


def unreadable_files(paths: Iterable[str]) -> dict[str, str]:
    """Every file whose image header PIL cannot read, with the reason (``read_headers``)."""
    return read_headers(paths)[0]


# ------------------------------------------------------------------ MNIST idx files
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: Path) -> np.ndarray:
    """An idx file of unsigned bytes (LeCun's MNIST format: 2 zero bytes, type 0x08, rank, big-endian
    32-bit dimensions, then the data), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            data = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}; download the MNIST idx files again") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path} is not an idx file of unsigned bytes (magic {data[:4].hex()}); "
                        "expected the original MNIST idx files")
    rank = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(rank)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * rank)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path} is truncated: header says {dims} ({int(np.prod(dims))} bytes), "
                        f"found {body.size}; download it again")
    return body.reshape(dims)


def _find_idx(root: Path, stem: str) -> Path:
    for folder in (root, root / "MNIST" / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"MNIST file {stem}[.gz] not found in {root} or {root / 'MNIST' / 'raw'}; put the four idx "
                    "files there or set data.download=true")


def read_mnist(root: Path, download: bool = False) -> Decoded:
    """MNIST from its idx files (``train-images-idx3-ubyte`` etc., optionally ``.gz``) in ``root`` or in
    torchvision's ``root/MNIST/raw``; ``download`` fetches them there with torchvision."""
    if download:
        from torchvision.datasets import MNIST
        MNIST(str(root), train=True, download=True)
    decoded = Decoded([str(d) for d in range(10)], {}, {})
    for split, (image_stem, label_stem) in MNIST_FILES.items():
        images = read_idx(_find_idx(root, image_stem))
        labels = read_idx(_find_idx(root, label_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"MNIST {split} files in {root} disagree: images {images.shape}, labels {labels.shape}")
        decoded.images[split] = torch.from_numpy(images.copy())[:, None]
        decoded.targets[split] = torch.from_numpy(labels.astype(np.int64))
    return decoded
