"""Formulas of multi-expert and multi-branch models: SHIKE's distillation (Jin et al., CVPR
2023), RIDE's diversity term (Wang et al., ICLR 2021) and BBN's cumulative-learning weight (Zhou et
al., CVPR 2020). ``expert_logits`` is (M, B, C) as in ``ModelOutput``."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from longtail.functional.data import checked_class_counts
from longtail.functional.losses import Counts, _reduce, _upcast

__all__ = ["DKT_FORMS", "SHIKE_MASKED_LOGIT", "shike_mutual_loss", "shike_grand_teacher", "shike_dkt_loss",
           "ride_diversity_loss", "ride_class_temperatures", "bbn_alpha", "bbn_mixed_features"]


def _check_experts(expert_logits: torch.Tensor, minimum: int) -> None:
    if expert_logits.ndim != 3 or expert_logits.shape[0] < minimum:
        raise ValueError(f"expert_logits must be (M, B, C) with M >= {minimum} experts, "
                         f"got shape {tuple(expert_logits.shape)}")


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities, summed over the last dimension."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


def shike_mutual_loss(expert_logits: torch.Tensor, temperature: float = 1.0,
                      reduction: str = "mean") -> torch.Tensor:
    """SHIKE's mutual knowledge distillation ``L_mu = sum_j sum_{k != j} KL(p^j || p^k)``.

    Jin et al. 2023 (SHIKE), eq. 4, over all M(M-1) ordered pairs of experts. Teachers are not
    detached: the authors' code (jinyan-06/SHIKE, ``mix_outputs``) back-propagates through both sides
    of every pair, so each expert is pulled towards the others and the others towards it.
    ``p = softmax(z / temperature)``; the KL is multiplied by ``temperature^2`` (Hinton et al.) so the
    gradient scale does not depend on it — the paper uses T = 1, where this is the plain KL.
    Per sample: the KL is summed over classes (the authors' ``F.kl_div(reduction="mean")`` also
    divides by C; see docs/FIDELITY.md, SHIKE loss weights).
    """
    _check_experts(expert_logits, 2)
    log_probs = F.log_softmax(_upcast(expert_logits) / temperature, dim=-1)
    num_experts = len(log_probs)
    loss = sum(_kl_rows(log_probs[j], log_probs[k])
               for j in range(num_experts) for k in range(num_experts) if k != j)
    return _reduce(loss * temperature ** 2, reduction)


def _non_target(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(..., B, C) -> (..., B, C-1): drop each sample's target column, keeping class order."""
    keep = F.one_hot(targets, logits.shape[-1]).logical_not()
    return logits[..., keep].reshape(*logits.shape[:-1], logits.shape[-1] - 1)


DKT_FORMS = ("code", "paper")
SHIKE_MASKED_LOGIT = -30.0  # the authors' student logit at the target column: the lowest logit 30 cos can take


def _check_dkt_form(form: str) -> None:
    if form not in DKT_FORMS:
        raise ValueError(f"unknown SHIKE DKT form {form!r}; allowed: code (the authors' mix_outputs, the default) "
                         "or paper (eq. 8: softmax over the C-1 non-target classes only)")


def shike_grand_teacher(expert_logits: torch.Tensor, targets: torch.Tensor, form: str = "code") -> torch.Tensor:
    """SHIKE's grand teacher over the non-target logits (Jin et al. 2023, eq. 5-7).

    For each sample the target column is removed (the ``I_1..I_{C-1}`` of eq. 5, classes kept in
    order). The teacher takes, for every non-target class, the largest logit over the experts
    (eq. 6), except at the consensus hardest negative — the non-target class with the largest
    expert-mean logit (eq. 5) — where it takes that mean (eq. 7). Not detached (as the authors' code).
    ``form="paper"`` returns those (B, C-1) logits; ``form="code"`` returns (B, C) with the target
    column put back at logit 0, as the authors' ``mix_outputs`` (jinyan-06/SHIKE cifarTrain.py,
    ``reformed_nt``) feeds its softmax.
    """
    _check_experts(expert_logits, 1)
    _check_dkt_form(form)
    logits = _upcast(expert_logits)
    non_target = _non_target(logits, targets)
    mean = non_target.mean(dim=0)
    teacher = non_target.max(dim=0).values
    hardest = mean.argmax(dim=-1, keepdim=True)
    teacher = teacher.scatter(-1, hardest, mean.gather(-1, hardest))
    if form == "paper":
        return teacher
    keep = F.one_hot(targets, logits.shape[-1]).logical_not()
    return teacher.new_zeros(keep.shape).masked_scatter(keep, teacher)


def shike_dkt_loss(expert_logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   reduction: str = "mean", form: str = "code") -> torch.Tensor:
    """SHIKE's Dynamic Knowledge Transfer ``L_nt = sum_m KL(p~^T || p~^m)``.

    Jin et al. 2023 (SHIKE), eq. 5-9. ``form="paper"`` (eq. 8): ``p~`` are softmaxes over the
    C-1 non-target logits only, of the grand teacher (``shike_grand_teacher``) and of each expert m.
    ``form="code"`` (default; jinyan-06/SHIKE cifarTrain.py ``mix_outputs``): softmaxes over all C
    columns, the teacher's target column at logit 0 and each expert's at ``SHIKE_MASKED_LOGIT``
    (-30, the authors' constant for 30-scaled cosine logits). The teacher's mass at the target
    column, ``1 / (1 + sum_j exp z~_j)``, then adds a term that pushes every non-target logit of the
    experts down; it is largest when the non-target logits are low, i.e. with few classes.
    The teacher is not detached (as the authors' code). With ``temperature`` T every logit is divided
    by T and the KL scaled by T^2 (the paper: T = 1). Per sample the KL is summed over the columns.
    """
    _check_experts(expert_logits, 1)
    teacher = F.log_softmax(shike_grand_teacher(expert_logits, targets, form) / temperature, dim=-1)
    logits = _upcast(expert_logits)
    if form == "paper":
        students = _non_target(logits, targets)
    else:
        students = logits.masked_fill(F.one_hot(targets, logits.shape[-1]).bool(), SHIKE_MASKED_LOGIT)
    students = F.log_softmax(students / temperature, dim=-1)
    loss = sum(_kl_rows(teacher, student) for student in students)
    return _reduce(loss * temperature ** 2, reduction)


def ride_diversity_loss(expert_logits: torch.Tensor, temperature: float | torch.Tensor = 1.0,
                        reduction: str = "mean") -> torch.Tensor:
    """RIDE's diversity term: ``sum_m T^2 KL(softmax(z_mean / T) || softmax(z_m / T))``.

    RIDE (Wang et al., ICLR 2021), eq. 11-12 (KL and the per-class
    tempered softmax), as its code (frank-xwang/RIDE-LongTailRecognition, ``RIDELoss``): ``z_mean``
    is the mean of the expert logits (the RIDE model's output) and is detached; ``temperature`` is a
    number or a per-class (C,) tensor (``ride_class_temperatures``), and the KL is scaled by the
    square of its mean. RIDE *subtracts* this term (its factor is -0.2) to make experts differ.
    """
    _check_experts(expert_logits, 1)
    logits = _upcast(expert_logits)
    temperature = torch.as_tensor(temperature, dtype=logits.dtype, device=logits.device)
    with torch.no_grad():
        ensemble = F.log_softmax(logits.mean(dim=0) / temperature, dim=-1)
    loss = sum(_kl_rows(ensemble, F.log_softmax(expert / temperature, dim=-1)) for expert in logits)
    return _reduce(loss * temperature.mean() ** 2, reduction)


def ride_class_temperatures(class_counts: Counts, temperature: float = 1.0, gamma: float = 0.05) -> torch.Tensor:
    """RIDE's class-wise diversity temperatures (Wang et al. 2021, eq. 13-14).

    ``beta_k = gamma * n_k / mean(n) + (1 - gamma)`` (eq. 14); then, as RIDE's code, ``T_k =
    temperature * beta_k / max_j beta_j`` — the paper's eq. 13 writes ``beta_k + 1 - max_j beta_j``,
    which also makes the largest 1 but shifts instead of scales. ``gamma=0`` gives uniform T.
    """
    counts = checked_class_counts(class_counts, dtype=torch.float64)
    beta = gamma * counts / counts.mean() + (1.0 - gamma)
    if bool((beta <= 0).any()):
        raise ValueError(f"gamma={gamma} makes some class temperatures non-positive; use a value in [0, 1]")
    return (temperature * beta / beta.max()).float()


def bbn_alpha(epoch: int, total_epochs: int) -> float:
    """BBN's cumulative-learning weight of the conventional branch, ``alpha = 1 - (T / T_max)^2``.

    BBN (Zhou et al., CVPR 2020), Fig. 3 ("cumulative learning
    strategy"): the logits are ``alpha W_c f_c + (1 - alpha) W_r f_r`` and the loss
    ``alpha L(y_uniform) + (1 - alpha) L(y_reversed)``, so the weight moves from the uniform branch
    to the re-balancing one as a parabola. T = ``epoch`` is the number of epochs done (0 at the start),
    as BBN's code ``1 - ((epoch - 1) / max_epoch) ** 2`` with 1-based epochs.
    """
    if total_epochs < 1 or not 0 <= epoch <= total_epochs:
        raise ValueError(f"need 0 <= epoch <= total_epochs and total_epochs >= 1, got {epoch} of {total_epochs}")
    return 1.0 - (epoch / total_epochs) ** 2


def bbn_mixed_features(conventional: torch.Tensor, rebalancing: torch.Tensor,
                       alpha: float | torch.Tensor) -> torch.Tensor:
    """BBN's classifier input ``2 [alpha f_c ; (1 - alpha) f_r]`` (N, 2D) from the two branches' pooled
    features (N, D each), so one linear head gives ``2 (alpha W_c f_c + (1 - alpha) W_r f_r) + b``.

    BBN (Zhou et al., CVPR 2020), Fig. 3 (cumulative learning: ``alpha W_c f_c + (1 - alpha) W_r f_r``);
    the factor 2 is the authors' code (megvii-research/BBN ``lib/core/combiner.py``: ``mixed_feature =
    2 * cat(l * feature_a, (1 - l) * feature_b)``), so alpha = 1/2 is the plain pair ``[f_c ; f_r]`` their
    evaluation feeds the head, and alpha = 1 or 0 one branch alone (doubled).
    """
    return 2 * torch.cat([alpha * conventional, (1 - alpha) * rebalancing], dim=1)
