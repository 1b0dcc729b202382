"""Label-shift functions (Saerens et al. 2002) against independent numpy loops, and EM recovering a
known test prior from a model that is calibrated by construction."""
import math

import numpy as np
import pytest
import torch

from longtail.data import ImageSet
from longtail.functional import em_label_shift, prior_corrected_logits


def _numpy_bayes_posterior(probs, train, test):
    """Saerens eq. 2.4, one sample and one class at a time."""
    out = np.zeros_like(probs)
    for n in range(probs.shape[0]):
        weights = [probs[n, k] * test[k] / train[k] for k in range(probs.shape[1])]
        total = sum(weights)
        for k in range(probs.shape[1]):
            out[n, k] = weights[k] / total
    return out


def test_prior_corrected_logits_is_bayes_rule():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 4, generator=generator, dtype=torch.float64) * 3
    train, test = [0.5, 0.3, 0.15, 0.05], [1.0, 2.0, 3.0, 4.0]  # the test prior unnormalised on purpose
    expected = _numpy_bayes_posterior(logits.softmax(1).numpy(), np.array(train), np.array(test) / 10)
    got = prior_corrected_logits(logits, train, test).softmax(1).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-15)


def test_em_matches_a_numpy_loop():
    generator = torch.Generator().manual_seed(1)
    probs = (torch.randn(50, 3, generator=generator, dtype=torch.float64) * 2).softmax(1)
    train = np.array([0.6, 0.3, 0.1])
    prior = train.copy()
    for _ in range(25):  # eqs. 2.9 and 2.10 written out
        posterior = _numpy_bayes_posterior(probs.numpy(), train, prior)
        prior = posterior.mean(axis=0)
    estimate, adjusted = em_label_shift(probs, train, max_iter=25, tol=0.0)
    np.testing.assert_allclose(estimate.numpy(), prior, rtol=1e-12)
    np.testing.assert_allclose(adjusted.numpy(), _numpy_bayes_posterior(probs.numpy(), train, prior), rtol=1e-10)


@pytest.mark.parametrize("test_prior", [[0.05, 0.1, 0.15, 0.3, 0.4], [0.4, 0.3, 0.15, 0.1, 0.05], [0.2] * 5])
def test_em_recovers_a_known_prior_from_a_calibrated_model(test_prior):
    """Classes are unit Gaussians around 4 * e_k in 5-D; the logits ``log N(x; mu_k, I) + log pi_train(k)``
    are the exact training posterior, i.e. a perfectly calibrated model. The test set draws N labels
    from ``test_prior``.

    Tolerance: EM converges to the maximum-likelihood prior (Saerens et al. 2002, sec. 2.2). Were the
    labels known, the MLE would be the label frequencies, whose error per class has standard deviation
    sqrt(q (1 - q) / N) <= 0.5 / sqrt(N). Without labels the Fisher information is smaller by the
    overlap of the classes; here two classes are 4 * sqrt(2) = 5.66 sigma apart, so a sample is on the
    wrong side of a boundary with probability Phi(-2.83) = 0.23 % and the variance grows by a factor
    close to 1 (well under 2). Five standard deviations of the labelled estimate, times sqrt(2) for
    that factor: 5 * sqrt(2) * 0.5 / sqrt(N), 0.025 at N = 20,000; ignoring the train/test prior ratio
    (the train prior is 10:1) misses by 0.1 or more, so the test can fail.
    """
    num_classes, n = 5, 20_000
    generator = torch.Generator().manual_seed(2)
    train_prior = torch.tensor([10.0, 5.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    train_prior /= train_prior.sum()
    labels = torch.multinomial(torch.tensor(test_prior, dtype=torch.float64), n, replacement=True, generator=generator)
    means = 4.0 * torch.eye(num_classes, dtype=torch.float64)
    x = means[labels] + torch.randn(n, num_classes, generator=generator, dtype=torch.float64)
    log_likelihood = -0.5 * ((x[:, None, :] - means[None]) ** 2).sum(-1)
    logits = log_likelihood + train_prior.log()
    estimate, adjusted = em_label_shift(logits.softmax(1), train_prior)
    tolerance = 5 * math.sqrt(2) * 0.5 / math.sqrt(n)
    assert float((estimate - torch.tensor(test_prior, dtype=torch.float64)).abs().max()) < tolerance
    # the adjusted posteriors are the prior-corrected logits' softmax at the estimate
    torch.testing.assert_close(adjusted, prior_corrected_logits(logits, train_prior, estimate).softmax(1))


def test_bad_priors_are_clear_errors():
    with pytest.raises(ValueError, match="train_prior"):
        em_label_shift(torch.full((3, 2), 0.5), [1.0, 0.0])
    with pytest.raises(ValueError, match="test_prior"):
        prior_corrected_logits(torch.zeros(3, 2), [0.5, 0.5], [0.2, 0.3, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        prior_corrected_logits(torch.zeros(3, 2), [0.5, 0.5], [-0.2, 1.2])


@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("factor", [2, 10, 50])
def test_shifted_test_sets_have_the_requested_class_counts(direction, factor):
    from longtail.data.shifts import shifted_test_set
    test = ImageSet(torch.arange(10).repeat_interleave(100), 10, [str(c) for c in range(10)],
                    paths=[f"{i}.png" for i in range(1000)], image_size=8)
    shifted = shifted_test_set(test, factor, direction, seed=3)
    # Cao et al.'s exponential profile written out: 100 * factor ** (-i / 9), floored
    expected = [int(100 * factor ** (-i / 9)) for i in range(10)]
    assert shifted.class_counts() == (expected if direction == "forward" else expected[::-1])
    assert shifted_test_set(test, factor, direction, seed=3).paths == shifted.paths  # seeded
    assert shifted_test_set(test, factor, direction, seed=4).paths != shifted.paths
