"""Test sets under label shift (SADE's test-agnostic protocol, Zhang et al. 2022): from the balanced
test set, keep ``lt_counts`` images per class with the training profile, in the training class order
(forward-LT: head classes common at test time too) or reversed (backward-LT: the tail is common)."""
from __future__ import annotations

from typing import Literal

import torch

from longtail.data.datasets import ImageSet, select_per_class
from longtail.data.sources import DataError
from longtail.functional.data import lt_counts

__all__ = ["shifted_counts", "shifted_test_indices", "shifted_test_set"]

Direction = Literal["forward", "backward"]


def shifted_counts(per_class: int, num_classes: int, imbalance_factor: float, direction: Direction,
                   profile: str = "exp") -> list[int]:
    """Images per class of a forward- or backward-LT test set whose largest class keeps ``per_class``."""
    if direction not in ("forward", "backward"):
        raise ValueError(f"unknown direction {direction!r}; allowed: forward, backward")
    counts = lt_counts(num_classes, per_class, imbalance_factor, profile)
    return counts if direction == "forward" else counts[::-1]


def shifted_test_indices(targets: torch.Tensor, num_classes: int, imbalance_factor: float, direction: Direction,
                         seed: int = 0, profile: str = "exp") -> torch.Tensor:
    """Sorted indices of a seeded forward/backward-LT subset of a balanced test set with ``targets``
    (largest class: the smallest test class's size, so every class can give what it is asked)."""
    per_class = min(torch.bincount(targets, minlength=num_classes).tolist())
    counts = shifted_counts(per_class, num_classes, imbalance_factor, direction, profile)
    if min(counts) < 1:
        raise DataError(f"imbalance factor {imbalance_factor} leaves a class with no test image (the test set has "
                        f"{per_class} per class); use factors up to {per_class}")
    return select_per_class(targets, counts, "random", seed).sort().values


def shifted_test_set(test: ImageSet, imbalance_factor: float, direction: Direction, seed: int = 0,
                     profile: str = "exp") -> ImageSet:
    """The images of :func:`shifted_test_indices`, in test-set order."""
    return test.subset(shifted_test_indices(test.targets, test.num_classes, imbalance_factor, direction, seed,
                                            profile))
