"""Class-count profiles, shot groups and the check of class counts every long-tailed formula uses."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["lt_counts", "shot_groups", "imbalance_factor", "checked_class_counts"]


def lt_counts(num_classes: int, max_count: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Images per class of a long-tailed set (Cao et al. 2019; the CIFAR-LT of every paper reproduced here).

    ``exp``: ``int(max_count * imbalance_factor ** (-i / (num_classes - 1)))`` for class i;
    ``step``: the first half of the classes keep ``max_count``, the rest ``int(max_count / imbalance_factor)``.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if max_count < 1:
        raise ValueError(f"max_count must be >= 1, got {max_count}")
    if imbalance_factor < 1:
        raise ValueError(f"imbalance factor is max/min class size and must be >= 1, got {imbalance_factor}")
    if profile == "exp":
        if num_classes == 1:
            return [int(max_count)]
        return [int(max_count * imbalance_factor ** (-i / (num_classes - 1))) for i in range(num_classes)]
    if profile == "step":
        head = num_classes // 2
        return [int(max_count)] * head + [int(max_count / imbalance_factor)] * (num_classes - head)
    raise ValueError(f"unknown imbalance profile {profile!r}; allowed: exp, step")


def shot_groups(class_counts: Sequence[int], many: int = 100, few: int = 20) -> dict[str, list[int]]:
    """Split classes by training-set size: many (> ``many``), medium (``few``..``many``), few (< ``few``).

    Thresholds, not fixed index ranges, so a class of exactly 20 images is medium and one of exactly
    100 is medium too (Liu et al. 2019's convention, used by the tables of every paper reproduced here).
    """
    groups: dict[str, list[int]] = {"many": [], "medium": [], "few": []}
    for cls, count in enumerate(class_counts):
        if count > many:
            groups["many"].append(cls)
        elif count < few:
            groups["few"].append(cls)
        else:
            groups["medium"].append(cls)
    return groups


def imbalance_factor(class_counts: Sequence[int]) -> float:
    """Largest over smallest class size; infinite if a class is empty."""
    counts = list(class_counts)
    smallest = min(counts)
    return float("inf") if smallest == 0 else max(counts) / smallest


def checked_class_counts(class_counts: Sequence[int] | torch.Tensor, num_classes: int | None = None, *,
                         dtype: torch.dtype = torch.float32,
                         device: torch.device | str | None = None) -> torch.Tensor:
    """Training images per class as a 1-D ``dtype`` tensor on ``device``, checked: the one check
    behind every loss, functional formula and stage-2 method that takes class counts.

    The counts must be one per class (``num_classes`` of them when given, at least one otherwise)
    and positive: a long-tailed loss or sampler divides by them or takes their logarithm, so an
    empty class has to be removed from the dataset or merged first. Positivity is checked on host
    tensors only: counts already on an accelerator are trusted (they were checked when the module
    holding them was built), so a training step never waits on the device.
    """
    if not isinstance(class_counts, (torch.Tensor, list, tuple)):
        class_counts = list(class_counts)  # any iterable: a range, a numpy array, dict values
    counts = torch.as_tensor(class_counts, dtype=dtype, device=device)
    if counts.ndim != 1 or len(counts) == 0 or (num_classes is not None and len(counts) != num_classes):
        expected = f"({num_classes},)" if num_classes is not None else "(C,) with C >= 1"
        got = (f"{len(counts)} class counts for {num_classes} classes"
               if counts.ndim == 1 and num_classes is not None else f"shape {tuple(counts.shape)}")
        raise ValueError(f"class_counts must hold one count per class, shape {expected}; got {got}")
    if counts.device.type == "cpu" and bool((counts <= 0).any()):
        empty = torch.nonzero(counts <= 0).flatten().tolist()
        raise ValueError(f"class_counts must be positive; classes {empty} have no training images, and "
                         "long-tailed losses and stage-2 methods need every class present. Remove the "
                         "empty classes from the dataset or merge them")
    return counts
