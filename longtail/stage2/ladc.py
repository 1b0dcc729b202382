"""LADC's feature bank: Gaussians of the head classes and, for every tail instance, its calibrated
Gaussian (Wang et al., AAAI 2022, eq. 1-12), from which stage 2 draws tail features.

Storing each head class's covariance as a D x D matrix takes H * D^2 floats (ResNet-50 features:
16 MiB a class). The covariance is kept as ``Sigma = F F^T + diag(v)``:

- ``full``: F from the eigendecomposition of Sigma (exact), v = 0;
- ``lowrank``: F the top-``rank`` principal directions of the class's centred features (randomised
  SVD), v the remaining variance of each dimension, so every marginal variance stays exact;
- ``diagonal``: no F, v the per-dimension variances.

``auto`` takes the most exact form whose factors fit the memory budget, and says which it took.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from longtail.engine.logging import LOG
from longtail.functional import (ladc_class_statistics, ladc_neighbours, ladc_posterior_mean,
                                 ladc_sample_calibrated)

__all__ = ["COVARIANCE_KINDS", "memory_budget", "choose_covariance", "log_choice", "head_gaussians", "TailGaussians"]

COVARIANCE_KINDS = ("auto", "full", "lowrank", "diagonal")
BYTES_PER_FLOAT = 4
NEIGHBOUR_CHUNK = 8192  # tail instances per distance computation (bounds the (chunk, H) matrix)


def memory_budget(device: torch.device, fraction: float = 0.25) -> int:
    """Bytes the covariance factors may take by default: a quarter of the free device memory (CUDA)
    or of the available host memory."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(fraction * free)
    return int(fraction * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def choose_covariance(kind: str, heads: int, dim: int, rank: int, budget_bytes: int) -> str:
    """``kind`` itself, or for ``auto`` the most exact representation within ``budget_bytes``."""
    if kind not in COVARIANCE_KINDS:
        raise ValueError(f"unknown covariance {kind!r}; allowed: {', '.join(COVARIANCE_KINDS)}")
    if kind != "auto":
        return kind
    if heads * dim * dim * BYTES_PER_FLOAT <= budget_bytes:
        return "full"
    if heads * dim * (rank + 1) * BYTES_PER_FLOAT <= budget_bytes:
        return "lowrank"
    return "diagonal"


def head_gaussians(features: torch.Tensor, targets: torch.Tensor, head_classes: Sequence[int], kind: str,
                   rank: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Means (H, D) and covariance factors (H, D, r) and variances (H, D) of the head classes (eq. 1-3)
    in the representation ``kind`` (full, lowrank or diagonal), one class at a time."""
    dim = features.shape[1]
    width = {"full": dim, "lowrank": min(rank, dim), "diagonal": 0}[kind]
    means, factors, variances = [], [], []
    for cls in head_classes:
        factor = features.new_zeros(dim, width)
        if kind == "full":
            mean, cov = ladc_class_statistics(features, targets, [cls])
            values, vectors = torch.linalg.eigh(cov[0])
            factor = vectors * values.clamp_min(0).sqrt()
            variance = features.new_zeros(dim)
        else:
            members = features[targets == cls]
            mean = members.mean(0, keepdim=True)
            centred = members - mean
            scale = max(len(members) - 1, 1)
            variance = centred.pow(2).sum(0) / scale
            if kind == "lowrank":
                q = min(width, *centred.shape)
                _, singular, right = torch.svd_lowrank(centred, q=q, niter=4)
                factor[:, :q] = right * (singular / scale ** 0.5)
                variance = (variance - factor.pow(2).sum(1)).clamp_min(0)
        means.append(mean[0])
        factors.append(factor)
        variances.append(variance)
    return torch.stack(means), torch.stack(factors), torch.stack(variances)


class TailGaussians:
    """The calibrated Gaussian of every tail instance of one feature space (one expert).

    features (N, D) and targets (N,) are the cached training set; ``sample(indices)`` draws a feature
    for each training index of a tail instance (eq. 10), and ``is_tail`` tells which indices are.
    """

    def __init__(self, features: torch.Tensor, targets: torch.Tensor, class_counts: Sequence[int],
                 head_classes: Sequence[int], kind: str, m: int = 2, alpha: float = 0.1, beta: float = 1.0,
                 weighting: str = "inverse", rank: int = 64) -> None:
        if kind not in ("full", "lowrank", "diagonal"):
            raise ValueError(f"TailGaussians needs a concrete covariance kind, got {kind!r}")
        self.alpha, self.beta = alpha, beta
        head = torch.as_tensor(list(head_classes), device=targets.device)
        self.head_means, self.factors, self.variances = head_gaussians(features, targets, head_classes, kind, rank)
        head_counts = torch.as_tensor([class_counts[c] for c in head_classes], device=features.device)
        self.is_tail = ~torch.isin(targets, head)
        tail_rows = torch.nonzero(self.is_tail).flatten()
        # position of each training index among the tail instances (-1 for head instances)
        self.position = torch.full_like(targets, -1)
        self.position[tail_rows] = torch.arange(len(tail_rows), device=targets.device)
        neighbours, weights, means = [], [], []
        for start in range(0, len(tail_rows), NEIGHBOUR_CHUNK):
            tail = features[tail_rows[start:start + NEIGHBOUR_CHUNK]]
            idx, w = ladc_neighbours(tail, self.head_means, head_counts, m, weighting)
            neighbours.append(idx)
            weights.append(w)
            means.append(ladc_posterior_mean(tail, self.head_means, idx, w, beta))
        dim = features.shape[1]
        self.neighbours = torch.cat(neighbours) if neighbours else targets.new_zeros(0, m)
        self.weights = torch.cat(weights) if weights else features.new_zeros(0, m)
        self.means = torch.cat(means) if means else features.new_zeros(0, dim)

    def sample(self, indices: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw from the calibrated Gaussian of each tail training index in ``indices``, (B, D)."""
        rows = self.position[indices]
        return ladc_sample_calibrated(self.means[rows], self.neighbours[rows], self.weights[rows], self.factors,
                                      self.variances, self.alpha, self.beta, generator)


def log_choice(kind: str, chosen: str, heads: int, dim: int, experts: int, budget_bytes: int) -> None:
    full_gib = experts * heads * dim * dim * BYTES_PER_FLOAT / 2**30
    how = "auto" if kind == "auto" else "as configured"
    LOG.info(f"ladc: {chosen} covariances ({how}) for {heads} head classes x {experts} expert(s), D={dim}; "
             f"full would take {full_gib:.2f} GiB, budget {budget_bytes / 2**30:.2f} GiB")
