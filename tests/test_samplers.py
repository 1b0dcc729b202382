"""Samplers: draws against hand-computed class probabilities (chi-square, fixed seeds), epoch
reproducibility, and DDP sharding checked with simulated ranks."""
import pytest
import torch
from scipy.stats import chisquare

import longtail.data  # noqa: F401  (registers the samplers)
from longtail.data.samplers import shard
from longtail.registry import SAMPLERS, ConfigError

COUNTS = [400, 100, 25, 0, 4]  # class 3 has no images
TARGETS = torch.cat([torch.full((n,), c) for c, n in enumerate(COUNTS)])[
    torch.randperm(sum(COUNTS), generator=torch.Generator().manual_seed(0))]
NAMES = ["instance", "class_balanced", "sqrt", "reversed", "progressive", "class_aware"]
PARAMS = ("num_samples", "num_samples_cls", "extra_batches")


def build(name: str, **context):
    return SAMPLERS.build(name, {k: context.pop(k) for k in PARAMS if k in context},
                          targets=TARGETS, num_classes=5, seed=3, **context)


@pytest.mark.parametrize("name, expected", [
    ("class_balanced", [1 / 4, 1 / 4, 1 / 4, 0, 1 / 4]),
    ("sqrt", [20 / 37, 10 / 37, 5 / 37, 0, 2 / 37]),             # sqrt(n) = 20, 10, 5, 0, 2
    ("reversed", [1 / 121, 4 / 121, 16 / 121, 0, 100 / 121]),    # 400/n = 1, 4, 16, -, 100
    ("progressive", [0.25 * 400 / 529 + 0.75 / 4, 0.25 * 100 / 529 + 0.75 / 4, 0.25 * 25 / 529 + 0.75 / 4, 0,
                     0.25 * 4 / 529 + 0.75 / 4]),                # epoch 3 of 4: t/T = 0.75
])
def test_class_distribution(name, expected):
    sampler = build(name, num_samples=40_000)
    assert sampler.class_probabilities(3, 4).tolist() == pytest.approx(expected, abs=1e-12)
    observed = torch.bincount(TARGETS[sampler.epoch_indices(3, 4)], minlength=5)
    assert observed[3] == 0 and observed.sum() == 40_000
    present = [0, 1, 2, 4]
    result = chisquare(observed[present].numpy(), [40_000 * expected[c] for c in present])
    assert result.pvalue > 1e-3


@pytest.mark.parametrize("per, exponent", [("class", -1.2), ("instance", -0.2)])
def test_ladc_sampler_draws_classes_by_eq13_in_both_readings(per, exponent):
    import longtail.stage2.samplers  # noqa: F401  (registers ladc)
    sampler = SAMPLERS.build("ladc", {"tau": 1.2, "per": per, "num_samples": 40_000}, targets=TARGETS,
                             num_classes=5, seed=3)
    present = [0, 1, 2, 4]
    raw = {c: COUNTS[c] ** exponent for c in present}  # class 3 has no images: never drawn
    expected = [raw.get(c, 0.0) / sum(raw.values()) for c in range(5)]
    assert sampler.class_probabilities(0, 1).tolist() == pytest.approx(expected, abs=1e-12)
    observed = torch.bincount(TARGETS[sampler.epoch_indices(0, 1)], minlength=5)
    assert observed[3] == 0 and chisquare(observed[present].numpy(), [40_000 * expected[c] for c in present]).pvalue > 1e-3
    with pytest.raises(ConfigError, match="per"):
        SAMPLERS.build("ladc", {"per": "image"}, targets=TARGETS, num_classes=5, seed=3)


def test_images_within_a_class_are_drawn_uniformly():
    sampler = build("class_balanced", num_samples=40_000)
    drawn = sampler.epoch_indices(0, 1)
    members = torch.nonzero(TARGETS == 2).flatten()
    hits = (drawn[:, None] == members[None, :]).sum(0)
    assert hits.sum() > 9_000 and chisquare(hits.numpy()).pvalue > 1e-3


def test_progressive_starts_instance_balanced():
    sampler = build("progressive")
    assert sampler.class_probabilities(0, 10).tolist() == pytest.approx([n / 529 for n in COUNTS], abs=1e-12)
    with pytest.raises(ValueError, match="0 <= epoch < total_epochs"):
        sampler.epoch_indices(10, 10)


def test_instance_sampler_shows_every_image_once_per_epoch():
    sampler = build("instance")
    first, second = sampler.epoch_indices(0, 2), sampler.epoch_indices(1, 2)
    again = build("instance").epoch_indices(0, 2)
    assert torch.equal(first.sort().values, torch.arange(529)) and torch.equal(first, again)
    assert not torch.equal(first, second) and torch.equal(second.sort().values, torch.arange(529))
    assert len(sampler) == 529
    twice = build("instance", num_samples=2 * 529).epoch_indices(0, 1)
    assert torch.bincount(twice).tolist() == [2] * 529


def test_different_seeds_or_samplers_draw_differently():
    a = SAMPLERS.build("class_balanced", {}, targets=TARGETS, num_classes=5, seed=0).epoch_indices(0, 1)
    b = SAMPLERS.build("class_balanced", {}, targets=TARGETS, num_classes=5, seed=1).epoch_indices(0, 1)
    c = SAMPLERS.build("sqrt", {}, targets=TARGETS, num_classes=5, seed=0).epoch_indices(0, 1)
    assert not torch.equal(a, b) and not torch.equal(a, c)


def test_instance_shards_are_disjoint_and_cover_the_set():
    targets = TARGETS[:528]  # 528 = 4 * 132
    shards = [SAMPLERS.build("instance", {}, targets=targets, num_classes=5, seed=3, rank=r, world_size=4)
              .epoch_indices(5, 10) for r in range(4)]
    assert all(len(s) == 132 for s in shards)
    assert torch.equal(torch.cat(shards).sort().values, torch.arange(528))
    uneven = [build("instance", rank=r, world_size=4).epoch_indices(5, 10) for r in range(4)]
    assert [len(s) for s in uneven] == [133] * 4  # 529 padded to 532 by wrapping around
    assert set(torch.cat(uneven).tolist()) == set(range(529))


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_together_draw_the_one_rank_sequence(name):
    single = build(name).epoch_indices(2, 5)
    ranks = [build(name, rank=r, world_size=2) for r in range(2)]
    parts = [sampler.epoch_indices(2, 5) for sampler in ranks]
    assert len(parts[0]) == len(parts[1]) == len(ranks[0]) == 265
    assert torch.equal(torch.stack(parts, 1).flatten()[:529], single)


def test_class_balanced_holds_on_every_rank():
    for rank in range(2):
        part = build("class_balanced", num_samples=40_000, rank=rank, world_size=2).epoch_indices(0, 1)
        observed = torch.bincount(TARGETS[part], minlength=5)[[0, 1, 2, 4]]
        assert chisquare(observed.numpy()).pvalue > 1e-3


def test_shard_pads_by_wrapping_around():
    assert shard(torch.tensor([7, 8, 9]), 0, 2).tolist() == [7, 9]
    assert shard(torch.tensor([7, 8, 9]), 1, 2).tolist() == [8, 7]


def test_bad_arguments_fail_clearly():
    with pytest.raises(ConfigError, match="unknown key data.sampler_params.power"):
        SAMPLERS.build("sqrt", {"power": 0.5}, where="data.sampler_params", targets=TARGETS, num_classes=5, seed=0)
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        build("instance", rank=2, world_size=2)
    with pytest.raises(ValueError, match=r"targets must lie in \[0, 4\)"):
        SAMPLERS.build("instance", {}, targets=TARGETS, num_classes=4, seed=0)


# ------------------------------------------------------------------ class_aware (MiSLAS's ClassAwareSampler)
def runs_of(classes: torch.Tensor, per_class: int) -> torch.Tensor:
    """(blocks, per_class) class labels of consecutive blocks."""
    return classes[:len(classes) // per_class * per_class].view(-1, per_class)


@pytest.mark.parametrize("per_class", [4, 1, 3])
def test_class_aware_takes_blocks_of_one_class_in_shuffled_class_cycles(per_class):
    drawn = build("class_aware", num_samples=4_000, num_samples_cls=per_class).epoch_indices(0, 1)
    assert len(drawn) == 4_000
    blocks = runs_of(TARGETS[drawn], per_class)
    assert bool((blocks == blocks[:, :1]).all())  # each block is one class
    # the classes with images (class 3 has none) in a reshuffled cycle: every window of 4 blocks
    # holds each class once, so 4 * per_class consecutive draws hold each class per_class times
    cycles = blocks[:len(blocks) // 4 * 4, 0].view(-1, 4)
    assert bool((cycles.sort(dim=1).values == torch.tensor([0, 1, 2, 4])).all())
    assert len({tuple(row.tolist()) for row in cycles}) > 10  # the class order is reshuffled every cycle


def test_class_aware_cycles_through_each_class_without_repeats():
    drawn = build("class_aware", num_samples=4_000).epoch_indices(1, 3)
    for c in (0, 1, 2, 4):
        members = torch.nonzero(TARGETS == c).flatten().sort().values
        sequence = drawn[TARGETS[drawn] == c]
        full = len(sequence) // len(members) * len(members)
        assert full > 0 or c == 0
        for chunk in sequence[:full].view(-1, len(members)):  # each pass is a permutation of the class
            assert torch.equal(chunk.sort().values, members)
        assert len(set(sequence[full:].tolist())) == len(sequence) - full  # a partial pass repeats nothing


def test_class_aware_replays_its_epoch_and_differs_across_epochs_and_seeds():
    sampler = build("class_aware")
    assert torch.equal(sampler.epoch_indices(2, 5), build("class_aware").epoch_indices(2, 5))
    assert not torch.equal(sampler.epoch_indices(2, 5), sampler.epoch_indices(3, 5))
    other = SAMPLERS.build("class_aware", {}, targets=TARGETS, num_classes=5, seed=4)
    assert not torch.equal(sampler.epoch_indices(2, 5), other.epoch_indices(2, 5))


def test_class_aware_epochs_are_whole_batches_and_shard_into_balanced_global_batches():
    # MiSLAS's stage-2 loop: ceil(N / B) + 1 full batches (529 images, B = 32: 17 + 1 = 18 batches)
    single = build("class_aware", extra_batches=1, batch_size=32)
    assert len(single) == 18 * 32
    assert len(build("class_aware", batch_size=32)) == 17 * 32
    assert len(build("class_aware")) == 529  # built without a batch size: N draws
    # two ranks of 16 each: ceil(529 / 32) + 1 = 18 steps per rank; together the one-rank sequence
    ranks = [build("class_aware", extra_batches=1, batch_size=16, rank=r, world_size=2) for r in range(2)]
    parts = [sampler.epoch_indices(0, 1) for sampler in ranks]
    assert len(parts[0]) == len(parts[1]) == 18 * 16
    together = torch.stack(parts, 1).flatten()
    assert torch.equal(together, single.epoch_indices(0, 1))
    step = torch.cat([parts[0][:16], parts[1][:16]])  # the global batch of the first step
    assert torch.bincount(TARGETS[step], minlength=5).tolist() == [8, 8, 8, 0, 8]
    with pytest.raises(ValueError, match="batch size"):
        build("class_aware", extra_batches=1)
    with pytest.raises(ConfigError, match="num_samples_cls"):
        build("class_aware", num_samples_cls=0)
