"""LADC's stage-2 sampler (registered in ``longtail.registry.SAMPLERS`` as ``ladc``)."""
from __future__ import annotations

from typing import Sequence

import torch

from longtail.data.samplers import ClassWeightedSampler
from longtail.functional import ladc_sampling_probs
from longtail.registry import SAMPLERS

__all__ = ["LADCSampler"]


@SAMPLERS.register("ladc")
class LADCSampler(ClassWeightedSampler):
    """Each class drawn with eq. 13's probability (Wang et al., AAAI 2022, ``ladc_sampling_probs``), then
    an image of the class uniformly; sharded over ranks like every registered sampler. ``per="instance"``
    (default, chosen on validation): each image weighs ``n_i^-tau``, so the class's share is proportional
    to ``n_i^(1-tau)``; ``per="class"`` (as printed): the class's share is proportional to ``n_i^-tau``.
    The paper uses tau 1.2-1.3."""

    stream = 11

    def __init__(self, targets: torch.Tensor | Sequence[int], num_classes: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_samples: int | None = None, tau: float = 1.2, per: str = "instance") -> None:
        super().__init__(targets, num_classes, seed, rank, world_size, num_samples)
        if tau < 0:
            raise ValueError(f"the ladc sampler's tau must be >= 0, got {tau}")
        ladc_sampling_probs([1], tau, per)  # reject an unknown reading at build time
        self.tau, self.per = tau, per

    def class_weights(self, epoch: int, total_epochs: int) -> torch.Tensor:
        # classes without images get a placeholder count; ClassWeightedSampler gives them probability 0
        return ladc_sampling_probs(self.counts.clamp_min(1), self.tau, self.per)
