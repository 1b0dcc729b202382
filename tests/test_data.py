"""Datasets on small real data: scikit-learn's digits, real CIFAR-10 images (a subset of the shared
JPEG archive, extracted and re-packed), MNIST idx files written from the digits; the full shared
archives in the slow tests."""
import gzip
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from longtail.config import DataConfig
from longtail.data import DataError, build_data
from longtail.data import datasets as datasets_module
from longtail.data.datasets import (CIFAR10_STATS, CIFAR100_STATS, balanced_split, channel_stats,
                                    select_per_class, stratified_split)
from longtail.registry import ConfigError
from conftest import pack

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def pil_rgb(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)


def image_keys(images: torch.Tensor) -> set[bytes]:
    return {image.numpy().tobytes() for image in images}


# ------------------------------------------------------------------ digits
def scaled_digits() -> tuple[np.ndarray, np.ndarray]:
    digits = load_digits()
    return np.rint(digits.images * 255 / 16).astype(np.uint8), digits.target


def test_digits_lt_is_a_balanced_test_set_plus_a_long_tailed_pool():
    bundle = build_data(DataConfig())  # the offline default: digits_lt, IF 10, exp profile
    assert bundle.train_counts == [124, 96, 74, 57, 44, 34, 26, 20, 16, 12]  # int(124 * 10 ** (-i / 9))
    assert bundle.test.class_counts() == [50] * 10
    assert bundle.val is None and bundle.channels == 1 and bundle.image_size == 8
    assert bundle.train.images.dtype == torch.uint8 and bundle.train.images.shape[1:] == (1, 8, 8)
    images, labels = scaled_digits()
    known = {(image.tobytes(), int(label)) for image, label in zip(images, labels)}
    for split in (bundle.train, bundle.test):
        assert {(image.numpy().tobytes(), int(label)) for image, label in zip(split.images, split.targets)} <= known
    test_keys = image_keys(bundle.test.images)
    assert not image_keys(bundle.train.images) & test_keys  # the 1,797 digits are all distinct
    pool = np.stack([image for image in images if image.tobytes() not in test_keys]) / 255.0
    assert bundle.mean == pytest.approx((pool.mean(),), abs=1e-9)
    assert bundle.std == pytest.approx((pool.std(),), abs=1e-9)


def test_digits_test_set_does_not_depend_on_the_selection_seed():
    a, b = build_data(DataConfig()), build_data(DataConfig(selection_seed=1, profile="step", imbalance_factor=4))
    assert torch.equal(a.test.images, b.test.images)
    assert b.train_counts == [124] * 5 + [31] * 5
    assert not torch.equal(a.train.images[:124], b.train.images[:124])  # another shuffle keeps other images


# ------------------------------------------------------------------ long-tailed selection
def test_random_selection_is_cao_et_al_per_class_shuffle():
    labels = np.random.RandomState(5).randint(0, 4, 200)
    counts = [30, 20, 10, 5]
    np.random.seed(0)  # LDAM-DRW's IMBALANCECIFAR.gen_imbalanced_data, written out
    expected = []
    for cls, count in enumerate(counts):
        idx = np.where(labels == cls)[0]
        np.random.shuffle(idx)
        expected.extend(idx[:count].tolist())
    assert select_per_class(torch.as_tensor(labels), counts, "random", 0).tolist() == expected
    first = [i for cls, count in enumerate(counts) for i in np.where(labels == cls)[0][:count].tolist()]
    assert select_per_class(torch.as_tensor(labels), counts, "first").tolist() == first
    assert select_per_class(torch.as_tensor(labels), counts, "random", 1).tolist() != expected


def test_profile_that_does_not_fit_names_the_class_and_the_fix():
    message = r"class '0' has 128 training images .* asks for 150; lower data.max_count \(at most 124"
    with pytest.raises(DataError, match=message):
        build_data(DataConfig(max_count=150, imbalance_factor=1))
    with pytest.raises(DataError, match=r"leaves class '7' with 0 images"):  # int(5 * 10 ** (-7 / 9)) = 0
        build_data(DataConfig(max_count=5, imbalance_factor=10))


# ------------------------------------------------------------------ CIFAR from archives, trees, torchvision folders
def small_cifar(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="cifar10_lt", root=str(root), max_count=30, imbalance_factor=10, **kw)


def test_cifar10_lt_archive_and_tree_give_the_same_long_tailed_set(cifar10_small):
    from_archive = build_data(small_cifar(cifar10_small["archive"]))
    from_tree = build_data(small_cifar(cifar10_small["tree"]))
    counts = [30, 23, 17, 13, 10, 8, 6, 5, 3, 3]  # int(30 * 10 ** (-i / 9))
    assert from_archive.train_counts == counts and from_archive.test.class_counts() == [10] * 10
    assert from_archive.class_names == CLASSES
    assert (from_archive.mean, from_archive.std) == CIFAR10_STATS
    for split in ("train", "test"):
        assert torch.equal(getattr(from_archive, split).images, getattr(from_tree, split).images)
        assert torch.equal(getattr(from_archive, split).targets, getattr(from_tree, split).targets)
    rng = np.random.RandomState(0)  # Cao et al.'s shuffle of each class's files, in class order
    kept = []
    for cls, name in enumerate(CLASSES):
        order = np.arange(30)
        rng.shuffle(order)
        kept += [pil_rgb(cifar10_small["tree"] / "train" / name / f"{i:04d}.jpg") for i in order[:counts[cls]]]
    assert torch.equal(from_archive.train.images, torch.stack(kept))


def test_first_selection_keeps_the_first_files(cifar10_small):
    bundle = build_data(small_cifar(cifar10_small["tree"], selection="first"))
    birds = bundle.train.images[bundle.train.targets == 2]
    expected = [pil_rgb(cifar10_small["tree"] / "train" / "bird" / f"{i:04d}.jpg") for i in range(17)]
    assert torch.equal(birds, torch.stack(expected))


def test_torchvision_cifar_python_folder(cifar10_small, tmp_path, monkeypatch):
    """torchvision's pickled batches, written from the real subset; torchvision checks its files'
    md5 sums against the official download, which a re-packed subset cannot match, so that one check
    is switched off."""
    import torchvision.datasets.cifar

    tree = build_data(small_cifar(cifar10_small["tree"], selection="first"))
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def dump(name, split):
        files = sorted((cifar10_small["tree"] / split).glob("*/*.jpg"))
        data = np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1).reshape(-1) for f in files])
        labels = [CLASSES.index(f.parent.name) for f in files]
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": data, "labels": labels}, handle)

    dump("data_batch_1", "train")
    for name in ("data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"):
        with open(folder / name, "wb") as handle:
            pickle.dump({"data": np.zeros((0, 3072), np.uint8), "labels": []}, handle)
    dump("test_batch", "test")
    with open(folder / "batches.meta", "wb") as handle:
        pickle.dump({"label_names": CLASSES}, handle)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    for root in (folder, tmp_path):  # the folder itself or its parent
        bundle = build_data(small_cifar(root, selection="first"))
        assert bundle.class_names == CLASSES
        assert torch.equal(bundle.train.images, tree.train.images)
        assert torch.equal(bundle.test.images, tree.test.images)


# ------------------------------------------------------------------ validation splits
def test_stratified_validation_split_of_the_long_tailed_training_set():
    full = build_data(DataConfig())
    bundle = build_data(DataConfig(val_fraction=0.2))
    assert bundle.val.class_counts() == [25, 19, 15, 11, 9, 7, 5, 4, 3, 2]  # round(0.2 * n)
    assert [t + v for t, v in zip(bundle.train_counts, bundle.val.class_counts())] == full.train_counts
    assert image_keys(bundle.train.images) | image_keys(bundle.val.images) == image_keys(full.train.images)
    assert not image_keys(bundle.train.images) & image_keys(bundle.val.images)
    assert torch.equal(bundle.test.images, full.test.images)


def test_stratified_split_keeps_one_training_image_per_class():
    targets = torch.tensor([0] + [1] * 2 + [2] * 10)
    train, val = stratified_split(targets, 3, 0.9, seed=0)
    assert torch.bincount(targets[train], minlength=3).tolist() == [1, 1, 1]
    assert torch.bincount(targets[val], minlength=3).tolist() == [0, 1, 9]
    assert sorted(train.tolist() + val.tolist()) == list(range(13))


def test_validation_from_the_test_set_is_balanced():
    full = build_data(DataConfig())
    bundle = build_data(DataConfig(val_fraction=0.3, val_source="test"))
    assert bundle.val.class_counts() == [15] * 10 and bundle.test.class_counts() == [35] * 10
    assert bundle.train_counts == full.train_counts
    assert image_keys(bundle.val.images) | image_keys(bundle.test.images) == image_keys(full.test.images)
    with pytest.raises(DataError, match="too few"):
        balanced_split(torch.tensor([0, 1, 1]), 2, 0.5)


# ------------------------------------------------------------------ file datasets
def test_image_folder_as_files_natural_or_long_tailed(cifar10_small):
    natural = build_data(DataConfig(dataset="image_folder", root=str(cifar10_small["tree"]), imbalance_factor=1))
    assert natural.train.images is None and natural.train_counts == [30] * 10
    assert natural.train.image_size == natural.image_size == 32 and natural.channels == 3  # every image is 32x32
    assert "own size 32x32" in natural.image_size_note
    first = natural.train.paths[0]
    assert first == str(cifar10_small["tree"] / "train" / "airplane" / "0000.jpg")
    lt = build_data(DataConfig(dataset="image_folder", root=str(cifar10_small["tree"]), imbalance_factor=10,
                               image_size=64))
    assert lt.train_counts == [30, 23, 17, 13, 10, 8, 6, 5, 3, 3] and lt.image_size == 64
    assert all(Path(p).is_file() for p in lt.train.paths)


def test_image_folder_val_folder_is_the_validation_split(cifar10_small, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(cifar10_small["tree"], root)
    shutil.copytree(root / "test", root / "val")
    bundle = build_data(DataConfig(dataset="image_folder", root=str(root), imbalance_factor=1))
    assert bundle.val.class_counts() == bundle.test.class_counts() == [10] * 10
    assert "/val/" in bundle.val.paths[0] and "/test/" in bundle.test.paths[0]


def write_lists(tree: Path, folder: Path) -> dict[str, str]:
    """ImageNet-LT-style split files over the subset: class c keeps 30 - 3c training images."""
    lines = {"train": [], "test": []}
    for cls, name in enumerate(CLASSES):
        lines["train"] += [f"train/{name}/{i:04d}.jpg {cls}" for i in range(30 - 3 * cls)]
        lines["test"] += [f"test/{name}/{i:04d}.jpg {cls}" for i in range(10)]
    paths = {}
    for split, content in lines.items():
        paths[split] = str(folder / f"Subset_LT_{split}.txt")
        Path(paths[split]).write_text("\n".join(content) + "\n")
    return paths


def test_list_files_keep_their_natural_long_tail(cifar10_small, tmp_path):
    lists = write_lists(cifar10_small["tree"], tmp_path)
    cfg = DataConfig(dataset="list_files", root=str(cifar10_small["tree"]), train_list=lists["train"],
                     test_list=lists["test"], image_size=32)
    bundle = build_data(cfg)
    assert bundle.train_counts == [30 - 3 * c for c in range(10)] and bundle.test.class_counts() == [10] * 10
    assert bundle.class_names == CLASSES  # from the images' parent folders
    assert bundle.train.paths[1] == str(cifar10_small["tree"] / "train" / "airplane" / "0001.jpg")
    in_memory = build_data(cfg.model_copy(update={"in_memory": "yes"}))
    assert in_memory.train.images.shape == (sum(bundle.train_counts), 3, 32, 32)
    assert torch.equal(in_memory.train.targets, bundle.train.targets)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as handle:
        handle.write(header + array.astype(np.uint8).tobytes())


def test_mnist_lt_from_idx_files(tmp_path):
    images, labels = scaled_digits()  # real digits in MNIST's idx format (8x8 instead of 28x28)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images[:1500])
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels[:1500])
    write_idx(tmp_path / "t10k-images-idx3-ubyte", images[1500:])
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", labels[1500:])
    bundle = build_data(DataConfig(dataset="mnist_lt", root=str(tmp_path), imbalance_factor=5, selection="first"))
    smallest = int(np.bincount(labels[:1500]).min())
    assert bundle.train_counts == [int(smallest * 5 ** (-i / 9)) for i in range(10)]
    assert torch.equal(bundle.test.images[:, 0], torch.from_numpy(images[1500:]))
    assert torch.equal(bundle.train.images[0, 0], torch.from_numpy(images[:1500][labels[:1500] == 0][0]))
    assert bundle.mean == pytest.approx((images[:1500].mean() / 255,)) and bundle.image_size == 8
    assert bundle.std == pytest.approx((images[:1500].std() / 255,))


def test_channel_stats_match_numpy():
    images = torch.randint(0, 256, (7, 3, 5, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    mean, std = channel_stats(images)
    array = images.numpy() / 255.0
    assert mean == pytest.approx(tuple(array.mean(axis=(0, 2, 3))), abs=1e-12)
    assert std == pytest.approx(tuple(array.std(axis=(0, 2, 3))), abs=1e-12)


# ------------------------------------------------------------------ checks with clear errors
def corrupt_tree(cifar10_small, tmp_path) -> Path:
    root = tmp_path / "tree"
    shutil.copytree(cifar10_small["tree"], root)
    (root / "train" / "cat" / "0003.jpg").write_bytes(b"not a jpeg at all")
    return root


def test_corrupt_image_is_named_in_a_tree_and_in_an_archive(cifar10_small, tmp_path):
    root = corrupt_tree(cifar10_small, tmp_path)
    with pytest.raises(DataError, match=r"cannot be read:\n  .*tree/train/cat/0003.jpg: .*\nReplace or delete them"):
        build_data(small_cifar(root))
    archive = pack(root, tmp_path / "broken.tar.gz")
    with pytest.raises(DataError, match=r"broken.tar.gz:train/cat/0003.jpg"):
        build_data(small_cifar(archive))


def test_empty_class_is_named(cifar10_small, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(cifar10_small["tree"], root)
    (root / "train" / "zebra").mkdir()
    (root / "test" / "zebra").mkdir()
    with pytest.raises(DataError, match=r"image_folder: class 'zebra' has no training images; add images"):
        build_data(DataConfig(dataset="image_folder", root=str(root), imbalance_factor=1))


@pytest.mark.parametrize("update, message", [
    ({"dataset": "cifar10_lt"}, "cifar10_lt needs data.root"),
    ({"dataset": "cifar100_lt", "root": "/nonexistent/cifar100"}, "data.root /nonexistent/cifar100 does not exist"),
    ({"dataset": "mnist_lt", "root": "."}, "MNIST file train-images-idx3-ubyte"),
    ({"dataset": "image_folder", "root": "."}, "has no train/ folder"),
    ({"dataset": "list_files", "root": ".", "train_list": "x.txt"}, "needs data.train_list and data.test_list"),
    ({"dataset": "list_files", "root": ".", "train_list": "missing.txt", "test_list": "missing.txt"},
     "data.train_list missing.txt does not exist"),
    ({"in_memory": "no"}, "digits_lt is always held in memory"),
    ({"image_size": 32}, "are not resized"),
])
def test_configuration_errors_name_the_problem(update, message):
    with pytest.raises(DataError, match=message):
        build_data(DataConfig(**update))


def test_unknown_dataset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="unknown dataset 'cifar11_lt'.*cifar10_lt"):
        build_data(DataConfig(dataset="cifar11_lt"))


def test_list_errors_name_the_line_and_missing_images(cifar10_small, tmp_path):
    lists = write_lists(cifar10_small["tree"], tmp_path)
    with open(lists["train"], "a") as handle:
        handle.write("train/cat/9999.jpg 3\n")
    cfg = DataConfig(dataset="list_files", root=str(cifar10_small["tree"]), train_list=lists["train"],
                     test_list=lists["test"])
    with pytest.raises(DataError, match=r"1 image files of the list files cannot be read:\n  .*9999.jpg: missing"):
        build_data(cfg)
    Path(lists["train"]).write_text("train/cat/0000.jpg three\n")
    with pytest.raises(DataError, match=r"Subset_LT_train.txt:1: expected 'relative/path label'"):
        build_data(cfg)


def test_torchvision_download_archive_is_explained(tmp_path):
    source = tmp_path / "cifar-10-batches-py"
    source.mkdir()
    (source / "data_batch_1").write_bytes(b"\0" * 10)
    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as handle:
        handle.add(source, arcname="cifar-10-batches-py")
    with pytest.raises(DataError, match="does not hold an image tree.*must be extracted"):
        build_data(DataConfig(dataset="cifar10_lt", root=str(tmp_path / "cifar-10-python.tar.gz")))


def test_two_validation_splits_are_refused(cifar10_small, tmp_path):
    lists = write_lists(cifar10_small["tree"], tmp_path)
    cfg = DataConfig(dataset="list_files", root=str(cifar10_small["tree"]), train_list=lists["train"],
                     test_list=lists["test"], val_list=lists["test"], val_fraction=0.1)
    with pytest.raises(DataError, match="already has a validation split"):
        build_data(cfg)


# ------------------------------------------------------------------ cache
def test_cache_is_reused_and_invalidated_by_a_changed_source(cifar10_small, tmp_path, monkeypatch):
    archive = tmp_path / "small.tar.gz"
    shutil.copy(cifar10_small["archive"], archive)
    cfg = small_cifar(archive, cache_dir=str(tmp_path / "cache"))
    first = build_data(cfg)
    (cached,) = (tmp_path / "cache").iterdir()
    assert cached.suffix == ".pt" and not list((tmp_path / "cache").glob(".*.tmp"))

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again although the cache is current")

    monkeypatch.setattr(datasets_module, "read_archive", must_not_decode)
    assert torch.equal(build_data(cfg).train.images, first.train.images)
    monkeypatch.undo()
    cached.write_bytes(b"damaged")
    with pytest.warns(UserWarning, match="unreadable cache"):
        assert torch.equal(build_data(cfg).train.images, first.train.images)
    monkeypatch.setattr(datasets_module, "read_archive", must_not_decode)
    assert torch.equal(build_data(cfg).train.images, first.train.images)  # rewritten
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    with pytest.raises(AssertionError, match="decoded again"):
        build_data(cfg)


# ------------------------------------------------------------------ the full shared archives
@pytest.mark.slow
def test_cifar10_lt_if100_from_the_real_archive(shared_data):
    bundle = build_data(DataConfig(dataset="cifar10_lt", root=str(shared_data / "cifar10_jpg.tar.gz"),
                                   imbalance_factor=100))
    assert bundle.train_counts == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]
    assert bundle.test.class_counts() == [1000] * 10 and bundle.class_names == CLASSES
    assert bundle.train.images.shape == (12406, 3, 32, 32)


@pytest.mark.slow
def test_cifar100_lt_if100_from_the_real_archive(shared_data):
    root = str(shared_data / "cifar100_png.tar.gz")
    bundle = build_data(DataConfig(dataset="cifar100_lt", root=root, imbalance_factor=100))
    assert sum(bundle.train_counts) == 10847 and bundle.train_counts[0] == 500 and bundle.train_counts[-1] == 5
    assert bundle.class_names[:3] == ["apple", "aquarium_fish", "baby"] and len(bundle.class_names) == 100
    assert bundle.test.class_counts() == [100] * 100 and (bundle.mean, bundle.std) == CIFAR100_STATS
    full = build_data(DataConfig(dataset="cifar100_lt", root=root, imbalance_factor=1))  # decoded once, cached
    mean, std = channel_stats(full.train.images)
    assert mean == pytest.approx(CIFAR100_STATS[0], abs=1e-4)  # the lossless PNGs keep the official statistics
    assert std == pytest.approx(CIFAR100_STATS[1], abs=1e-4)
