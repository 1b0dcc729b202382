"""Loaders on real data (digits in memory, real CIFAR-10 JPEG files): batches follow the sampler,
epochs replay exactly from (seed, epoch), evaluation shards reassemble, file decoding is the same
with or without workers."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

import longtail.data  # noqa: F401  (registers the samplers)
from longtail.config import AugmentConfig, DataConfig
from longtail.data import build_data
from longtail.data.augment import BatchAugment
from longtail.data.loaders import EvalLoader, TrainLoader, batch_bounds, eval_shard
from longtail.models.small import mlp
from longtail.registry import SAMPLERS


def stand_in_augment(images, targets, generator, epoch):
    """Returns the pixels unchanged (as float) and one draw per image from the generator as the mix
    weight, so a test sees both the batch and the random stream."""
    draws = torch.rand(len(images), generator=generator, device=images.device)
    return images.float(), targets, targets.flip(0), draws


def sampler_for(imageset, name="instance", **context):
    return SAMPLERS.build(name, {}, targets=imageset.targets, num_classes=imageset.num_classes, seed=5, **context)


def collect(loader, epoch, total=3):
    loader.set_epoch(epoch, total)
    return list(loader)


@pytest.fixture(scope="module")
def digits():
    return build_data(DataConfig())


def test_in_memory_batches_follow_the_sampler(digits):
    train = digits.train
    sampler = sampler_for(train)
    loader = TrainLoader(train, sampler, 32, stand_in_augment, "cpu", seed=0)
    assert len(train) == 503 and len(loader) == 15  # the last 23 samples are dropped
    batches = collect(loader, 1)
    order = sampler.epoch_indices(1, 3)[:15 * 32].view(15, 32)
    assert len(batches) == 15
    for batch, indices in zip(batches, order):
        assert torch.equal(batch.indices, indices)
        assert torch.equal(batch.images, train.images[indices].float())
        assert torch.equal(batch.targets, train.targets[indices])
        assert torch.equal(batch.mix_targets, train.targets[indices].flip(0))


def test_the_last_partial_batch_is_kept_or_dropped(digits):
    train = digits.train  # 503 images: 15 batches of 32 and 23 left
    sampler = sampler_for(train)
    kept = TrainLoader(train, sampler, 32, stand_in_augment, "cpu", seed=0, drop_last=False)
    dropped = TrainLoader(train, sampler, 32, stand_in_augment, "cpu", seed=0, drop_last=True)
    assert (len(kept), kept.samples_per_epoch) == (16, 503) and (len(dropped), dropped.samples_per_epoch) == (15, 480)
    batches = collect(kept, 1)
    assert [len(b.targets) for b in batches] == [32] * 15 + [23]
    assert torch.equal(torch.cat([b.indices for b in batches]), sampler.epoch_indices(1, 3))
    assert all(torch.equal(a.images, b.images) for a, b in zip(batches, collect(dropped, 1)))


def test_a_last_batch_of_one_joins_the_batch_before_it(digits):
    # 503 = 2 x 251 + 1: the single sample would meet BatchNorm1d alone in train mode, which cannot
    # normalise it; it is merged into the second batch (251 + 1), so it is still trained on
    assert batch_bounds(503, 251, drop_last=False) == [(0, 251), (251, 503)]
    assert batch_bounds(503, 251, drop_last=True) == [(0, 251), (251, 502)]
    assert batch_bounds(503, 251, drop_last=False, merge_single=False) == [(0, 251), (251, 502), (502, 503)]
    assert batch_bounds(10, 4, drop_last=False) == [(0, 4), (4, 8), (8, 10)]
    loader = TrainLoader(digits.train, sampler_for(digits.train), 251, stand_in_augment, "cpu", seed=0,
                         drop_last=False)
    batches = collect(loader, 0)
    assert len(loader) == 2 and [len(b.targets) for b in batches] == [251, 252]
    model = mlp(num_classes=10, in_channels=1, image_size=8).train()  # Digits-LT's: BatchNorm1d per layer
    for batch in batches:
        model(batch.images.float()).logits.sum().backward()  # no error: no batch of one
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        model(batches[0].images[:1].float())  # what a kept batch of one would have met


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_get_equal_batches_with_or_without_the_last_partial_one(digits, drop_last):
    # 503 images over 2 ranks: 252 each (the shard wraps around by one), batches of 16 per rank:
    # 15 full + 12 left, kept (16 steps) or dropped (15) alike on both ranks, so DDP never waits
    ranks = [TrainLoader(digits.train, sampler_for(digits.train, rank=r, world_size=2), 16, stand_in_augment,
                         "cpu", seed=0, drop_last=drop_last) for r in range(2)]
    sizes = [[len(b.targets) for b in collect(loader, 2)] for loader in ranks]
    assert sizes[0] == sizes[1] == [16] * 15 + ([] if drop_last else [12])
    assert len(ranks[0]) == len(ranks[1]) == len(sizes[0])


def test_an_epoch_replays_exactly_after_a_restart(digits):
    augment = BatchAugment(AugmentConfig(cutout=4), digits.mean, digits.std)
    running = TrainLoader(digits.train, sampler_for(digits.train, "class_balanced"), 64, augment, "cpu", seed=1)
    for epoch in range(2):
        collect(running, epoch)
    continued = collect(running, 2)
    resumed = TrainLoader(digits.train, sampler_for(digits.train, "class_balanced"), 64, augment, "cpu", seed=1)
    replayed = collect(resumed, 2)
    assert len(continued) == len(replayed) == 7
    for a, b in zip(continued, replayed):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
    assert a.images.dtype == torch.float32 and a.images.shape == (64, 1, 8, 8)
    other_epoch = collect(resumed, 1)
    assert not torch.equal(other_epoch[0].images, replayed[0].images)


def test_augmentation_draws_follow_seed_and_epoch(digits):
    def draws(seed, epoch):
        loader = TrainLoader(digits.train, sampler_for(digits.train), 100, stand_in_augment, "cpu", seed=seed)
        return torch.cat([batch.mix_weight for batch in collect(loader, epoch)])
    assert torch.equal(draws(0, 1), draws(0, 1))
    assert not torch.equal(draws(0, 1), draws(0, 2)) and not torch.equal(draws(0, 1), draws(1, 1))


def test_loader_misuse_fails_clearly(digits):
    loader = TrainLoader(digits.train, sampler_for(digits.train), 32, stand_in_augment, "cpu", seed=0)
    with pytest.raises(RuntimeError, match="call TrainLoader.set_epoch"):
        next(iter(loader))
    with pytest.raises(ValueError, match="batch size 600 is larger than the 503 training samples"):
        TrainLoader(digits.train, sampler_for(digits.train), 600, stand_in_augment, "cpu", seed=0)


def gather(parts: list[torch.Tensor], total: int) -> torch.Tensor:
    """What engine.distributed.gather_rows does with the ranks' outputs."""
    return torch.stack(parts, dim=1).reshape(-1, *parts[0].shape[1:])[:total]


@pytest.mark.parametrize("world_size", [1, 3, 7])
def test_eval_shards_have_equal_batches_and_reassemble(digits, world_size):
    test = digits.test
    normalize = lambda images: images.float() / 255  # noqa: E731
    outputs = []
    for rank in range(world_size):
        loader = EvalLoader(test, 64, normalize, "cpu", rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader) == -(-len(eval_shard(500, rank, world_size)) // 64)
        outputs.append((torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])))
    assert len({len(images) for images, _ in outputs}) == 1
    assert torch.equal(gather([images for images, _ in outputs], 500), test.images.float() / 255)
    assert torch.equal(gather([targets for _, targets in outputs], 500), test.targets)


def test_eval_shard_pads_with_the_last_sample():
    assert eval_shard(5, 0, 3).tolist() == [0, 3] and eval_shard(5, 2, 3).tolist() == [2, 4]
    assert eval_shard(5, 1, 3).tolist() == [1, 4]


# ------------------------------------------------------------------ file datasets (real CIFAR-10 JPEGs)
@pytest.fixture(scope="module")
def cifar_files(cifar10_small):
    # 24, not the images' own 32: an image of the asked size is kept as it is (tests/test_own_images.py)
    return build_data(DataConfig(dataset="image_folder", root=str(cifar10_small["tree"]), imbalance_factor=1,
                                 image_size=24))


def eval_view(path: str) -> torch.Tensor:
    """Resize the shorter side to 24 / 0.875 = 27 (rounded), centre-crop 24: torchvision on a PIL decode."""
    image = torch.from_numpy(np.asarray(Image.open(path).convert("RGB")).copy()).permute(2, 0, 1)
    return v2.CenterCrop(24)(v2.Resize(27, antialias=True)(image))


def test_file_eval_loader_decodes_the_evaluation_view(cifar_files):
    test = cifar_files.test
    loader = EvalLoader(test, 32, lambda images: images, "cpu", rank=1, world_size=2)
    images = torch.cat([b[0] for b in loader])
    shard = eval_shard(len(test), 1, 2)
    assert images.dtype == torch.uint8 and len(images) == len(shard) == 50
    expected = torch.stack([eval_view(test.paths[i]) for i in shard.tolist()])
    assert torch.equal(images, expected)


def test_file_train_loader_without_random_crops_uses_the_evaluation_view(cifar_files):
    train = cifar_files.train
    sampler = sampler_for(train)
    loader = TrainLoader(train, sampler, 64, stand_in_augment, "cpu", seed=0, random_resized_crop=False)
    (first, *_) = collect(loader, 0)
    assert torch.equal(first.indices, sampler.epoch_indices(0, 3)[:64])
    assert torch.equal(first.images, torch.stack([eval_view(train.paths[i]) for i in first.indices]).float())
    assert torch.equal(first.targets, train.targets[first.indices])


def test_random_resized_crops_do_not_depend_on_workers(cifar_files):
    train = cifar_files.train
    epochs = []
    for workers in (0, 2):
        loader = TrainLoader(train, sampler_for(train), 50, stand_in_augment, "cpu", seed=0, num_workers=workers,
                             random_resized_crop=True)
        assert len(loader) == 6
        epochs.append([collect(loader, epoch) for epoch in (0, 1)])
    for a, b in zip(epochs[0][0] + epochs[0][1], epochs[1][0] + epochs[1][1]):
        assert torch.equal(a.images, b.images) and torch.equal(a.indices, b.indices)
    crop = epochs[0][0][0].images
    assert crop.shape == (50, 3, 24, 24)
    plain = torch.stack([eval_view(train.paths[i]) for i in epochs[0][0][0].indices]).float()
    assert not torch.equal(crop, plain)


def test_random_resized_crop_follows_the_augment_config(cifar_files):
    augment = BatchAugment(AugmentConfig(random_resized_crop=True, crop_padding=0), cifar_files.mean, cifar_files.std)
    loader = TrainLoader(cifar_files.train, sampler_for(cifar_files.train), 50, augment, "cpu", seed=0)
    batch = collect(loader, 0)[0]
    assert loader.random_resized_crop and batch.images.shape == (50, 3, 24, 24)
    assert batch.images.dtype == torch.float32
