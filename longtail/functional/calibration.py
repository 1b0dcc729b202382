"""Calibration formulas: binned calibration errors, proper scores, temperature fitting, and the
knowledge-transfer importance weights of Chen & Su, "Transfer Knowledge from Head to Tail:
Uncertainty Calibration under Long-tailed Distribution" (CVPR 2023), with the ECE and MCE of
Guo et al., "On Calibration of Modern Neural Networks" (ICML 2017; after Naeini et al. 2015).

Binning rule, shared by every binned metric here and by histogram binning: M equal-width bins
``(lo, hi] = ((m - 1) / M, m / M]`` and a confidence of exactly 0 goes to the first bin. This is the
authors' code (``conf > lo and conf <= hi``) extended to 0, where their bins would drop the sample.
torchmetrics' ``MulticlassCalibrationError`` uses ``[lo, hi)`` and puts exactly 1.0 in an extra
(M+1)-th bin, so the two agree except for confidences exactly on an inner edge or exactly 1.0.

Everything is computed in float64 (probabilities near 1 and summed log-likelihoods need it) and
returned in float64; logits may be on any device.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F

__all__ = [
    "CalibrationBins",
    "bin_indices",
    "calibration_bins",
    "ece",
    "mce",
    "adaptive_ece",
    "per_class_ece",
    "classwise_ece",
    "nll",
    "brier",
    "fit_temperature",
    "diagonal_class_gaussians",
    "wasserstein_gaussian",
    "kt_attention",
    "kt_calibrated_stats",
    "kt_importance_weights",
    "platt_probability",
    "equal_mass_bin_edges",
    "bin_means",
    "gp_latent_marginals",
    "whitened_gauss_kl",
    "softmax_expected_log_lik",
]

TEMPERATURE_BOUNDS = (0.05, 5.0)  # the authors' L-BFGS-B bounds (calibration_method.py)


class CalibrationBins(NamedTuple):
    """Per-bin statistics of the top-label confidence; accuracy and confidence are NaN in empty bins."""

    accuracy: torch.Tensor
    confidence: torch.Tensor
    count: torch.Tensor


def _checked(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, C) float64 logits and (N,) int64 targets, or an error saying what is wrong."""
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got shape {tuple(logits.shape)}")
    if targets.shape != (logits.shape[0],):
        raise ValueError(f"targets must be (N,) with N = {logits.shape[0]} (one per logit row), "
                         f"got shape {tuple(targets.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("no samples: calibration metrics need at least one logit row")
    if targets.is_floating_point():
        raise ValueError("targets must be integer class indices, got a floating-point tensor")
    targets = targets.long()
    if int(targets.min()) < 0 or int(targets.max()) >= logits.shape[1]:
        raise ValueError(f"targets must lie in [0, {logits.shape[1] - 1}] for {logits.shape[1]} logit columns, "
                         f"got range [{int(targets.min())}, {int(targets.max())}]")
    return logits.double(), targets


def _check_bins(n_bins: int) -> None:
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")


def bin_indices(confidences: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Bin of each confidence under the rule of this module: ``(lo, hi]`` equal-width bins, 0 in the
    first bin, 1.0 in the last (Guo et al. 2017's ECE bins; edges as Chen & Su's code)."""
    _check_bins(n_bins)
    confidences = confidences.double()
    inner_edges = torch.arange(1, n_bins, dtype=torch.float64, device=confidences.device) / n_bins
    # right=False: index i with edges[i-1] < x <= edges[i], i.e. (lo, hi]; x <= 1/M (including 0) -> 0
    return torch.bucketize(confidences, inner_edges, right=False)


def _binned_sums(confidences: torch.Tensor, correct: torch.Tensor, n_bins: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-bin sums of correctness and confidence, and counts."""
    index = bin_indices(confidences, n_bins)
    count = torch.bincount(index, minlength=n_bins)
    correct_sum = torch.bincount(index, weights=correct.double(), minlength=n_bins)
    confidence_sum = torch.bincount(index, weights=confidences.double(), minlength=n_bins)
    return correct_sum, confidence_sum, count


def _top_label(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence ``max softmax`` and correctness of the argmax (Chen & Su 2023, eq. 2)."""
    confidence, prediction = logits.softmax(dim=1).max(dim=1)
    return confidence, (prediction == targets).double()


def calibration_bins(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> CalibrationBins:
    """acc(B_m), conf(B_m) and |B_m| of the reliability diagram (Guo et al. 2017)."""
    logits, targets = _checked(logits, targets)
    confidence, correct = _top_label(logits, targets)
    correct_sum, confidence_sum, count = _binned_sums(confidence, correct, n_bins)
    nan = torch.full_like(correct_sum, float("nan"))
    safe = count.clamp(min=1).double()
    return CalibrationBins(accuracy=torch.where(count > 0, correct_sum / safe, nan),
                           confidence=torch.where(count > 0, confidence_sum / safe, nan),
                           count=count)


def ece(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Expected calibration error ``sum_m |B_m|/n |acc(B_m) - conf(B_m)|`` (Guo et al. 2017,
    after Naeini et al. 2015), as a fraction. Bins ``(lo, hi]`` with 0 in the first and 1.0 in the last bin;
    torchmetrics' ``[lo, hi)`` with 1.0 in an extra bin differs only for confidences on an edge."""
    logits, targets = _checked(logits, targets)
    confidence, correct = _top_label(logits, targets)
    correct_sum, confidence_sum, _ = _binned_sums(confidence, correct, n_bins)
    # |B_m|/n * |acc - conf| = |sum correct - sum conf| / n
    return (correct_sum - confidence_sum).abs().sum() / logits.shape[0]


def mce(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Maximum calibration error ``max_m |acc(B_m) - conf(B_m)|`` over non-empty bins (Guo et al.
    2017, after Naeini et al. 2015), as a fraction; bins as in the module docstring."""
    bins = calibration_bins(logits, targets, n_bins)
    return (bins.accuracy - bins.confidence)[bins.count > 0].abs().max()


def adaptive_ece(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """ECE with equal-mass bins (Nixon et al. 2019's adaptive binning of the top label): samples
    sorted by confidence and split into ``n_bins`` consecutive groups whose sizes differ by at most
    one (the first ``N mod n_bins`` get the extra sample); equal confidences may straddle two bins.
    Fewer samples than bins leaves the extra bins empty."""
    logits, targets = _checked(logits, targets)
    _check_bins(n_bins)
    confidence, correct = _top_label(logits, targets)
    order = confidence.argsort(stable=True)
    n = logits.shape[0]
    sizes = torch.full((n_bins,), n // n_bins, dtype=torch.long)
    sizes[: n % n_bins] += 1
    bin_of_rank = torch.repeat_interleave(torch.arange(n_bins), sizes).to(confidence.device)
    gap = (torch.bincount(bin_of_rank, weights=correct[order], minlength=n_bins)
           - torch.bincount(bin_of_rank, weights=confidence[order], minlength=n_bins))
    return gap.abs().sum() / n


def per_class_ece(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """ECE of each class's own probability ``p_k`` against ``1(y = k)`` over all samples (Kull et al.
    2019's class-wise ECE before the mean over classes; the authors' SCELoss), shape (C,)."""
    logits, targets = _checked(logits, targets)
    n, num_classes = logits.shape
    probs = logits.softmax(dim=1)
    flat_index = (bin_indices(probs, n_bins) + torch.arange(num_classes, device=probs.device) * n_bins).flatten()
    positives = F.one_hot(targets, num_classes).double().flatten()
    gap = (torch.bincount(flat_index, weights=positives, minlength=num_classes * n_bins)
           - torch.bincount(flat_index, weights=probs.flatten(), minlength=num_classes * n_bins))
    return gap.view(num_classes, n_bins).abs().sum(dim=1) / n


def classwise_ece(logits: torch.Tensor, targets: torch.Tensor, n_bins: int = 15) -> torch.Tensor:
    """Class-wise ECE (Kull et al. 2019): the mean over classes of :func:`per_class_ece`."""
    return per_class_ece(logits, targets, n_bins).mean()


def nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of the targets, the loss of temperature scaling (Chen & Su 2023, eq. 3)."""
    logits, targets = _checked(logits, targets)
    return F.cross_entropy(logits, targets)


def brier(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Brier score: mean over samples of ``sum_k (p_k - 1(y = k))^2`` (range [0, 2])."""
    logits, targets = _checked(logits, targets)
    one_hot = F.one_hot(targets, logits.shape[1]).double()
    return ((logits.softmax(dim=1) - one_hot) ** 2).sum(dim=1).mean()


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor, sample_weight: torch.Tensor | None = None,
                    loss: str = "nll") -> float:
    """The temperature T minimising the (importance-weighted) loss of ``softmax(z / T)``: Chen & Su
    2023, eq. 3 (unweighted) and eq. 9 (weights ``w*`` of eq. 8).

    As the authors' code (calibration_method.py): scipy L-BFGS-B from T = 1 within bounds
    (0.05, 5.0), tol 1e-12, objective ``sum_i w_i L_i / N``. ``loss="mse"`` minimises the Brier
    score instead, as Zhang et al. 2020's ensemble TS fits its temperature. The gradient is exact
    (autograd) rather than the authors' finite differences; the minimiser is the same.
    """
    logits, targets = _checked(logits, targets)
    n = logits.shape[0]
    if loss not in ("nll", "mse"):
        raise ValueError(f"unknown temperature loss {loss!r}; allowed: nll, mse")
    if sample_weight is None:
        weights = torch.ones(n, dtype=torch.float64, device=logits.device)
    else:
        weights = torch.as_tensor(sample_weight, dtype=torch.float64, device=logits.device)
        if weights.shape != (n,):
            raise ValueError(f"sample_weight must be (N,) with N = {n}, got shape {tuple(weights.shape)}")
        if not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or float(weights.sum()) <= 0:
            raise ValueError("sample_weight must be finite, non-negative and not all zero")
    one_hot = F.one_hot(targets, logits.shape[1]).double()

    def objective(t: np.ndarray) -> tuple[float, np.ndarray]:
        temperature = torch.tensor(float(t[0]), dtype=torch.float64, device=logits.device, requires_grad=True)
        scaled = logits / temperature
        if loss == "nll":
            per_sample = F.cross_entropy(scaled, targets, reduction="none")
        else:
            per_sample = ((scaled.softmax(dim=1) - one_hot) ** 2).sum(dim=1)
        value = (weights * per_sample).sum() / n
        value.backward()
        return float(value.detach()), np.array([float(temperature.grad)])

    result = scipy.optimize.minimize(objective, x0=np.array([1.0]), jac=True, method="L-BFGS-B",
                                     bounds=[TEMPERATURE_BOUNDS], tol=1e-12)
    return float(result.x[0])


def diagonal_class_gaussians(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class feature mean and diagonal variance ``p_c(x) = N(mu_c, Sigma_c)`` (Chen & Su
    2023, Sec. 3.3 before eq. 5), shapes (C, D); population variance (ddof 0) as the authors'
    ``np.var`` on the training features. A class without features is an error."""
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    features, labels = features.double(), labels.long()
    count = torch.bincount(labels, minlength=num_classes)
    if count.numel() > num_classes:
        raise ValueError(f"labels go up to {int(labels.max())} but num_classes is {num_classes}")
    missing = (count == 0).nonzero().flatten().tolist()
    if missing:
        raise ValueError(f"classes {missing} have no features, so their Gaussian is undefined; "
                         "pass features of every class (the training split of the calibrated model)")
    counts = count.double().unsqueeze(1)
    means = torch.zeros(num_classes, features.shape[1], dtype=torch.float64,
                        device=features.device).index_add_(0, labels, features) / counts
    variances = torch.zeros_like(means).index_add_(0, labels, (features - means[labels]) ** 2) / counts
    return means, variances


def _check_variances(*variances: torch.Tensor) -> None:
    for var in variances:
        if bool((var < 0).any()):
            raise ValueError("variances must be non-negative")


def wasserstein_gaussian(mu1: torch.Tensor, var1: torch.Tensor, mu2: torch.Tensor, var2: torch.Tensor) -> torch.Tensor:
    """2-Wasserstein distance between diagonal Gaussians, ``sqrt(sum (mu1 - mu2)^2 + sum (sqrt v1 -
    sqrt v2)^2)`` over the last dimension (broadcasting over the others): the "Wasserstein" of Chen & Su
    2023, eq. 5. Not squared; :func:`kt_attention` squares it, as the authors' code does."""
    mu1, var1, mu2, var2 = (x.double() for x in (mu1, var1, mu2, var2))
    _check_variances(var1, var2)
    squared = ((mu1 - mu2) ** 2).sum(dim=-1) + ((var1.sqrt() - var2.sqrt()) ** 2).sum(dim=-1)
    return squared.sqrt()


def kt_attention(tail_mean: torch.Tensor, tail_var: torch.Tensor, head_means: torch.Tensor,
                 head_vars: torch.Tensor) -> torch.Tensor:
    """Attention of a tail class over the head classes, ``softmax(-d / sqrt(dim f))`` (Chen & Su
    2023, eq. 6). ``d`` is the SQUARED 2-Wasserstein distance, as the authors' ``Wasserstein`` in
    utils.py (eq. 5 leaves it open). Tail stats (D,) give (H,); (K, D) give (K, H)."""
    if head_means.ndim != 2 or head_vars.shape != head_means.shape or head_means.shape[0] == 0:
        raise ValueError(f"head_means and head_vars must both be (H, D) with H >= 1, got "
                         f"{tuple(head_means.shape)} and {tuple(head_vars.shape)}")
    distance = wasserstein_gaussian(tail_mean.unsqueeze(-2), tail_var.unsqueeze(-2), head_means, head_vars)
    return torch.softmax(-distance ** 2 / math.sqrt(head_means.shape[1]), dim=-1)


def kt_calibrated_stats(tail_mean: torch.Tensor, tail_var: torch.Tensor, head_means: torch.Tensor,
                        head_vars: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Calibrated tail distribution (Chen & Su 2023, eq. 7): ``mu* = a mu_c + (1 - a) sum_k s_k
    mu_k`` and ``sqrt(Sigma*) = a sqrt(Sigma_c) + (1 - a) sum_k s_k sqrt(Sigma_k)`` with s from
    :func:`kt_attention`. Returns (mean, variance), diagonal."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha blends the tail's own statistics with the head's and must be in [0, 1], got {alpha}")
    attention = kt_attention(tail_mean, tail_var, head_means, head_vars)
    mean = alpha * tail_mean.double() + (1 - alpha) * attention @ head_means.double()
    std = alpha * tail_var.double().sqrt() + (1 - alpha) * attention @ head_vars.double().sqrt()
    return mean, std ** 2


def _diagonal_gaussian_log_pdf(x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    return -0.5 * (torch.log(2 * math.pi * var) + (x - mean) ** 2 / var).sum(dim=-1)


def kt_importance_weights(features: torch.Tensor, labels: torch.Tensor, class_means: torch.Tensor,
                          class_vars: torch.Tensor, head_mask: torch.Tensor | Sequence[bool], alpha: float,
                          eta: tuple[float, float] = (0.3, 5.0)) -> torch.Tensor:
    """Importance weights ``w*`` of Chen & Su 2023, eq. 5-8: 1 for samples of head classes;
    for a tail sample of class c, ``q*_c(x) / p_c(x)`` clipped to [eta1, eta2], where ``p_c`` is the
    class's own diagonal Gaussian and ``q*_c`` the calibrated one of eq. 7. Computed as
    ``exp(log q - log p)`` as the authors' code. Shape (N,), float64.

    features (N, D) and labels (N,) are the samples to weight (the validation set); class_means and
    class_vars (C, D) come from the training features; head_mask (C,) marks the head classes.
    """
    eta_low, eta_high = eta
    if not 0 < eta_low <= eta_high:
        raise ValueError(f"eta = (eta1, eta2) must satisfy 0 < eta1 <= eta2, got {eta}")
    if features.ndim != 2 or labels.shape != (features.shape[0],):
        raise ValueError(f"features must be (N, D) and labels (N,), got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    if class_means.shape != class_vars.shape or class_means.shape[1:] != features.shape[1:]:
        raise ValueError(f"class_means and class_vars must be (C, D) with D = {features.shape[1]}, got "
                         f"{tuple(class_means.shape)} and {tuple(class_vars.shape)}")
    head_mask = torch.as_tensor(head_mask, dtype=torch.bool, device=class_means.device)
    if head_mask.shape != (class_means.shape[0],):
        raise ValueError(f"head_mask must have one entry per class ({class_means.shape[0]}), "
                         f"got shape {tuple(head_mask.shape)}")
    features, labels = features.double(), labels.long()
    class_means, class_vars = class_means.double(), class_vars.double()
    weights = torch.ones(features.shape[0], dtype=torch.float64, device=features.device)
    tail_classes = labels[~head_mask[labels]].unique().tolist()
    if tail_classes and not bool(head_mask.any()):
        raise ValueError("no head class to transfer knowledge from: head_mask is all False; "
                         "lower the head threshold so at least one class counts as head")
    for cls in tail_classes:
        if not bool((class_vars[cls] > 0).all()):
            raise ValueError(f"tail class {cls} has a zero feature variance, so its density p_c is singular; "
                             "floor the variances (KnowledgeTransferTS(var_floor=...)) or use more samples")
        mean, var = kt_calibrated_stats(class_means[cls], class_vars[cls], class_means[head_mask],
                                        class_vars[head_mask], alpha)
        rows = labels == cls
        log_ratio = (_diagonal_gaussian_log_pdf(features[rows], mean, var)
                     - _diagonal_gaussian_log_pdf(features[rows], class_means[cls], class_vars[cls]))
        weights[rows] = log_ratio.exp().clamp(eta_low, eta_high)
    return weights


def platt_probability(probs: torch.Tensor, coef: float, intercept: float, eps: float = 1e-12) -> torch.Tensor:
    """Platt scaling of a probability: ``sigmoid(a * logit(p) + b)`` with p clipped to [eps, 1 - eps],
    the scaling step of Kumar et al. 2019, "Verified uncertainty calibration" (Sec. 4.1, step 1), in
    the form of the authors' library (p-lambda/verified_calibration, ``get_platt_scaler``)."""
    p = probs.double().clamp(eps, 1 - eps)
    return torch.sigmoid(coef * torch.log(p / (1 - p)) + intercept)


def equal_mass_bin_edges(values: torch.Tensor, n_bins: int) -> torch.Tensor:
    """Upper edges of bins holding about equally many of ``values`` (Kumar et al. 2019, Sec. 4.1,
    step 2: the binning scheme of the scaling-binning calibrator). As the authors' ``get_equal_bins``:
    sort, split into ``min(n_bins, N)`` runs whose sizes differ by at most one (the longer runs first),
    put an edge half-way between consecutive runs, end with 1.0, drop duplicate edges. A value v falls
    in the first bin whose edge is >= v (see :func:`bin_means`)."""
    _check_bins(n_bins)
    values = values.double().flatten()
    if values.numel() == 0:
        raise ValueError("equal_mass_bin_edges needs at least one value")
    ordered = values.sort().values
    runs = torch.tensor_split(ordered, min(n_bins, ordered.numel()))
    inner = [(runs[i][-1] + runs[i + 1][0]) / 2 for i in range(len(runs) - 1)]
    edges = torch.stack(inner + [torch.ones((), dtype=torch.float64, device=values.device)])
    return edges.unique()  # sorted, without repeats


def bin_means(values: torch.Tensor, targets: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Mean of ``targets`` over the samples of each bin of ``values`` (bin i: ``edges[i-1] < v <=
    edges[i]``, the first from 0). Kumar et al. 2019, Sec. 4.1, step 3 takes the targets to be the
    scaled values themselves (the scaling-binning output is the bin mean of ``g(z)``); with 0/1 labels
    it is histogram binning. An empty bin gets its midpoint, as the authors' ``get_histogram_calibrator``."""
    values, targets, edges = values.double().flatten(), targets.double().flatten(), edges.double()
    if values.shape != targets.shape:
        raise ValueError(f"values and targets must have the same length, got {values.numel()} and {targets.numel()}")
    index = torch.searchsorted(edges, values).clamp(max=edges.numel() - 1)
    count = torch.bincount(index, minlength=edges.numel()).double()
    total = torch.bincount(index, weights=targets, minlength=edges.numel())
    lower = torch.cat([edges.new_zeros(1), edges[:-1]])
    return torch.where(count > 0, total / count.clamp(min=1), (lower + edges) / 2)


def gp_latent_marginals(x: torch.Tensor, inducing: torch.Tensor, q_mu: torch.Tensor, q_sqrt: torch.Tensor,
                        lengthscale: torch.Tensor, variance: torch.Tensor, white: torch.Tensor,
                        jitter: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Marginal mean and variance of a sparse variational GP at scalar inputs ``x`` (any shape), zero
    prior mean (the caller adds its mean function). Wenger et al. 2020, "Non-parametric calibration
    for classification" (Sec. 3), as their SVGP: kernel ``RBF(lengthscale, variance) + White(white)``,
    whitened inducing outputs ``u = L v`` with ``K_uu = L L^T`` and ``q(v) = N(q_mu, diag(q_sqrt^2))``.
    With ``A = L^-1 K_ux``: mean ``A^T q_mu``, variance ``k(x, x) - sum A^2 + sum (q_sqrt A)^2``."""
    flat = x.reshape(-1)

    def rbf(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return variance * torch.exp(-0.5 * (a[:, None] - b[None, :]) ** 2 / lengthscale ** 2)

    m = inducing.numel()
    k_uu = rbf(inducing, inducing) + (white + jitter) * torch.eye(m, dtype=inducing.dtype, device=inducing.device)
    chol = torch.linalg.cholesky(k_uu)
    a = torch.linalg.solve_triangular(chol, rbf(inducing, flat), upper=False)  # (M, N)
    mean = a.T @ q_mu
    var = variance + white - (a ** 2).sum(0) + ((q_sqrt[:, None] * a) ** 2).sum(0)
    return mean.reshape(x.shape), var.reshape(x.shape)


def whitened_gauss_kl(q_mu: torch.Tensor, q_sqrt: torch.Tensor) -> torch.Tensor:
    """``KL(N(q_mu, diag(q_sqrt^2)) || N(0, I))``, the prior term of the whitened SVGP bound (Wenger et
    al. 2020, eq. 7)."""
    var = q_sqrt ** 2
    return 0.5 * (var + q_mu ** 2 - 1 - var.log()).sum()


def softmax_expected_log_lik(mean: torch.Tensor, var: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Second-order Taylor approximation of ``E_{f ~ N(mean, diag(var))}[log softmax(f)_y]`` per row
    (Wenger et al. 2020, Sec. 3.2, as their ``MultiCal.variational_expectations``):
    ``log softmax(mean)_y + 0.5 (s^T diag(var) s - s^T var)`` with ``s = softmax(mean)``, i.e. half the
    trace of the log-softmax Hessian ``-(diag(s) - s s^T)`` against the covariance."""
    s = mean.softmax(dim=1)
    log_lik = mean.log_softmax(dim=1).gather(1, targets.long()[:, None]).squeeze(1)
    return log_lik + 0.5 * ((s * var * s).sum(1) - (s * var).sum(1))
