"""Class-count profiles and shot groups (DESIGN.md, "The public functional contract")."""
from __future__ import annotations

from typing import Sequence

__all__ = ["lt_counts", "shot_groups", "imbalance_factor"]


def lt_counts(num_classes: int, max_count: int, imbalance_factor: float, profile: str = "exp") -> list[int]:
    """Images per class of a long-tailed set (Cao et al. 2019, used by every seed's CIFAR-LT).

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
    100 is medium too (Liu et al. 2019's convention, used by every seed's tables).
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
