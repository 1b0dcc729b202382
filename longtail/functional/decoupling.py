"""Formulas of the decoupled classifier stage: MiSLAS's label-aware smoothing (Zhong et al.,
"Improving Calibration for Long-Tailed Recognition", CVPR 2021) and LADC's head-to-tail distribution
calibration and sampling (Wang et al., "Label-Aware Distribution Calibration for Long-tailed
Classification", AAAI 2022, eq. 1-13).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from longtail.functional.data import checked_class_counts

__all__ = [
    "SMOOTHING_SHAPES",
    "label_aware_epsilons",
    "smoothed_targets",
    "label_aware_smoothing",
    "ladc_head_classes",
    "ladc_class_statistics",
    "ladc_neighbours",
    "ladc_posterior_mean",
    "ladc_calibrated_stats",
    "ladc_sample_calibrated",
    "ladc_sampling_probs",
]

SMOOTHING_SHAPES = ("concave", "linear", "convex")
Counts = Sequence[int] | torch.Tensor


# ------------------------------------------------------------------------------------------- MiSLAS

def label_aware_epsilons(class_counts: Counts, eps_head: float = 0.4, eps_tail: float = 0.1,
                         shape: str = "concave") -> torch.Tensor:
    """MiSLAS's per-class smoothing ``eps_y = f(N_y)`` (Zhong et al. 2021, "Label-aware Smoothing", the three
    forms of f), with ``eps_1 = eps_head`` at the largest class N_1 and ``eps_K = eps_tail`` at the
    smallest N_K; with ``r = (N_y - N_K) / (N_1 - N_K)``:

    - concave: ``eps_K + (eps_1 - eps_K) sin(pi r / 2)``
    - linear:  ``eps_K + (eps_1 - eps_K) r``
    - convex:  ``eps_1 + (eps_1 - eps_K) sin(3 pi / 2 + pi r / 2)``

    All three run from eps_tail (r = 0) to eps_head (r = 1). When every class has the same size
    (N_1 = N_K) there is no tail and every class gets ``eps_head``. Returns (C,) float32.
    """
    if shape not in SMOOTHING_SHAPES:
        raise ValueError(f"unknown smoothing shape {shape!r}; allowed: {', '.join(SMOOTHING_SHAPES)}")
    for name, value in (("eps_head", eps_head), ("eps_tail", eps_tail)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    counts = checked_class_counts(class_counts, dtype=torch.float64, device="cpu")
    largest, smallest = counts.max(), counts.min()
    if largest == smallest:
        return torch.full(counts.shape, float(eps_head))
    r = (counts - smallest) / (largest - smallest)
    if shape == "concave":
        eps = eps_tail + (eps_head - eps_tail) * torch.sin(math.pi * r / 2)
    elif shape == "linear":
        eps = eps_tail + (eps_head - eps_tail) * r
    else:
        eps = eps_head + (eps_head - eps_tail) * torch.sin(1.5 * math.pi + math.pi * r / 2)
    return eps.float()


def smoothed_targets(targets: torch.Tensor, epsilons: torch.Tensor, spread: str = "all") -> torch.Tensor:
    """Soft targets (B, C) where a sample of class y keeps ``1 - epsilons[y]`` of its mass (MiSLAS's
    label-aware smoothing, Zhong et al. 2021, "Label-aware Smoothing"; ``epsilons`` (C,) on the targets' device):

    - ``spread="all"`` (default, MiSLAS's public code ``LabelAwareSmoothing``): eps_y is spread over
      all C classes, so the target gets ``1 - eps_y + eps_y / C`` and every other class ``eps_y / C``;
    - ``spread="others"`` (the formula as Zhong et al. present it): the target gets ``1 - eps_y`` and every other class
      ``eps_y / (C - 1)``.
    """
    if spread not in ("all", "others"):
        raise ValueError(f"unknown spread {spread!r}; allowed: all (MiSLAS's code), others (the paper's formula)")
    num_classes = epsilons.numel()
    if spread == "others" and num_classes < 2:
        raise ValueError("spread='others' needs at least two classes")
    eps_y = epsilons[targets].unsqueeze(1).float()
    one_hot = torch.nn.functional.one_hot(targets, num_classes).float()
    if spread == "all":
        return (1 - eps_y) * one_hot + eps_y / num_classes
    return (1 - eps_y) * one_hot + eps_y / (num_classes - 1) * (1 - one_hot)


def label_aware_smoothing(targets: torch.Tensor, class_counts: Counts, eps_head: float = 0.4,
                          eps_tail: float = 0.1, shape: str = "concave", spread: str = "all") -> torch.Tensor:
    """MiSLAS's label-aware smoothed targets (Zhong et al. 2021, "Label-aware Smoothing"), (B, C) float32:
    ``smoothed_targets`` with ``eps_y = label_aware_epsilons(class_counts, eps_head, eps_tail, shape)[y]``;
    ``spread`` "all" (MiSLAS's code, the default) or "others" (the paper's formula), as ``smoothed_targets``."""
    return smoothed_targets(targets, label_aware_epsilons(class_counts, eps_head, eps_tail, shape).to(targets.device),
                            spread)


# --------------------------------------------------------------------------------------------- LADC

def ladc_head_classes(class_counts: Counts, coverage: float = 0.6) -> list[int]:
    """LADC's head classes (Wang et al. 2022, "Implementation Details"): the most frequent classes that
    together hold at least ``coverage`` of the training images; the rest are tail classes.

    Classes are taken largest first (ties by index); returns their indices in that order.
    """
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}; LADC uses 0.6")
    counts = checked_class_counts(class_counts, dtype=torch.float64, device="cpu")
    order = sorted(range(len(counts)), key=lambda c: (-float(counts[c]), c))
    total, covered, head = float(counts.sum()), 0.0, []
    for cls in order:
        head.append(cls)
        covered += float(counts[cls])
        if covered >= coverage * total - 1e-9 * total:
            break
    return head


def ladc_class_statistics(features: torch.Tensor, labels: torch.Tensor,
                          classes: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian of each listed class's features (Wang et al. 2022, eq. 1-3): mean ``mu = sum F(x_i) / n``
    (eq. 2) and unbiased covariance ``Sigma = sum (F(x_i) - mu)(F(x_i) - mu)^T / (n - 1)`` (eq. 3).

    features (N, D), labels (N,); returns means (K, D) and covariances (K, D, D) in the order of
    ``classes``, computed in float32 or better. A class with a single image gets a zero covariance.
    """
    if features.ndim != 2 or labels.shape != features.shape[:1]:
        raise ValueError(f"need features (N, D) and labels (N,), got {tuple(features.shape)} and {tuple(labels.shape)}")
    features = features.to(torch.promote_types(features.dtype, torch.float32))
    means, covs = [], []
    for cls in classes:
        members = features[labels == cls]
        if len(members) == 0:
            raise ValueError(f"class {cls} has no features; every listed class needs at least one")
        mean = members.mean(0)
        centred = members - mean
        means.append(mean)
        covs.append(centred.T @ centred / max(len(members) - 1, 1))
    return torch.stack(means), torch.stack(covs)


def ladc_neighbours(tail_features: torch.Tensor, head_means: torch.Tensor, head_counts: Counts, m: int = 2,
                    weighting: str = "inverse") -> tuple[torch.Tensor, torch.Tensor]:
    """The m most similar head classes of each tail instance and their prior weights (Wang et al. 2022, eq. 4-6).

    S is the m head classes with the smallest squared Euclidean distance ``d_i = ||mu^i - mu_hat||^2``
    between their mean and the tail feature mu_hat (eq. 4-5). Weights over S, summing to 1:

    - ``weighting="printed"``: eq. 6 as printed, ``w_i = n_i d_i / sum_j n_j d_j``. It grows with the
      distance, so the farther of the chosen head classes counts more;
    - ``weighting="inverse"`` (default): ``w_i = (n_i / d_i) / sum_j (n_j / d_j)``, which does what the
      paper says the weights are for ("learn more from head classes that are more abundant and more
      similar"); the printed form contradicts that sentence, so we read it as a typo.

    tail_features (B, D), head_means (H, D), head_counts (H,); returns indices into the head classes
    (B, m), nearest first, and weights (B, m).
    """
    if weighting not in ("inverse", "printed"):
        raise ValueError(f"unknown weighting {weighting!r}; allowed: inverse (default), printed (eq. 6 as printed)")
    if not 1 <= m <= head_means.shape[0]:
        raise ValueError(f"m must be between 1 and the number of head classes ({head_means.shape[0]}), got {m}")
    dtype = torch.promote_types(tail_features.dtype, torch.float32)
    counts = torch.as_tensor(head_counts, dtype=dtype, device=tail_features.device)
    distances = torch.cdist(tail_features.to(dtype), head_means.to(dtype)).pow(2)  # (B, H)
    nearest, indices = distances.topk(m, dim=1, largest=False)
    n = counts[indices]
    if weighting == "printed":
        raw = n * nearest
        # all m distances zero (tail feature on top of every head mean): fall back to count weights
        raw = torch.where(raw.sum(1, keepdim=True) > 0, raw, n)
    else:
        raw = n / nearest.clamp_min(torch.finfo(dtype).tiny)
    return indices, raw / raw.sum(1, keepdim=True)


def ladc_posterior_mean(tail_features: torch.Tensor, head_means: torch.Tensor, indices: torch.Tensor,
                        weights: torch.Tensor, beta: float = 1.0, n_s: int = 1) -> torch.Tensor:
    """Calibrated mean of each tail instance (Wang et al. 2022, eq. 7 and 11): the prior mean
    ``mu_0 = sum_{i in S} w_i mu^i`` blended with the instance, ``mu' = beta/(n_s+beta) mu_0 +
    n_s/(n_s+beta) mu_hat`` (n_s = 1: one instance). (B, D)."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    prior = (weights.unsqueeze(-1) * head_means[indices]).sum(1)
    return (beta * prior + n_s * tail_features) / (n_s + beta)


def ladc_calibrated_stats(tail_feature: torch.Tensor, head_means: torch.Tensor, head_covs: torch.Tensor,
                          head_counts: Counts, m: int = 2, alpha: float = 0.1, beta: float = 1.0,
                          weighting: str = "inverse") -> tuple[torch.Tensor, torch.Tensor]:
    """LADC's calibrated (posterior) Gaussian of a tail instance (Wang et al. 2022, eq. 4-12, n_s = 1).

    Neighbours and weights from ``ladc_neighbours`` (eq. 4-6); prior ``mu_0 = sum w_i mu^i``,
    ``Sigma_0 = sum w_i^2 Sigma^i + alpha I`` (eq. 7); posterior ``mu' = (beta mu_0 + mu_hat)/(1+beta)``
    (eq. 11) and ``Sigma' = beta/(1+beta) Sigma_0`` (eq. 12).

    tail_feature (D,) or (B, D); head_means (H, D); head_covs (H, D, D) or diagonal (H, D).
    Returns mean (D,)/(B, D) and covariance (D, D)/(B, D, D), or variances (D,)/(B, D) for diagonal input.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    single = tail_feature.ndim == 1
    features = tail_feature.unsqueeze(0) if single else tail_feature
    indices, weights = ladc_neighbours(features, head_means, head_counts, m, weighting)
    mean = ladc_posterior_mean(features, head_means, indices, weights, beta)
    w2 = weights.pow(2)
    if head_covs.ndim == 3:
        prior_cov = (w2[..., None, None] * head_covs[indices]).sum(1)
        prior_cov = prior_cov + alpha * torch.eye(head_covs.shape[-1], dtype=prior_cov.dtype, device=prior_cov.device)
    else:
        prior_cov = (w2.unsqueeze(-1) * head_covs[indices]).sum(1) + alpha
    cov = beta / (1 + beta) * prior_cov
    return (mean[0], cov[0]) if single else (mean, cov)


def ladc_sample_calibrated(means: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                           head_factors: torch.Tensor, head_variances: torch.Tensor, alpha: float = 0.1,
                           beta: float = 1.0, generator: torch.Generator | None = None,
                           max_elements: int = 1 << 26) -> torch.Tensor:
    """One draw from each tail instance's calibrated Gaussian ``N(mu', Sigma')`` (Wang et al. 2022, eq. 7, 10, 12)
    without forming Sigma'.

    Each head class's covariance is given as ``Sigma^i = F_i F_i^T + diag(v_i)`` (a full factor, a
    low-rank factor plus the residual variances, or variances alone with a rank-0 factor). Since
    ``Sigma' = beta/(1+beta) (sum_k w_k^2 Sigma^{s_k} + alpha I)`` is a sum of covariances, a draw is
    ``mu' + sqrt(beta/(1+beta)) (sum_k w_k (F_{s_k} e_k + sqrt(v_{s_k}) u_k) + sqrt(alpha) u_0)`` with
    independent standard normals e, u.

    means (B, D) calibrated means; indices, weights (B, m) from ``ladc_neighbours``; head_factors
    (H, D, r); head_variances (H, D). ``max_elements`` bounds the gathered factors per chunk (memory).
    """
    batch, dim = means.shape
    rank = head_factors.shape[-1]
    noise = torch.randn(batch, dim, generator=generator, device=means.device, dtype=means.dtype) * math.sqrt(alpha)
    chunk = max(1, max_elements // max(dim * rank, 1))
    for k in range(indices.shape[1]):
        heads, w = indices[:, k], weights[:, k:k + 1].to(means.dtype)
        spread = torch.randn(batch, dim, generator=generator, device=means.device, dtype=means.dtype)
        part = spread * head_variances[heads].to(means.dtype).clamp_min(0).sqrt()
        if rank:
            e = torch.randn(batch, rank, 1, generator=generator, device=means.device, dtype=means.dtype)
            part = part + torch.cat([torch.bmm(head_factors[heads[s:s + chunk]].to(means.dtype), e[s:s + chunk])
                                     for s in range(0, batch, chunk)]).squeeze(-1)
        noise = noise + w * part
    return means + math.sqrt(beta / (1 + beta)) * noise


def ladc_sampling_probs(class_counts: Counts, tau: float, per: str = "instance") -> torch.Tensor:
    """LADC's class sampling probabilities (Wang et al. 2022, eq. 13), ``P_i = (n_1 / n_i^tau) / sum_j (n_1 / n_j^tau)``
    with n_1 the largest class (it cancels). Returns each class's share of the draws, (C,) float64.

    The paper calls P_i "the sampling probability of each class" but leaves open what it is drawn per:

    - ``per="class"`` (as printed): P_i is the class's share, proportional to ``n_i^-tau``. tau = 0 is
      class-balanced; at the paper's tau = 1.2 a 5-image class is drawn 251 times as often as a 500-image one;
    - ``per="instance"`` (default): P_i is the weight of each image of class i, so the class's share is
      ``n_i P_i``, proportional to ``n_i^(1 - tau)``: tau = 0 is instance-balanced, tau = 1 class-balanced,
      and the paper's 1.2-1.3 a little past balance (``tau - 1`` in the printed reading). Chosen on
      validation: the printed reading hands the classifier to the tail (many-shot accuracy near 0).
    """
    if per not in ("class", "instance"):
        raise ValueError(f"unknown per={per!r}; allowed: class (eq. 13 as printed), instance (P_i per image)")
    counts = checked_class_counts(class_counts, dtype=torch.float64, device="cpu")
    raw = counts.max() / counts.pow(tau)
    if per == "instance":
        raw = raw * counts
    return raw / raw.sum()
