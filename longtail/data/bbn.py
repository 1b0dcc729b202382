"""BBN's paired batches (Zhou et al., CVPR 2020, "BBN: Bilateral-Branch Network with Cumulative
Learning for Long-Tailed Visual Recognition", Fig. 3): the data side of ``longtail.models.bbn``.

Kept beside BBN rather than in ``longtail.data.loaders``, so the generic loaders know nothing of
BBN: this module builds on ``TrainLoader`` and ``bbn_alpha`` (``longtail.functional``), and nothing
generic imports it.
"""
from __future__ import annotations

from typing import Iterator

import torch

from longtail.data.loaders import TrainLoader
from longtail.functional import bbn_alpha
from longtail.types import Batch

__all__ = ["PairedLoader"]


class PairedLoader:
    """BBN's paired batches (``data.pair_sampler``): each batch of the ``first`` loader (the uniform
    sampler) with a batch of the ``second`` (the reversed sampler) appended, ``[x_first; x_second]``.
    Targets are the first batch's labels, ``mix_targets`` the second's, and ``mix_weight`` BBN's
    cumulative alpha of the epoch (``bbn_alpha``; Zhou et al. 2020, Fig. 3 and its cumulative
    learning strategy), the weight the model gives the first branch, so the batch loss is
    ``alpha L(y_first) + (1 - alpha) L(y_second)``."""

    def __init__(self, first: TrainLoader, second: TrainLoader) -> None:
        self.first, self.second = first, second
        self.batch_size = first.batch_size
        self.alpha = 1.0

    def set_epoch(self, epoch: int, total_epochs: int) -> None:
        self.first.set_epoch(epoch, total_epochs)
        self.second.set_epoch(epoch, total_epochs)
        self.alpha = bbn_alpha(epoch, total_epochs)

    def __len__(self) -> int:
        return min(len(self.first), len(self.second))

    @property
    def samples_per_epoch(self) -> int:
        """Uniform-branch samples per epoch (each step also trains on as many reversed-sampler ones)."""
        return min(self.first.samples_per_epoch, self.second.samples_per_epoch)

    def __iter__(self) -> Iterator[Batch]:
        for a, b in zip(self.first, self.second):
            weight = torch.full_like(a.targets, self.alpha, dtype=torch.float32)
            yield Batch(images=torch.cat([a.images, b.images]), targets=a.targets, indices=a.indices,
                        mix_targets=b.targets, mix_weight=weight)
