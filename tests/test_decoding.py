"""JPEG decoding on the training device (data.decode_on_device) on real CIFAR-10 JPEGs re-encoded at
varied, non-square sizes: the batches equal the worker-decoded ones pixel for pixel on the CPU (same
libjpeg-turbo, same seeded crops), odd files are handled or named, and the setting is checked."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import longtail.data  # noqa: F401  (registers the samplers)
from longtail.config import DataConfig
from longtail.data import build_data
from longtail.data.decoding import decode_views, use_device_decoding
from longtail.data.loaders import EvalLoader, TrainLoader
from longtail.data.sources import DataError
from longtail.registry import SAMPLERS

CLASSES = ("airplane", "cat", "ship")
SIZES = ((40, 56), (64, 48), (33, 33), (80, 30))  # (height, width), cycled over the images


def keep_pixels(images, targets, generator, epoch):
    """Stand-in augmentation: the decoded pixels unchanged, so tests compare the decoders' output."""
    return images, targets, None, None


@pytest.fixture(scope="module")
def varied_tree(cifar10_small, tmp_path_factory):
    """train/ and test/ of three classes; every image resized to one of SIZES and re-encoded as JPEG,
    the cat images in greyscale (decode_jpeg and PIL must both expand them to RGB)."""
    root = tmp_path_factory.mktemp("varied") / "tree"
    for split in ("train", "test"):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for number, path in enumerate(sorted((cifar10_small["tree"] / split / name).glob("*.jpg"))[:12]):
                height, width = SIZES[number % len(SIZES)]
                image = Image.open(path).convert("L" if name == "cat" else "RGB").resize((width, height))
                image.save(root / split / name / path.name, quality=90)
    return root


@pytest.fixture(scope="module")
def varied(varied_tree):
    return build_data(DataConfig(dataset="image_folder", root=str(varied_tree), imbalance_factor=1, image_size=24))


def sampler_for(imageset):
    return SAMPLERS.build("instance", {}, targets=imageset.targets, num_classes=imageset.num_classes, seed=3)


def epochs_of(imageset, decode, workers, random_crop=True):
    loader = TrainLoader(imageset, sampler_for(imageset), 8, keep_pixels, "cpu", seed=0, num_workers=workers,
                         random_resized_crop=random_crop, decode_on_device=decode)
    batches = []
    for epoch in (0, 1):
        loader.set_epoch(epoch, 2)
        batches += list(loader)
    return loader, batches


@pytest.mark.parametrize("random_crop", [True, False])
def test_device_decoding_gives_the_worker_decoded_batches(varied, random_crop):
    worker_loader, on_workers = epochs_of(varied.train, "no", 0, random_crop)
    device_loader, on_device = epochs_of(varied.train, "yes", 2, random_crop)
    assert not worker_loader.files.on_device and device_loader.files.on_device
    assert len(on_device) == len(on_workers) == 8  # 36 images in batches of 8, two epochs
    for a, b in zip(on_workers, on_device):
        assert b.images.shape == (8, 3, 24, 24) and b.images.dtype == torch.uint8
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.targets, b.targets) and torch.equal(a.indices, b.indices)
    assert not torch.equal(on_device[0].images, on_device[4].images)  # epochs draw new indices and crops


def test_device_decoding_of_the_evaluation_view(varied):
    outputs = []
    for decode in ("no", "yes"):
        loader = EvalLoader(varied.test, 10, lambda images: images, "cpu", rank=0, world_size=1, decode_on_device=decode)
        outputs.append(torch.cat([images for images, _ in loader]))
    assert outputs[0].shape == (30, 3, 24, 24)  # 10 test images per class
    assert torch.equal(outputs[0], outputs[1])


def test_a_png_named_jpg_still_decodes_and_garbage_is_named(varied_tree, tmp_path):
    data = [torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)
            for path in sorted((varied_tree / "train" / "ship").glob("*.jpg"))[:2]]
    png = tmp_path / "really_a.png.jpg"
    Image.fromarray(np.full((20, 30, 3), 200, np.uint8)).save(png, format="PNG")
    data.append(torch.frombuffer(bytearray(png.read_bytes()), dtype=torch.uint8))
    names = ["a.jpg", "b.jpg", str(png)]
    views = decode_views(data, names, [None, 7, None], 16, torch.device("cpu"))
    assert views.shape == (3, 3, 16, 16) and bool((views[2] == 200).all())
    garbage = torch.frombuffer(bytearray(b"\xff\xd8\xff but then nothing of a jpeg"), dtype=torch.uint8)
    with pytest.raises(DataError, match=r"cannot decode image .*broken.jpg.*replace it"):
        decode_views([data[0], garbage], ["a.jpg", "/data/train/cat/broken.jpg"], [None, None], 16,
                     torch.device("cpu"))


def test_a_corrupt_file_is_named_by_the_device_decoding_loader(varied_tree, tmp_path):
    root = tmp_path / "tree"
    shutil.copytree(varied_tree, root)
    data = build_data(DataConfig(dataset="image_folder", root=str(root), imbalance_factor=1, image_size=24))
    (root / "train" / "cat" / "0004.jpg").write_bytes(b"not a jpeg at all")
    loader = EvalLoader(data.train, 64, lambda images: images, "cpu", decode_on_device="yes")
    with pytest.raises(DataError, match=r"cannot decode image .*train/cat/0004.jpg"):
        list(loader)


def test_the_setting_is_checked(varied):
    paths = varied.train.paths
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_device_decoding("auto", paths, cuda) and not use_device_decoding("auto", paths, cpu)
    assert use_device_decoding("yes", paths, cpu) and not use_device_decoding("no", paths, cuda)
    mixed = paths + ["/data/train/cat/scan.png"]
    assert not use_device_decoding("auto", mixed, cuda)  # auto leaves sets with other formats to the workers
    with pytest.raises(DataError, match=r"decode_on_device=yes decodes JPEG files only, and .*scan.png is not"):
        use_device_decoding("yes", mixed, cpu)
    with pytest.raises(Exception, match="decode_on_device"):
        DataConfig(decode_on_device="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="nvJPEG needs a CUDA device")
def test_nvjpeg_matches_the_host_decoder_within_a_grey_level(varied):
    paths = varied.train.paths
    data = [torch.frombuffer(bytearray(open(path, "rb").read()), dtype=torch.uint8) for path in paths]
    on_gpu = decode_views(data, paths, [None] * len(paths), 24, torch.device("cuda")).cpu()
    on_host = decode_views(data, paths, [None] * len(paths), 24, torch.device("cpu"))
    difference = (on_gpu.float() - on_host.float()).abs()
    assert difference.mean() < 1.0 and difference.max() <= 16
