"""The decoupling formulas (seed 001 MiSLAS, seed 002 LADC) against hand-computed values and numpy."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.functional import (label_aware_epsilons, label_aware_smoothing, ladc_calibrated_stats,
                                 ladc_class_statistics, ladc_head_classes, ladc_neighbours, ladc_sample_calibrated,
                                 ladc_sampling_probs)

COUNTS = [100, 50, 10]  # N_1 = 100, N_K = 10; class 1 sits at r = 40/90 = 4/9


@pytest.mark.parametrize("shape, middle", [
    ("concave", 0.1 + 0.3 * math.sin(2 * math.pi / 9)),         # 0.29284
    ("linear", 0.1 + 0.3 * 4 / 9),                               # 0.23333
    ("convex", 0.4 - 0.3 * math.cos(2 * math.pi / 9)),           # sin(3pi/2 + x) = -cos(x): 0.17019
])
def test_label_aware_epsilons_endpoints_and_middle(shape, middle):
    eps = label_aware_epsilons(COUNTS, eps_head=0.4, eps_tail=0.1, shape=shape)
    assert eps.tolist() == pytest.approx([0.4, middle, 0.1], abs=1e-6)


def test_shapes_order_concave_above_linear_above_convex():
    values = {s: float(label_aware_epsilons(COUNTS, 0.4, 0.1, s)[1]) for s in ("concave", "linear", "convex")}
    assert values["concave"] > values["linear"] > values["convex"]


def test_balanced_counts_use_eps_head_and_bad_inputs_fail():
    assert label_aware_epsilons([5, 5], 0.3, 0.0).tolist() == pytest.approx([0.3, 0.3])
    with pytest.raises(ValueError, match="shape"):
        label_aware_epsilons(COUNTS, shape="cubic")
    with pytest.raises(ValueError, match="eps_head"):
        label_aware_epsilons(COUNTS, eps_head=1.5)
    with pytest.raises(ValueError, match="spread"):
        label_aware_smoothing(torch.tensor([0]), COUNTS, spread="some")


def test_smoothing_spread_all_matches_mislas_code_and_others_matches_slides():
    targets = torch.tensor([1, 2, 0])
    eps1 = 0.1 + 0.3 * math.sin(2 * math.pi / 9)
    all_ = label_aware_smoothing(targets, COUNTS, 0.4, 0.1, "concave", "all")
    assert all_[0].tolist() == pytest.approx([eps1 / 3, 1 - eps1 + eps1 / 3, eps1 / 3], abs=1e-6)
    assert all_[1].tolist() == pytest.approx([0.1 / 3, 0.1 / 3, 1 - 0.1 + 0.1 / 3], abs=1e-6)
    others = label_aware_smoothing(targets, COUNTS, 0.4, 0.1, "concave", "others")
    assert others[0].tolist() == pytest.approx([eps1 / 2, 1 - eps1, eps1 / 2], abs=1e-6)
    assert others[2].tolist() == pytest.approx([0.6, 0.2, 0.2], abs=1e-6)
    assert torch.allclose(all_.sum(1), torch.ones(3)) and torch.allclose(others.sum(1), torch.ones(3))

    # MiSLAS's LabelAwareSmoothing: (1 - eps) * NLL + eps * mean_c(-log p_c), per sample
    logits = torch.randn(3, 3, generator=torch.Generator().manual_seed(0))
    logp = F.log_softmax(logits, 1)
    eps = torch.tensor([eps1, 0.1, 0.4])
    code = (1 - eps) * -logp.gather(1, targets[:, None]).squeeze(1) + eps * -logp.mean(1)
    assert torch.allclose(-(all_ * logp).sum(1), code, atol=1e-6)


def test_head_classes_cover_sixty_percent():
    assert ladc_head_classes([50, 30, 10, 5, 5]) == [0, 1]          # 50% < 60% <= 80%
    assert ladc_head_classes([60, 40]) == [0]                        # exactly 60%
    assert ladc_head_classes([5, 30, 10, 50, 5], 0.6) == [3, 1]      # by size, not by index
    assert ladc_head_classes([5, 5, 5], 0.5) == [0, 1]               # ties by index


def test_class_statistics_match_numpy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(30, 4))
    labels = rng.integers(0, 3, size=30)
    means, covs = ladc_class_statistics(torch.tensor(features), torch.tensor(labels), [2, 0])
    for row, cls in enumerate([2, 0]):
        members = features[labels == cls]
        np.testing.assert_allclose(means[row].numpy(), members.mean(0), atol=1e-10)
        np.testing.assert_allclose(covs[row].numpy(), np.cov(members, rowvar=False, ddof=1), atol=1e-10)


def _numpy_calibrated(x, means, covs, counts, m, alpha, beta, weighting):
    d = ((means - x) ** 2).sum(1)
    nearest = np.argsort(d)[:m]
    raw = counts[nearest] * d[nearest] if weighting == "printed" else counts[nearest] / d[nearest]
    w = raw / raw.sum()
    mu0 = (w[:, None] * means[nearest]).sum(0)
    sigma0 = sum(wi ** 2 * covs[i] for wi, i in zip(w, nearest)) + alpha * np.eye(len(x))
    return nearest, w, (beta * mu0 + x) / (1 + beta), beta / (1 + beta) * sigma0


@pytest.mark.parametrize("weighting", ["inverse", "printed"])
def test_calibrated_stats_match_numpy(weighting):
    rng = np.random.default_rng(1)
    dim, heads = 5, 4
    means = rng.normal(size=(heads, dim)) * 3
    factors = rng.normal(size=(heads, dim, dim))
    covs = factors @ factors.transpose(0, 2, 1)
    counts = np.array([400.0, 300.0, 200.0, 150.0])
    tails = rng.normal(size=(6, dim))
    mean, cov = ladc_calibrated_stats(torch.tensor(tails), torch.tensor(means), torch.tensor(covs), counts.tolist(),
                                      m=3, alpha=0.15, beta=0.7, weighting=weighting)
    indices, weights = ladc_neighbours(torch.tensor(tails), torch.tensor(means), counts.tolist(), 3, weighting)
    for row, x in enumerate(tails):
        nearest, w, mu, sigma = _numpy_calibrated(x, means, covs, counts, 3, 0.15, 0.7, weighting)
        assert indices[row].tolist() == nearest.tolist()
        np.testing.assert_allclose(weights[row].numpy(), w, atol=1e-10)
        np.testing.assert_allclose(mean[row].numpy(), mu, atol=1e-10)
        np.testing.assert_allclose(cov[row].numpy(), sigma, atol=1e-9)
    single_mean, single_cov = ladc_calibrated_stats(torch.tensor(tails[0]), torch.tensor(means), torch.tensor(covs),
                                                    counts.tolist(), m=3, alpha=0.15, beta=0.7, weighting=weighting)
    assert torch.allclose(single_mean, mean[0]) and torch.allclose(single_cov, cov[0])


def test_inverse_weights_favour_the_nearer_head_and_printed_the_farther():
    means = torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    x = torch.zeros(1, 2)  # squared distances 1 and 9, equal counts
    _, inverse = ladc_neighbours(x, means, [10, 10], 2, "inverse")
    _, printed = ladc_neighbours(x, means, [10, 10], 2, "printed")
    assert inverse[0].tolist() == pytest.approx([0.9, 0.1])
    assert printed[0].tolist() == pytest.approx([0.1, 0.9])


def test_samples_have_the_calibrated_mean_and_covariance():
    """Draws from factors F F^T + diag(v) match ladc_calibrated_stats' Gaussian (eq. 7, 12)."""
    rng = np.random.default_rng(2)
    dim, heads, draws = 3, 3, 200_000
    means = rng.normal(size=(heads, dim))
    factors = rng.normal(size=(heads, dim, 2)) * 0.7           # low-rank part
    variances = rng.uniform(0.1, 0.5, size=(heads, dim))       # diagonal remainder
    covs = factors @ factors.transpose(0, 2, 1) + np.stack([np.diag(v) for v in variances])
    counts = [300, 200, 100]
    x = torch.tensor(rng.normal(size=(1, dim)))
    mean, cov = ladc_calibrated_stats(x, torch.tensor(means), torch.tensor(covs), counts, 2, 0.2, 1.3)
    indices, weights = ladc_neighbours(x, torch.tensor(means), counts, 2)
    samples = ladc_sample_calibrated(mean.expand(draws, dim), indices.expand(draws, 2), weights.expand(draws, 2),
                                     torch.tensor(factors), torch.tensor(variances), 0.2, 1.3,
                                     torch.Generator().manual_seed(0), max_elements=dim * 2 * 5000)
    np.testing.assert_allclose(samples.mean(0).numpy(), mean[0].numpy(), atol=0.01)
    np.testing.assert_allclose(np.cov(samples.numpy(), rowvar=False), cov[0].numpy(), atol=0.01)


def test_sampling_probs_match_eq13():
    counts = np.array([500.0, 100.0, 20.0])
    tau = 1.2
    raw = counts[0] / counts ** tau
    assert ladc_sampling_probs(counts.tolist(), tau, per="class").numpy() == pytest.approx(raw / raw.sum())
    assert ladc_sampling_probs([500, 100, 20], 0.0, per="class").tolist() == pytest.approx([1 / 3] * 3)


def test_sampling_probs_per_instance_weigh_each_image_by_eq13():
    # each image of class i weighs 500 / n_i^1.2, so the class's share is n_i * that: by hand,
    # 500^-0.2 = 0.28854, 100^-0.2 = 0.39811, 20^-0.2 = 0.54928 (sum 1.23593)
    shares = ladc_sampling_probs([500, 100, 20], 1.2)  # the default reading
    assert shares.tolist() == pytest.approx([0.23346, 0.32211, 0.44443], abs=1e-5)
    assert ladc_sampling_probs([500, 100, 20], 1.0, per="instance").tolist() == pytest.approx([1 / 3] * 3)
    assert ladc_sampling_probs([500, 100, 20], 0.0, per="instance").tolist() == pytest.approx([500 / 620, 100 / 620, 20 / 620])
    with pytest.raises(ValueError, match="unknown per='image'"):
        ladc_sampling_probs([500, 100, 20], 1.2, per="image")
