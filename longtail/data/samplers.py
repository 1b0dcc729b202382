"""Training samplers (docs/ARCHITECTURE.md, "Data"): which training images each rank sees in an epoch.

Every rank draws the same global sequence from a CPU ``torch.Generator`` seeded by (seed, epoch), so
an epoch is reproducible from the seed alone and resuming at an epoch boundary replays it exactly,
and keeps its shard ``[rank::world_size]``, padded by wrapping around to the sequence's start so all
ranks have the same length (DDP needs the same number of steps everywhere). The draws are batched
torch ops (``randperm``, ``multinomial``), never a Python loop over samples. The epoch's indices are
drawn on the CPU and copied to the training device once per epoch (``TrainLoader.set_epoch``), not
drawn there: a CPU generator gives the same sequence on every device type (a run resumed on another
machine, or the gloo DDP test against a GPU run, replays the same epoch), and one copy per epoch
leaves nothing to synchronise per step.

Class-weighted samplers draw a class from their class distribution, then an image of it uniformly:
- ``class_balanced``: every class equally likely (Kang et al. 2020, MiSLAS's class-aware stage 2);
- ``sqrt``: class probability proportional to sqrt(n_c) (Mahajan et al. 2018, as in Kang et al. 2020);
- ``reversed``: proportional to 1 / n_c (BBN's re-balancing branch, w_c = N_max / n_c normalised);
- ``progressive``: ``(1 - t/T) * n_c / N + t/T * 1/C`` at epoch t of T (Kang et al. 2020).

``class_aware`` draws no class independently: as MiSLAS's (and Kang et al.'s) ``ClassAwareSampler``
it cycles through the classes in shuffled order and takes ``num_samples_cls`` images of each class
in turn from that class's own shuffled cycle, so every run of ``num_samples_cls * C`` samples holds
each class exactly ``num_samples_cls`` times.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from longtail.registry import SAMPLERS

__all__ = ["epoch_seed", "shard", "Sampler", "InstanceSampler", "ClassWeightedSampler", "ClassBalancedSampler",
           "SqrtSampler", "ReversedSampler", "ProgressiveSampler", "ClassAwareSampler", "shuffled_cycles"]


def epoch_seed(seed: int, epoch: int, stream: int = 0) -> int:
    """A 63-bit seed for (seed, epoch, stream) from numpy's ``SeedSequence``, so neighbouring seeds and
    epochs give unrelated random streams."""
    state = np.random.SeedSequence([seed, epoch, stream]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def shard(order: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's part ``[rank::world_size]`` of ``order``, padded by wrapping around to its start so
    every rank gets ``ceil(len / world_size)`` entries."""
    per_rank = math.ceil(len(order) / world_size)
    padded = order.repeat(math.ceil(per_rank * world_size / len(order)))[:per_rank * world_size]
    return padded[rank::world_size]


class Sampler:
    """Base class: ``num_samples`` draws per epoch in all (default: the training set size), split over
    ``world_size`` ranks. Subclasses define ``global_indices``, the sequence every rank draws alike."""

    stream = 0  # keeps two samplers with the same seed (BBN's two branches) on unrelated random streams

    def __init__(self, targets: torch.Tensor | Sequence[int], num_classes: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None) -> None:
        self.targets = torch.as_tensor(targets, dtype=torch.int64).cpu()
        if self.targets.dim() != 1 or len(self.targets) == 0:
            raise ValueError(f"a sampler needs a non-empty 1-D target vector, got shape {tuple(self.targets.shape)}")
        if int(self.targets.min()) < 0 or int(self.targets.max()) >= num_classes:
            raise ValueError(f"targets must lie in [0, {num_classes}), got [{int(self.targets.min())}, "
                             f"{int(self.targets.max())}]")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if num_samples is not None and num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 (draws per epoch), got {num_samples}")
        self.num_classes = num_classes
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.num_samples = len(self.targets) if num_samples is None else num_samples
        self.counts = torch.bincount(self.targets, minlength=num_classes)

    def __len__(self) -> int:
        """Samples per rank per epoch."""
        return math.ceil(self.num_samples / self.world_size)

    def global_indices(self, epoch: int, total_epochs: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def epoch_indices(self, epoch: int, total_epochs: int) -> torch.Tensor:
        """This rank's indices into the training set for ``epoch`` (0-based) of ``total_epochs``."""
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, epoch, self.stream))
        return shard(self.global_indices(epoch, total_epochs, generator), self.rank, self.world_size)


@SAMPLERS.register("instance")
class InstanceSampler(Sampler):
    """Shuffle: every image once per epoch (``num_samples`` beyond the set size continues with fresh
    permutations, fewer stops early)."""

    stream = 1

    def global_indices(self, epoch: int, total_epochs: int, generator: torch.Generator) -> torch.Tensor:
        size = len(self.targets)
        rounds = math.ceil(self.num_samples / size)
        return torch.cat([torch.randperm(size, generator=generator) for _ in range(rounds)])[:self.num_samples]


class ClassWeightedSampler(Sampler):
    """Draw a class from ``class_probabilities``, then one of its images uniformly (with replacement)."""

    def __init__(self, targets: torch.Tensor | Sequence[int], num_classes: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None) -> None:
        super().__init__(targets, num_classes, seed, rank, world_size, num_samples)
        self.by_class = torch.argsort(self.targets, stable=True)  # image indices grouped by class
        self.class_start = torch.cumsum(self.counts, 0) - self.counts
        self.present = self.counts > 0

    def class_weights(self, epoch: int, total_epochs: int) -> torch.Tensor:
        raise NotImplementedError

    def class_probabilities(self, epoch: int, total_epochs: int) -> torch.Tensor:
        """(C,) float64 probability of drawing each class this epoch; 0 for classes with no images."""
        weights = torch.where(self.present, self.class_weights(epoch, total_epochs), 0.0)
        return weights / weights.sum()

    def global_indices(self, epoch: int, total_epochs: int, generator: torch.Generator) -> torch.Tensor:
        probs = self.class_probabilities(epoch, total_epochs)
        classes = torch.multinomial(probs, self.num_samples, replacement=True, generator=generator)
        uniform = torch.rand(self.num_samples, generator=generator, dtype=torch.float64)
        offsets = (uniform * self.counts[classes]).long()
        return self.by_class[self.class_start[classes] + offsets]


@SAMPLERS.register("class_balanced")
class ClassBalancedSampler(ClassWeightedSampler):
    """Every class equally likely."""

    stream = 2

    def class_weights(self, epoch: int, total_epochs: int) -> torch.Tensor:
        return torch.ones(self.num_classes, dtype=torch.float64)


@SAMPLERS.register("sqrt")
class SqrtSampler(ClassWeightedSampler):
    """Class probability proportional to sqrt(n_c)."""

    stream = 3

    def class_weights(self, epoch: int, total_epochs: int) -> torch.Tensor:
        return self.counts.double().sqrt()


@SAMPLERS.register("reversed")
class ReversedSampler(ClassWeightedSampler):
    """Class probability proportional to 1 / n_c (BBN)."""

    stream = 4

    def class_weights(self, epoch: int, total_epochs: int) -> torch.Tensor:
        return 1.0 / self.counts.double().clamp(min=1)


@SAMPLERS.register("progressive")
class ProgressiveSampler(ClassWeightedSampler):
    """From instance-balanced to class-balanced: ``(1 - t/T) * n_c / N + t/T * 1/C`` at epoch t of T."""

    stream = 5

    def class_weights(self, epoch: int, total_epochs: int) -> torch.Tensor:
        if total_epochs < 1 or not 0 <= epoch < total_epochs:
            raise ValueError(f"the progressive sampler needs 0 <= epoch < total_epochs, got {epoch} of {total_epochs}")
        progress = epoch / total_epochs
        instance = self.counts.double() / self.counts.sum()
        balanced = self.present.double() / self.present.sum()
        return (1 - progress) * instance + progress * balanced


def shuffled_cycles(lengths: torch.Tensor, passes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For groups of ``lengths[g]`` items, ``passes[g]`` independent random permutations each, laid end
    to end group after group: entry ``offset_g + r * lengths[g] + i`` is the i-th item (0-based, local
    to the group) of the r-th permutation of group g. One sort for all groups, no loop over them."""
    sizes = lengths.repeat_interleave(passes)  # one entry per (group, pass)
    if len(sizes) == 0:
        return torch.empty(0, dtype=torch.int64)
    block = torch.repeat_interleave(torch.arange(len(sizes)), sizes)
    keys = torch.rand(len(block), generator=generator, dtype=torch.float64)
    order = torch.argsort(block.double() + keys)  # blocks stay in place, shuffled inside
    block_start = torch.cumsum(sizes, 0) - sizes
    return order - block_start[block]


@SAMPLERS.register("class_aware")
class ClassAwareSampler(Sampler):
    """MiSLAS's ``ClassAwareSampler(num_samples_cls=4)`` (dvlab-research/MiSLAS ``datasets/sampler.py``;
    Kang et al.'s ``classifier-balancing`` has the same): a cycle over the classes, reshuffled at every
    pass, and for each class in turn ``num_samples_cls`` consecutive images of that class's own cycle
    over its images (also reshuffled at every pass). Every ``num_samples_cls * C`` consecutive draws,
    starting at a multiple of it, hold each class exactly ``num_samples_cls`` times: batches are
    balanced in blocks, not only in expectation as ``class_balanced``'s independent draws.

    The authors' iterators carry their positions from one epoch into the next; here every epoch
    starts fresh cycles from (seed, epoch), so an epoch replays exactly on ``--resume`` (the
    distribution within an epoch is the same). The global sequence is sharded ``[rank::world_size]``
    like every sampler's.

    Epoch length: ``num_samples`` draws when given; else, with the trainer's ``batch_size`` (per
    process, context), whole batches, ``ceil(N / (batch_size * world_size)) + extra_batches`` of them per
    rank (MiSLAS's stage-2 loop runs ``ceil(N / B) + 1`` full batches of its longer-than-an-epoch
    stream: ``end_steps = ceil(N / B)`` and ``if i > end_steps: break``, so ``extra_batches: 1``);
    without a batch size, N draws (N = the training-set size).
    """

    stream = 6

    def __init__(self, targets: torch.Tensor | Sequence[int], num_classes: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None, num_samples_cls: int = 4,
                 extra_batches: int = 0, batch_size: int | None = None) -> None:
        if num_samples_cls < 1:
            raise ValueError(f"num_samples_cls must be >= 1 (images of a class in a row), got {num_samples_cls}")
        if extra_batches < 0:
            raise ValueError(f"extra_batches must be >= 0, got {extra_batches}")
        if num_samples is None and batch_size is not None:
            per_step = batch_size * world_size
            num_samples = (math.ceil(len(targets) / per_step) + extra_batches) * per_step
        elif extra_batches:
            raise ValueError("extra_batches counts whole batches and needs the trainer's batch size; it cannot be "
                             "combined with num_samples")
        super().__init__(targets, num_classes, seed, rank, world_size, num_samples)
        self.num_samples_cls = num_samples_cls
        self.extra_batches = extra_batches
        self.by_class = torch.argsort(self.targets, stable=True)  # image indices grouped by class
        self.class_start = torch.cumsum(self.counts, 0) - self.counts
        self.present = torch.nonzero(self.counts > 0).flatten()

    def global_indices(self, epoch: int, total_epochs: int, generator: torch.Generator) -> torch.Tensor:
        per_class = self.num_samples_cls
        blocks = math.ceil(self.num_samples / per_class)
        # the class cycle: shuffled passes over the classes that have images
        passes = math.ceil(blocks / len(self.present))
        cycle = torch.rand(passes, len(self.present), generator=generator).argsort(dim=1).flatten()[:blocks]
        block_class = self.present[cycle]
        # how many blocks each class already had before each block (its position in its own cycle)
        blocks_of = torch.bincount(block_class, minlength=self.num_classes)
        grouped = torch.argsort(block_class, stable=True)
        first = torch.cumsum(blocks_of, 0) - blocks_of
        before = torch.empty(blocks, dtype=torch.int64)
        before[grouped] = torch.arange(blocks) - first[block_class[grouped]]
        # each class's own cycle: enough shuffled passes over its images for its blocks
        counts = self.counts.clamp(min=1)
        class_passes = (blocks_of * per_class + counts - 1) // counts
        cycles = shuffled_cycles(counts, class_passes, generator)
        cycle_start = torch.cumsum(class_passes * counts, 0) - class_passes * counts
        position = before[:, None] * per_class + torch.arange(per_class)  # (blocks, per_class) in the cycle
        image = cycles[cycle_start[block_class, None] + position]
        return self.by_class[self.class_start[block_class, None] + image].flatten()[:self.num_samples]
