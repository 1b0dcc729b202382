"""Classification losses for long-tailed training, and IKL's terms ("IKL: Boosting
Long-Tail Recognition with Implicit Knowledge Learning", anonymous authors, under double-blind
review, 2023).

Every loss takes ``reduction`` as its last keyword: ``"none"`` gives the per-sample loss (B,),
``"sum"`` its sum, ``"mean"`` the batch mean. Where a class ``weight`` is given, ``"mean"`` follows
``torch.nn.functional.cross_entropy``: ``sum(w_y * loss) / sum(w_y)``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F

from longtail.functional.data import checked_class_counts

__all__ = [
    "balanced_softmax_logits",
    "balanced_softmax_loss",
    "logit_adjusted_logits",
    "logit_adjusted_loss",
    "ldam_margins",
    "ldam_logits",
    "ldam_loss",
    "focal_loss",
    "class_balanced_weights",
    "WEIGHT_NORMALIZATIONS",
    "normalize_weighted_losses",
    "label_smoothing_loss",
    "soft_target_cross_entropy",
    "ikl_uncertainty_loss",
    "ikl_class_medians",
    "ikl_correlation_labels",
    "ikl_correlation_labels_topk",
    "ikl_keep_smallest_keys",
    "topk_with_even_rest",
    "ikl_alpha",
]

Counts = Sequence[int] | torch.Tensor


def _reduce(values: torch.Tensor, reduction: str, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Reduce per-sample values; a weighted mean divides by the summed weights, as torch's CE does."""
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "mean":
        return values.mean() if weights is None else values.sum() / weights.sum()
    raise ValueError(f"unknown reduction {reduction!r}; allowed: none, mean, sum")


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """Half-precision inputs (autocast) to float32; float32 and float64 stay as they are."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def balanced_softmax_logits(logits: torch.Tensor, class_counts: Counts) -> torch.Tensor:
    """The logits balanced softmax trains its softmax on: ``logits + log n_y`` (Ren et al. 2020;
    Jin et al., CVPR 2023, eq. 11)."""
    return logits + checked_class_counts(class_counts, logits.shape[-1], device=logits.device).log()


def balanced_softmax_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts: Counts,
                          reduction: str = "mean") -> torch.Tensor:
    """Balanced softmax cross-entropy (Ren et al. 2020): CE on ``logits + log n_y``.

    Jin et al., CVPR 2023 (SHIKE), eq. 11 (SHIKE's classifier retraining loss, one expert).
    Adding the log class counts makes the softmax model the long-tailed training distribution,
    so the raw logits estimate the balanced one.
    """
    return F.cross_entropy(balanced_softmax_logits(logits, class_counts), targets, reduction=reduction)


def logit_adjusted_logits(logits: torch.Tensor, class_counts: Counts, tau: float = 1.0) -> torch.Tensor:
    """The logits logit-adjusted CE trains its softmax on: ``logits + tau * log(prior)`` (Menon et al. 2021)."""
    counts = checked_class_counts(class_counts, logits.shape[-1], device=logits.device)
    return logits + tau * (counts / counts.sum()).log()


def logit_adjusted_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts: Counts,
                        tau: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """Logit-adjusted cross-entropy (Menon et al. 2021): CE on ``logits + tau * log(prior)``.

    A baseline in the tables of SHIKE (Jin et al. 2023) and the IKL paper (which
    give no equation for it); ``tau=1`` equals the balanced softmax
    (the priors differ from the counts by a constant shift).
    """
    return F.cross_entropy(logit_adjusted_logits(logits, class_counts, tau), targets, reduction=reduction)


def ldam_margins(class_counts: Counts, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM's per-class margins (Cao et al. 2019): ``∝ n_j^(-1/4)``, the largest equal to ``max_margin``."""
    margins = checked_class_counts(class_counts, dtype=torch.float64).pow(-0.25)
    return (margins * (max_margin / margins.max())).float()


def ldam_loss(logits: torch.Tensor, targets: torch.Tensor, class_counts: Counts, max_margin: float = 0.5,
              scale: float = 30.0, weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Label-distribution-aware margin loss (Cao et al. 2019).

    A baseline (LDAM, LDAM-DRW) in the tables of SHIKE (Jin et al. 2023) and the IKL
    paper, which give no equation for it.

    As Cao et al.'s code (kaidic/LDAM-DRW), the class margin ``m_y ∝ n_y^(-1/4)`` is subtracted
    from the target logit, then CE on ``scale * logits``. ``logits`` are cosine similarities there;
    for logits already multiplied by s, use ``scale=1`` and ``max_margin = s * 0.5`` (RIDE's form).
    """
    return F.cross_entropy(ldam_logits(logits, targets, class_counts, max_margin, scale), targets,
                           weight=weight, reduction=reduction)


def ldam_logits(logits: torch.Tensor, targets: torch.Tensor, class_counts: Counts, max_margin: float = 0.5,
                scale: float = 30.0) -> torch.Tensor:
    """The logits LDAM trains its softmax on: ``scale * (logits - m_y e_y)`` (Cao et al. 2019; see ``ldam_loss``)."""
    margins = ldam_margins(checked_class_counts(class_counts, logits.shape[-1]), max_margin).to(logits.device)
    return scale * (logits - F.one_hot(targets, logits.shape[-1]) * margins[targets].unsqueeze(1))


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 2.0,
               weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Focal loss (Lin et al. 2017): ``-w_y (1 - p_y)^gamma log p_y``.

    A baseline in the tables of MiSLAS (Zhong et al. 2021) and SHIKE (Jin et al. 2023) (no
    equation there).

    ``p_y`` is the plain softmax probability of the target (the class weight does not enter it,
    unlike Cao et al.'s code); ``gamma=0`` is cross-entropy.
    """
    log_pt = F.log_softmax(_upcast(logits), dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    loss = -(1 - log_pt.exp()).pow(gamma) * log_pt
    sample_weight = None
    if weight is not None:
        sample_weight = weight.to(loss)[targets]
        loss = loss * sample_weight
    return _reduce(loss, reduction, sample_weight)


def class_balanced_weights(class_counts: Counts, beta: float = 0.9999) -> torch.Tensor:
    """Class-balanced weights from the effective number of samples (Cui et al. 2019).

    The CB baseline of SHIKE (Jin et al. 2023) and the IKL paper (no equation
    there) and the re-weighting of LDAM-DRW.

    ``w_j = (1 - beta) / (1 - beta^n_j)``, normalised so the weights sum to the number of classes
    (as Cui et al.'s and Cao et al.'s code). ``beta=0`` gives uniform weights, ``beta -> 1`` inverse frequency.
    """
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta}; 0.9999 is the usual choice")
    counts = checked_class_counts(class_counts, dtype=torch.float64)
    weights = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), counts))
    return (weights / weights.sum() * len(counts)).float()


WEIGHT_NORMALIZATIONS = ("weight_sum", "batch")


def normalize_weighted_losses(weighted_losses: torch.Tensor, sample_weights: torch.Tensor,
                              normalize: str = "weight_sum") -> torch.Tensor:
    """Per-sample class-weighted losses ``w_y l`` (B,), rescaled so that their plain batch mean is the
    batch loss of the chosen normalisation (the trainer only ever takes a plain mean of a loss's values):

    - ``"weight_sum"``: ``sum(w_y l) / sum(w_y)``, what ``F.cross_entropy(weight=w)`` /
      ``nn.CrossEntropyLoss(weight=w)`` gives (Cao et al.'s kaidic/LDAM-DRW ``cifar_train.py`` for CB and
      the DRW phase, RIDE's ``RIDELoss``): each sample is divided by the batch's summed weights;
    - ``"batch"``: ``sum(w_y l) / B``, the plain batch mean (Cui et al.'s richardaecn/class-balanced-loss
      ``cifar_main.py``: ``tf.losses.softmax_cross_entropy(weights=...)`` and its focal loss divided by
      the number of labels): the values are returned as they are.

    With CB weights normalised to sum C (``class_balanced_weights``) the two differ by the batch's mean
    weight, ``sum(w_y) / B``, which at CIFAR-10-LT IF 100 is about 0.2 for an instance-sampled batch
    (head classes weigh little): ``weight_sum`` is then ~5x ``batch``, a different effective learning rate.
    """
    if normalize not in WEIGHT_NORMALIZATIONS:
        raise ValueError(f"unknown weight normalisation {normalize!r}; allowed: weight_sum (divide by the "
                         "batch's summed weights, torch's CrossEntropyLoss(weight=...)) or batch (divide by B)")
    if weighted_losses.shape != sample_weights.shape:
        raise ValueError(f"weighted_losses {tuple(weighted_losses.shape)} and sample_weights "
                         f"{tuple(sample_weights.shape)} must both be (B,)")
    if normalize == "batch":
        return weighted_losses
    return weighted_losses * (weighted_losses.numel() / sample_weights.to(weighted_losses).sum())


def label_smoothing_loss(logits: torch.Tensor, targets: torch.Tensor, epsilon: float = 0.1,
                         reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy with uniform label smoothing (Szegedy et al. 2016).

    Cited in the IKL paper (related work, no equation) and the uniform case of
    MiSLAS's label-aware smoothing (Zhong et al. 2021).

    The target gets ``1 - epsilon + epsilon / C`` and every other class ``epsilon / C`` (torch's rule).
    """
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1], got {epsilon}")
    return F.cross_entropy(logits, targets, label_smoothing=epsilon, reduction=reduction)


def soft_target_cross_entropy(logits: torch.Tensor, soft_targets: torch.Tensor,
                              reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy against a target distribution per sample: ``-sum_c q_c log softmax(z)_c``.

    Used for soft labels: SHIKE's soft CE (Jin et al. 2023, eq. 10), IKL's ICL
    (the IKL paper, eq. 8), MiSLAS's smoothed labels.
    """
    if soft_targets.shape != logits.shape:
        raise ValueError(f"soft_targets {tuple(soft_targets.shape)} must have the logits' shape {tuple(logits.shape)}")
    loss = -(soft_targets * F.log_softmax(_upcast(logits), dim=-1)).sum(dim=-1)
    return _reduce(loss, reduction)


# ------------------------------------------------------------------------------------------------ IKL

def ikl_uncertainty_loss(prev_probs: torch.Tensor, logits: torch.Tensor, targets_prev_correct: torch.Tensor,
                         tau: float = 2.0, reduction: str = "mean") -> torch.Tensor:
    """IKL's Implicit Uncertainty Regularization with Confidence Knowledge Selection.

    The IKL paper, eq. 2-5 (Sec. 3.2, IUR): ``tau^2 * KL(p_{t-1} || p_t)`` where ``p_t =
    softmax(logits / tau)`` (eq. 1) and ``prev_probs`` are last epoch's predictions softened with the
    same ``tau``. Only samples whose previous prediction was right (``targets_prev_correct``, the CKS
    set of eq. 4) count: ``"none"`` gives 0 for the others, ``"mean"`` divides by the number of
    selected samples as eq. 5 (0 when none is selected).
    """
    mask = targets_prev_correct.to(device=logits.device, dtype=torch.bool)
    log_current = F.log_softmax(_upcast(logits) / tau, dim=-1)
    prev = prev_probs.to(log_current)
    kl = (torch.xlogy(prev, prev) - prev * log_current).sum(dim=-1) * tau ** 2
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    if reduction == "mean":
        return kl.sum() / mask.sum().clamp_min(1)
    return _reduce(kl, reduction)


def ikl_class_medians(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Class centres as the element-wise median of each class's features.

    The IKL paper, eq. 6 (Sec. 3.3, ICL).

    The median of an even number of values is the mean of the two middle ones (numpy's rule).
    A class without samples gets the zero vector, which ``ikl_correlation_labels`` maps to its
    plain one-hot label. Returns (C, D) in float32 (or float64 for float64 features).
    """
    features = _upcast(features)
    order = torch.argsort(labels)
    counts = torch.bincount(labels, minlength=num_classes)
    if counts.numel() > num_classes:
        raise ValueError(f"labels go up to {int(labels.max())} but num_classes is {num_classes}")
    centers = features.new_zeros(num_classes, features.shape[1])
    for cls, chunk in enumerate(torch.split(features[order], counts.tolist())):
        if len(chunk):
            ordered = chunk.sort(dim=0).values
            centers[cls] = (ordered[(len(chunk) - 1) // 2] + ordered[len(chunk) // 2]) / 2
    return centers


def _correlation_rows(unit_centers: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` of ``ikl_correlation_labels`` from L2-normalised centres, (len(rows), C)."""
    picked = torch.arange(len(rows), device=rows.device)
    similarity = unit_centers[rows] @ unit_centers.T
    similarity[picked, rows] = 1.0
    similarity = similarity.clamp_min(0.0)
    labels = similarity / similarity.sum(dim=1, keepdim=True) / 2
    labels[picked, rows] += 0.5
    return labels


def ikl_correlation_labels(class_centers: torch.Tensor) -> torch.Tensor:
    """IKL's Implicit Correlation Labels: row y is the soft label of class y.

    The IKL paper, eq. 7 (used by the ICL loss, eq. 8).

    ``M`` is the cosine similarity of the class centres (eq. 6-7), with its diagonal 1. The paper
    adds ``M`` to the one-hot label ``Y`` without saying how the result becomes a distribution;
    taken literally, with C classes of similar features the target keeps ~2/C of the mass. We
    normalise each part on its own and give them equal weight (the paper's "integrating these soft
    labels with one-hot labels in a weighted manner"): ``y_hat = (Y + M'/rowsum(M')) / 2`` with
    ``M' = max(M, 0)`` (a negative similarity means unrelated, not anti-correlated). So the target
    keeps at least half the mass and the rest follows feature similarity. Returns (C, C), rows sum to 1.
    """
    unit = F.normalize(_upcast(class_centers), dim=1)
    return _correlation_rows(unit, torch.arange(len(unit), device=unit.device))


def ikl_correlation_labels_topk(class_centers: torch.Tensor, k: int, chunk: int = 1024
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest entries of each row of ``ikl_correlation_labels`` (the IKL paper, eq. 7), as
    values (C, k) and class indices (C, k), computed ``chunk`` rows at a time so that the dense
    C x C matrix never exists (8,142 iNaturalist classes: 265 MB in float32). The target class is
    always kept (its entry is at least 1/2). Read back with ``topk_with_even_rest``."""
    if not 1 <= k <= len(class_centers):
        raise ValueError(f"k must be in [1, C={len(class_centers)}], got {k}")
    unit = F.normalize(_upcast(class_centers), dim=1)
    values, indices = [], []
    for start in range(0, len(unit), chunk):
        rows = torch.arange(start, min(start + chunk, len(unit)), device=unit.device)
        top = _correlation_rows(unit, rows).topk(k, dim=1)
        values.append(top.values)
        indices.append(top.indices)
    return torch.cat(values), torch.cat(indices)


def topk_with_even_rest(values: torch.Tensor, indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A distribution (B, C) from its ``k`` kept entries: ``values`` (B, k) at ``indices`` (B, k), and
    the remaining mass ``1 - sum(values)`` spread evenly over the other ``C - k`` classes.

    How IKL reads back the top-k store of last epoch's predictions (IUR, eq. 3) and the top-k rows of
    its correlation labels (ICL, eq. 7-8); with ``k = C`` it is the stored distribution itself."""
    values = values.float()
    rest = (1.0 - values.sum(dim=1, keepdim=True)).clamp_min(0.0) / max(num_classes - values.shape[1], 1)
    dense = rest.expand(-1, num_classes).clone()
    return dense.scatter_(1, indices.long(), values)


def ikl_keep_smallest_keys(keys: torch.Tensor, features: torch.Tensor, cap: int, empty: int
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (class), the ``cap`` entries with the smallest keys, ascending, dropping repeated keys.

    The bounded class sample behind IKL's class medians (the IKL paper, eq. 6) at large scale: every
    training sample gets a random key per epoch (a seeded permutation of the sample indices), and a
    class keeps the features of its ``cap`` smallest-keyed samples — a uniform random sample without
    replacement of the samples seen, which does not depend on the order they arrive in. So a batch,
    another rank's sample or a resumed run merge into it by this one function, with the same result.

    keys (R, J) integers, ``empty`` marks a free slot; features (R, J, d). Of entries with the same
    key (one sample drawn twice, or padded onto two ranks) the later one along J is kept. Returns
    keys (R, cap) and features (R, cap, d); missing entries have key ``empty``.
    """
    if keys.shape != features.shape[:2]:
        raise ValueError(f"keys {tuple(keys.shape)} must match the first two dims of features {tuple(features.shape)}")
    order = torch.sort(keys, dim=1, stable=True).indices
    ordered = keys.gather(1, order)
    repeated = torch.zeros_like(ordered, dtype=torch.bool)
    repeated[:, :-1] = ordered[:, :-1] == ordered[:, 1:]  # an earlier copy of a key that comes again
    ordered = ordered.masked_fill(repeated, empty)
    width = min(cap, keys.shape[1])
    chosen = torch.sort(ordered, dim=1, stable=True).indices[:, :width]
    kept_keys = ordered.gather(1, chosen)
    rows = order.gather(1, chosen)
    kept = features.gather(1, rows[..., None].expand(-1, -1, features.shape[2]))
    if width < cap:  # fewer candidates than slots: pad with free slots
        kept_keys = torch.cat([kept_keys, kept_keys.new_full((len(keys), cap - width), empty)], dim=1)
        kept = torch.cat([kept, kept.new_zeros(len(keys), cap - width, kept.shape[2])], dim=1)
    return kept_keys, kept


def ikl_alpha(epoch: int, total_epochs: int, schedule: str = "parabolic") -> float:
    """IKL's weight alpha of the IKL paper's eq. 9, by the strategies of its Table 8.

    With ``r = epoch / total_epochs`` (``epoch`` = epochs done, 0 at the start): ``equal`` 0.5,
    ``linear`` r, ``cosine`` (1 - cos(pi r)) / 2, ``parabolic`` r^2 (the paper's best and our default).
    """
    if total_epochs < 1 or not 0 <= epoch <= total_epochs:
        raise ValueError(f"need 0 <= epoch <= total_epochs and total_epochs >= 1, got {epoch} of {total_epochs}")
    ratio = epoch / total_epochs
    schedules = {
        "equal": 0.5,
        "linear": ratio,
        "cosine": (1.0 - math.cos(math.pi * ratio)) / 2.0,
        "parabolic": ratio ** 2,
    }
    if schedule not in schedules:
        raise ValueError(f"unknown IKL alpha schedule {schedule!r}; allowed: {', '.join(schedules)}")
    return schedules[schedule]
