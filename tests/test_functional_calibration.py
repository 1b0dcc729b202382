"""Calibration formulas of longtail.functional against torchmetrics, numpy/scipy re-derivations and hand values."""
import math

import numpy as np
import pytest
import scipy.integrate
import scipy.stats
import torch
from torchmetrics.classification import MulticlassCalibrationError

from longtail.functional import (adaptive_ece, bin_indices, bin_means, brier, calibration_bins, classwise_ece,
                                 diagonal_class_gaussians, ece, equal_mass_bin_edges, fit_temperature,
                                 gp_latent_marginals, kt_attention, kt_calibrated_stats, kt_importance_weights, mce,
                                 nll, per_class_ece, platt_probability, softmax_expected_log_lik, wasserstein_gaussian,
                                 whitened_gauss_kl)


def np_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def random_logits(seed, n=2000, classes=10, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64) * scale
    targets = torch.randint(0, classes, (n,), generator=g)
    return logits, targets


def off_edges(logits, targets, n_bins=15, margin=1e-5):
    """Drop samples whose confidence (float32 or float64) is within margin of a bin edge, where
    torchmetrics' [lo, hi) and our (lo, hi] may legitimately disagree."""
    conf = logits.softmax(1).max(1).values
    edges = torch.arange(n_bins + 1, dtype=torch.float64) / n_bins
    keep = ((conf[:, None] - edges).abs() > margin).all(1)
    return logits[keep], targets[keep]


def np_binned_gap_sum(conf, correct, n_bins):
    """sum_m |B_m| |acc - conf| with explicit (lo, hi] bins and 0 in the first bin."""
    total = 0.0
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        in_bin = (conf > lo) & (conf <= hi) if m > 0 else (conf <= hi)
        if in_bin.any():
            total += abs(correct[in_bin].sum() - conf[in_bin].sum())
    return total


# ------------------------------------------------------------------------------ ECE / MCE

@pytest.mark.parametrize("seed,scale", [(0, 3.0), (1, 1.0), (2, 8.0)])
def test_ece_mce_match_torchmetrics_off_edges(seed, scale):
    logits, targets = off_edges(*random_logits(seed, scale=scale))
    assert len(targets) > 1900
    l1 = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(logits, targets)
    mx = MulticlassCalibrationError(num_classes=10, n_bins=15, norm="max")(logits, targets)
    assert float(ece(logits, targets)) == pytest.approx(float(l1), abs=1e-6)
    assert float(mce(logits, targets)) == pytest.approx(float(mx), abs=1e-6)


def test_bin_rule_edges_go_to_lower_bin_zero_first_one_last():
    inner_edges = torch.arange(1, 15, dtype=torch.float64) / 15
    assert bin_indices(inner_edges, 15).tolist() == list(range(14))
    assert bin_indices(torch.tensor([0.0, 1.0, 0.5]), 15).tolist() == [0, 14, 7]
    assert bin_indices(torch.tensor([0.25, 0.2500001]), 4).tolist() == [0, 1]


def test_confidence_exactly_one_shares_the_last_bin():
    # conf 1.0 (wrong) and conf 0.95 (right): one bin (14/15, 1] -> |0.5 - 0.975| = 0.475;
    # torchmetrics would put 1.0 in an extra bin and report (1.0 + 0.05) / 2 = 0.525
    logits = torch.tensor([[0.0, 100.0], [math.log(0.95), math.log(0.05)]], dtype=torch.float64)
    targets = torch.tensor([0, 0])
    assert float(logits.softmax(1)[0, 1]) == 1.0
    bins = calibration_bins(logits, targets)
    assert bins.count.tolist() == [0] * 14 + [2]
    assert float(ece(logits, targets)) == pytest.approx(0.475, abs=1e-12)
    assert float(mce(logits, targets)) == pytest.approx(0.475, abs=1e-12)


def test_confidence_exactly_on_inner_edge_goes_to_lower_bin():
    # 4 bins; conf exactly 0.5 (right) and 0.4 (wrong) share (0.25, 0.5]: |0.5 - 0.45| = 0.05
    # ([lo, hi) would split them: (|1 - 0.5| + |0 - 0.4|) / 2 = 0.45)
    logits = torch.log(torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.4, 0.3, 0.2, 0.1]], dtype=torch.float64))
    targets = torch.tensor([0, 1])
    assert float(logits.softmax(1).max(1).values[0]) == 0.5
    bins = calibration_bins(logits, targets, n_bins=4)
    assert bins.count.tolist() == [0, 2, 0, 0]
    assert float(bins.accuracy[1]) == 0.5 and float(bins.confidence[1]) == pytest.approx(0.45, abs=1e-12)
    assert torch.isnan(bins.accuracy[0]) and torch.isnan(bins.confidence[2])
    assert float(ece(logits, targets, n_bins=4)) == pytest.approx(0.05, abs=1e-12)


def test_ece_mce_hand_values():
    # 15 bins: confidences 0.9 (right) and 0.9 (wrong) share a bin; 0.6 (wrong) is alone in another
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4]], dtype=torch.float64)
    targets = torch.tensor([0, 1, 1])
    # bin 13: acc 0.5, conf 0.9 -> 0.4 * 2/3; bin 8: acc 0, conf 0.6 -> 0.6 * 1/3
    assert float(ece(probs.log(), targets)) == pytest.approx(0.4 * 2 / 3 + 0.6 / 3, abs=1e-12)
    assert float(mce(probs.log(), targets)) == pytest.approx(0.6, abs=1e-12)


# ------------------------------------------------------------------------------ adaptive and class-wise ECE

@pytest.mark.parametrize("n,n_bins", [(1003, 15), (10, 15), (300, 7)])
def test_adaptive_ece_matches_numpy(n, n_bins):
    logits, targets = random_logits(3, n=n, scale=2.0)
    p = np_softmax(logits.numpy())
    conf, correct = p.max(1), (p.argmax(1) == targets.numpy()).astype(float)
    chunks = np.array_split(np.argsort(conf, kind="stable"), n_bins)
    expected = sum(abs(correct[c].sum() - conf[c].sum()) for c in chunks) / n
    assert float(adaptive_ece(logits, targets, n_bins)) == pytest.approx(expected, abs=1e-12)


def test_classwise_ece_matches_numpy_loop():
    logits, targets = random_logits(4, n=500, classes=5, scale=2.0)
    p, y = np_softmax(logits.numpy()), targets.numpy()
    per_class = [np_binned_gap_sum(p[:, k], (y == k).astype(float), 15) / len(y) for k in range(5)]
    np.testing.assert_allclose(per_class_ece(logits, targets).numpy(), per_class, atol=1e-12)
    assert float(classwise_ece(logits, targets)) == pytest.approx(np.mean(per_class), abs=1e-12)


def test_classwise_counts_probability_zero_in_first_bin():
    # class 1: p = 0 exactly for a sample of class 1, p = 0.05 for a sample of class 0: both in bin 0,
    # gap |1 - 0.05| / 2. Dropping the 0 (the authors' strict lo < p) would give |0 - 0.05| / 2.
    logits = torch.tensor([[0.0, -1000.0], [math.log(0.95), math.log(0.05)]], dtype=torch.float64)
    targets = torch.tensor([1, 0])
    assert float(logits.softmax(1)[0, 1]) == 0.0
    # class 0: p = 1.0 (negative) and 0.95 (positive) share bin 14: |1 - 1.95| / 2
    np.testing.assert_allclose(per_class_ece(logits, targets).numpy(), [0.95 / 2, 0.95 / 2], atol=1e-12)


# ------------------------------------------------------------------------------ proper scores

def test_nll_and_brier_match_numpy():
    logits, targets = random_logits(5, n=50, classes=4)
    p, y = np_softmax(logits.numpy()), targets.numpy()
    assert float(nll(logits, targets)) == pytest.approx(-np.log(p[np.arange(50), y]).mean(), rel=1e-12)
    one_hot = np.eye(4)[y]
    assert float(brier(logits, targets)) == pytest.approx(((p - one_hot) ** 2).sum(1).mean(), rel=1e-12)


def test_metrics_name_bad_inputs():
    logits, targets = random_logits(6, n=8, classes=3)
    with pytest.raises(ValueError, match="targets must lie in"):
        ece(logits, targets + 3)
    with pytest.raises(ValueError, match=r"logits must be \(N, C\)"):
        nll(logits[0], targets)
    with pytest.raises(ValueError, match="n_bins"):
        ece(logits, targets, n_bins=0)


# ------------------------------------------------------------------------------ temperature

def sampled_logits(seed, t_true, n=5000, classes=10):
    """logits = z * T_true with labels drawn from softmax(z): the right temperature is T_true."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g, dtype=torch.float64) * 2
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z * t_true, labels


@pytest.mark.parametrize("t_true", [2.5, 0.5])
def test_fit_temperature_recovers_known_temperature(t_true):
    logits, labels = sampled_logits(0, t_true)
    assert fit_temperature(logits, labels) == pytest.approx(t_true, rel=0.05)
    assert fit_temperature(logits, labels, loss="mse") == pytest.approx(t_true, rel=0.05)


def test_fit_temperature_integer_weights_equal_repeated_samples():
    logits, labels = sampled_logits(1, 2.0, n=600)
    weights = torch.randint(0, 4, (600,), generator=torch.Generator().manual_seed(2)).double()
    repeats = weights.long()
    repeated = fit_temperature(logits.repeat_interleave(repeats, 0), labels.repeat_interleave(repeats))
    # sum w L / N vs sum L / sum w: same minimiser
    assert fit_temperature(logits, labels, sample_weight=weights) == pytest.approx(repeated, rel=1e-5)


def test_fit_temperature_stays_in_the_authors_bounds():
    logits, labels = sampled_logits(3, 50.0, n=500)
    assert fit_temperature(logits, labels) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="sample_weight"):
        fit_temperature(logits, labels, sample_weight=-torch.ones(500))


# ------------------------------------------------------------------------------ knowledge transfer

def test_wasserstein_gaussian_hand_value_and_scipy_quantile_integral():
    mu1, var1 = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 4.0])
    mu2, var2 = torch.tensor([3.0, 4.0]), torch.tensor([9.0, 1.0])
    # (0-3)^2 + (0-4)^2 + (1-3)^2 + (2-1)^2 = 30
    assert float(wasserstein_gaussian(mu1, var1, mu2, var2)) == pytest.approx(math.sqrt(30), rel=1e-12)
    # W2^2 of a product measure is the sum over dimensions of 1-D W2^2 = int_0^1 (F1^-1 - F2^-1)^2
    rng = np.random.default_rng(0)
    m1, m2, s1, s2 = rng.normal(size=3), rng.normal(size=3), rng.uniform(0.5, 2, 3), rng.uniform(0.5, 2, 3)
    squared = sum(scipy.integrate.quad(lambda u: (scipy.stats.norm.ppf(u, m1[d], s1[d])
                                                  - scipy.stats.norm.ppf(u, m2[d], s2[d])) ** 2, 0, 1)[0]
                  for d in range(3))
    got = wasserstein_gaussian(torch.tensor(m1), torch.tensor(s1 ** 2), torch.tensor(m2), torch.tensor(s2 ** 2))
    assert float(got) == pytest.approx(math.sqrt(squared), rel=1e-6)


def test_kt_attention_softmax_of_squared_distance_over_sqrt_dim():
    tail_mean, tail_var = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 1.0])
    head_means = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    head_vars = torch.tensor([[1.0, 1.0], [4.0, 1.0], [1.0, 9.0]])
    squared = np.array([1.0, 4.0 + 1.0, 18.0 + 4.0])
    expected = np.exp(-squared / math.sqrt(2))
    expected /= expected.sum()
    np.testing.assert_allclose(kt_attention(tail_mean, tail_var, head_means, head_vars).numpy(), expected, rtol=1e-12)
    batched = kt_attention(torch.stack([tail_mean, tail_mean + 1]), torch.stack([tail_var, tail_var]),
                           head_means, head_vars)
    assert batched.shape == (2, 3)
    np.testing.assert_allclose(batched[0].numpy(), expected, rtol=1e-12)


def test_kt_calibrated_stats_blend_mean_and_std():
    tail_mean, tail_var = torch.tensor([0.0, 0.0]), torch.tensor([1.0, 4.0])
    head_means = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    head_vars = torch.tensor([[4.0, 4.0], [9.0, 1.0]])
    s = kt_attention(tail_mean, tail_var, head_means, head_vars).numpy()
    mean, var = kt_calibrated_stats(tail_mean, tail_var, head_means, head_vars, alpha=0.7)
    np.testing.assert_allclose(mean.numpy(), 0.3 * (s[0] * np.array([2, 0]) + s[1] * np.array([0, 4])), rtol=1e-12)
    std = 0.7 * np.array([1, 2]) + 0.3 * (s[0] * np.array([2, 2]) + s[1] * np.array([3, 1]))
    np.testing.assert_allclose(var.numpy(), std ** 2, rtol=1e-12)


def test_kt_importance_weights_against_scipy_densities():
    # 2-D, 3 classes: 0 and 1 head, 2 tail; tail samples spread so some weights clip at both ends
    means = np.array([[0.0, 0.0], [4.0, 1.0], [1.0, 3.0]])
    variances = np.array([[1.0, 2.0], [0.5, 1.0], [0.2, 0.3]])
    features = np.array([[0.1, 0.2], [4.0, 1.0], [1.0, 3.0], [1.2, 2.5], [2.0, 1.0], [0.9, 3.1], [6.0, 6.0]])
    labels = np.array([0, 1, 2, 2, 2, 2, 2])
    alpha = 0.6
    head = [0, 1]
    d2 = np.array([((means[2] - means[k]) ** 2).sum() + ((np.sqrt(variances[2]) - np.sqrt(variances[k])) ** 2).sum()
                   for k in head])
    s = np.exp(-d2 / math.sqrt(2))
    s /= s.sum()
    mu_star = alpha * means[2] + (1 - alpha) * s @ means[head]
    sd_star = alpha * np.sqrt(variances[2]) + (1 - alpha) * s @ np.sqrt(variances[head])
    q = scipy.stats.multivariate_normal(mu_star, np.diag(sd_star ** 2))
    p = scipy.stats.multivariate_normal(means[2], np.diag(variances[2]))
    expected = np.ones(len(labels))
    tail = labels == 2
    expected[tail] = np.clip(np.exp(q.logpdf(features[tail]) - p.logpdf(features[tail])), 0.3, 5.0)
    got = kt_importance_weights(torch.tensor(features), torch.tensor(labels), torch.tensor(means),
                                torch.tensor(variances), torch.tensor([True, True, False]), alpha)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10)
    assert got[:2].tolist() == [1.0, 1.0]
    assert ((got[2:] >= 0.3) & (got[2:] <= 5.0)).all()
    assert {0.3, 5.0} <= set(got[2:].tolist())  # both clips are exercised


def test_kt_importance_weights_errors():
    features, labels = torch.zeros(2, 2), torch.tensor([0, 1])
    means, variances = torch.zeros(2, 2), torch.ones(2, 2)
    with pytest.raises(ValueError, match="no head class"):
        kt_importance_weights(features, labels, means, variances, [False, False], 0.5)
    with pytest.raises(ValueError, match="zero feature variance"):
        kt_importance_weights(features, labels, means, torch.tensor([[1.0, 1.0], [0.0, 1.0]]), [True, False], 0.5)


def test_diagonal_class_gaussians_match_numpy():
    rng = np.random.default_rng(1)
    features, labels = rng.normal(size=(40, 3)), np.repeat([0, 1, 2, 1], 10)
    means, variances = diagonal_class_gaussians(torch.tensor(features), torch.tensor(labels), 3)
    for c in range(3):
        np.testing.assert_allclose(means[c].numpy(), features[labels == c].mean(0), rtol=1e-12)
        np.testing.assert_allclose(variances[c].numpy(), features[labels == c].var(0), rtol=1e-12)
    with pytest.raises(ValueError, match=r"classes \[3\] have no features"):
        diagonal_class_gaussians(torch.tensor(features), torch.tensor(labels), 4)


# ------------------------------------------------------------------------------ scaling-binning (Kumar et al.)

def test_equal_mass_bin_edges_hand_values():
    # 5 values in 2 bins: runs [0.1, 0.2, 0.3] and [0.4, 0.5] (the longer run first), edge half-way
    edges = equal_mass_bin_edges(torch.tensor([0.5, 0.1, 0.4, 0.3, 0.2]), 2)
    torch.testing.assert_close(edges, torch.tensor([0.35, 1.0], dtype=torch.float64))
    # repeated values give repeated edges, which are merged; more bins than values -> one per value
    torch.testing.assert_close(equal_mass_bin_edges(torch.tensor([0.2, 0.2, 0.2, 0.6]), 4),
                               torch.tensor([0.2, 0.4, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="n_bins"):
        equal_mass_bin_edges(torch.tensor([0.5]), 0)


def test_equal_mass_bins_hold_equal_counts_and_match_the_authors_library():
    values = torch.rand(1003, generator=torch.Generator().manual_seed(0), dtype=torch.float64) ** 3
    edges = equal_mass_bin_edges(values, 10)
    counts = torch.bincount(torch.searchsorted(edges, values), minlength=10)
    assert counts.tolist() == [101, 101, 101] + [100] * 7
    utils = pytest.importorskip("calibration.utils")  # Kumar et al.'s own code (uncertainty-calibration)
    np.testing.assert_allclose(edges.numpy(), utils.get_equal_bins(list(values.numpy()), num_bins=10), rtol=0, atol=0)


def test_bin_means_hand_values_and_empty_bin_midpoint():
    values = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    edges = torch.tensor([0.35, 0.45, 0.9, 1.0], dtype=torch.float64)
    # bins (0, .35] {.1 .2 .3}, (.35, .45] {.4}, (.45, .9] {.5}, (.9, 1] empty -> midpoint .95
    torch.testing.assert_close(bin_means(values, values, edges),
                               torch.tensor([0.2, 0.4, 0.5, 0.95], dtype=torch.float64))
    labels = torch.tensor([1, 0, 0, 1, 1])
    torch.testing.assert_close(bin_means(values, labels, edges),
                               torch.tensor([1 / 3, 1.0, 1.0, 0.95], dtype=torch.float64))


def test_platt_probability_is_sklearn_logistic_regression_on_the_log_odds():
    from sklearn.linear_model import LogisticRegression
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(500, generator=g, dtype=torch.float64)
    labels = (torch.rand(500, generator=g, dtype=torch.float64) < probs ** 2).long()
    log_odds = torch.log(probs / (1 - probs)).numpy()[:, None]
    clf = LogisticRegression(C=1e10).fit(log_odds, labels.numpy())
    ours = platt_probability(probs, float(clf.coef_[0, 0]), float(clf.intercept_[0]))
    np.testing.assert_allclose(ours.numpy(), clf.predict_proba(log_odds)[:, 1], rtol=1e-12)
    assert float(platt_probability(torch.tensor([0.0, 1.0]), 1.0, 0.0)[0]) == pytest.approx(1e-12, rel=1e-6, abs=0)


# ------------------------------------------------------------------------------ GP calibration (Wenger et al.)

def test_gp_latent_marginals_against_direct_gaussian_conditioning():
    g = torch.Generator().manual_seed(2)
    inducing = torch.linspace(-5, 5, 6, dtype=torch.float64)
    q_mu = torch.randn(6, generator=g, dtype=torch.float64)
    q_sqrt = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    x = torch.randn(4, 3, generator=g, dtype=torch.float64) * 4
    ls, var, white, jitter = 2.0, 1.5, 0.01, 1e-6
    hyper = [torch.tensor(h, dtype=torch.float64) for h in (ls, var, white)]
    mean, variance = gp_latent_marginals(x, inducing, q_mu, q_sqrt, *hyper, jitter=jitter)
    # unwhitened: u = L v ~ N(L m, L S L^T); f | u Gaussian conditional; marginalise u (numpy, plain solves)
    xs, zs = x.numpy().ravel(), inducing.numpy()
    k = lambda a, b: var * np.exp(-0.5 * (a[:, None] - b[None, :]) ** 2 / ls ** 2)
    kuu = k(zs, zs) + (white + jitter) * np.eye(6)
    chol = np.linalg.cholesky(kuu)
    proj = np.linalg.solve(kuu, k(zs, xs))  # K_uu^-1 K_ux
    u_mean, u_cov = chol @ q_mu.numpy(), chol @ np.diag(q_sqrt.numpy() ** 2) @ chol.T
    expected_mean = proj.T @ u_mean
    expected_var = (var + white - np.einsum("mn,mn->n", k(zs, xs), proj)
                    + np.einsum("mn,mk,kn->n", proj, u_cov, proj))
    np.testing.assert_allclose(mean.numpy().ravel(), expected_mean, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(variance.numpy().ravel(), expected_var, rtol=1e-8, atol=1e-10)
    assert mean.shape == variance.shape == (4, 3)


def test_whitened_gauss_kl_is_torch_kl_to_standard_normal():
    q_mu = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    q_sqrt = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(q_mu, q_sqrt),
                                                 torch.distributions.Normal(0.0, 1.0)).sum()
    torch.testing.assert_close(whitened_gauss_kl(q_mu, q_sqrt), expected)
    assert float(whitened_gauss_kl(torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64))) == 0.0


def test_softmax_expected_log_lik_taylor_matches_monte_carlo_for_small_variance():
    g = torch.Generator().manual_seed(3)
    mean = torch.randn(5, 4, generator=g, dtype=torch.float64) * 2
    var = torch.rand(5, 4, generator=g, dtype=torch.float64) * 0.2
    targets = torch.tensor([0, 1, 2, 3, 0])
    samples = mean + var.sqrt() * torch.randn(400_000, 5, 4, generator=g, dtype=torch.float64)
    monte_carlo = samples.log_softmax(dim=2)[:, torch.arange(5), targets].mean(0)
    taylor = softmax_expected_log_lik(mean, var, targets)
    plug_in = mean.log_softmax(1)[torch.arange(5), targets]
    # the second-order term is what closes the gap to the true expectation (error O(var^2) + MC noise)
    assert (taylor - monte_carlo).abs().max() < 0.2 * (plug_in - monte_carlo).abs().max()
    torch.testing.assert_close(taylor, monte_carlo, atol=2e-3, rtol=0)
    torch.testing.assert_close(softmax_expected_log_lik(mean, torch.zeros_like(var), targets), plug_in)
