"""Shared fixtures: the real data in ../shared/data and a small real CIFAR-10 subset made from it."""
import os
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL_TRAIN_PER_CLASS = 30
SMALL_TEST_PER_CLASS = 10


@pytest.fixture(scope="session", autouse=True)
def decoded_data_cache(tmp_path_factory):
    """Decoded-dataset caches go to a temporary folder, not ~/.cache, unless $LONGTAIL_CACHE is set
    (set it to reuse decoded archives between test runs)."""
    with pytest.MonkeyPatch.context() as patch:
        if not os.environ.get("LONGTAIL_CACHE"):
            patch.setenv("LONGTAIL_CACHE", str(tmp_path_factory.mktemp("longtail-cache")))
        yield Path(os.environ["LONGTAIL_CACHE"])


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors (Digits-LT): intra-op threads only add overhead (and spin on a loaded CPU)."""
    import torch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real datasets beside the repo ($LONGTAIL_SHARED_DATA, default ../shared/data)."""
    folder = Path(os.environ.get("LONGTAIL_SHARED_DATA", REPO.parent / "shared" / "data"))
    if not (folder / "cifar10_jpg.tar.gz").is_file():
        pytest.skip(f"real data not found in {folder} (cifar10_jpg.tar.gz); set LONGTAIL_SHARED_DATA to its folder")
    return folder


@pytest.fixture(scope="session")
def cifar10_small(shared_data, tmp_path_factory) -> dict[str, Path]:
    """Real CIFAR-10 images: the first 30 train and 10 test images of every class, as an extracted tree
    (``tree``: train/<class>/NNNN.jpg, test/<class>/NNNN.jpg) and as a .tar.gz of it (``archive``)."""
    folder = tmp_path_factory.mktemp("cifar10_small")
    tree = folder / "tree"
    keep = {"train": SMALL_TRAIN_PER_CLASS, "test": SMALL_TEST_PER_CLASS}
    with tarfile.open(shared_data / "cifar10_jpg.tar.gz", "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 3 and int(Path(parts[2]).stem) < keep[parts[0]]:
                target = tree.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.extractfile(member).read())
    packed = folder / "cifar10_small.tar.gz"
    with tarfile.open(packed, "w:gz") as archive:
        for split in ("train", "test"):
            archive.add(tree / split, arcname=split)
    return {"tree": tree, "archive": packed}


def pack(root: Path, archive: Path) -> Path:
    """A .tar.gz of the image tree ``root/train``, ``root/test`` (members train/..., test/...)."""
    with tarfile.open(archive, "w:gz") as handle:
        for split in ("train", "test"):
            handle.add(root / split, arcname=split)
    return archive


# Digits-LT at imbalance factor 100 (124 ... 1 training images a class, 288 in all; balanced test set of 50
# a class; six of the ten classes are few-shot), the MLP for 10 epochs: the long tail of the behavioural tests.
LONG_TAIL = ["device=cpu", "data.imbalance_factor=100", "train.epochs=10", "model.params.hidden=[64]",
             "train.eval_every=0"]


@pytest.fixture(scope="session")
def long_tail_ce(tmp_path_factory):
    """One plain cross-entropy run on ``LONG_TAIL`` (seed 0), the baseline every method family is
    compared with and the stage 1 of the stage-2 tests: (config, run_dir, last test metrics)."""
    import torch
    from longtail.commands.train import train_stage1
    from longtail.config import load_config
    from longtail.engine.distributed import init_distributed
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run_dir = tmp_path_factory.mktemp("long_tail_ce")
        config = load_config(None, LONG_TAIL)
        results = train_stage1(config, run_dir, init_distributed("cpu"))
    finally:
        torch.set_num_threads(threads)
    return config, run_dir, results["last"]["test"]


def balanced_accuracy(metrics: dict) -> float:
    """Mean per-class accuracy of a metrics dict (classes absent from the split left out)."""
    per_class = [a for a in metrics["per_class_top1"] if a is not None]
    return sum(per_class) / len(per_class)
