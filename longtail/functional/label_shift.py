"""Label shift: the test class prior differs from the training one, p_test(x | y) = p_train(x | y).

Not from a seed paper: Saerens, Latinne & Decaestecker (2002), "Adjusting the outputs of a classifier
to new a priori probabilities: a simple procedure", Neural Computation 14(1). For a calibrated model,
Bayes' rule gives the test posterior from the training one by re-weighting with the prior ratio
(their eq. 2.4), and the test prior is the fixed point of an EM loop (their eqs. 2.9-2.10). In logit
space the re-weighting is an additive ``log p_test(y) - log p_train(y)``, the post-hoc logit adjustment
of Menon et al. (2021, eq. 9) with tau = 1 when p_test is uniform.
"""
from __future__ import annotations

import torch

__all__ = ["prior_corrected_logits", "em_label_shift"]


def _prior(prior: torch.Tensor | list[float], num_classes: int, name: str, zeros: bool = False) -> torch.Tensor:
    """``prior`` normalised; a test prior may give a class no mass (EM can drive a class to 0)."""
    prior = torch.as_tensor(prior, dtype=torch.float64)
    if prior.shape != (num_classes,) or bool((prior < 0).any()) or (not zeros and bool((prior == 0).any())) \
            or float(prior.sum()) <= 0:
        raise ValueError(f"{name} must be ({num_classes},) with {'non-negative' if zeros else 'positive'} entries, "
                         f"got {prior.tolist()}")
    return prior / prior.sum()


def prior_corrected_logits(logits: torch.Tensor, train_prior: torch.Tensor | list[float],
                           test_prior: torch.Tensor | list[float]) -> torch.Tensor:
    """``logits + log test_prior - log train_prior`` (Saerens et al. 2002, eq. 2.4 in logit space):
    their softmax is the posterior under the test prior when ``softmax(logits)`` is the posterior
    under the training prior. Priors are normalised here; a class with test prior 0 gets logit -inf.
    Returned in the dtype of ``logits``."""
    num_classes = logits.shape[-1]
    shift = (_prior(test_prior, num_classes, "test_prior", zeros=True).log()
             - _prior(train_prior, num_classes, "train_prior").log())
    return (logits.double() + shift.to(logits.device)).to(logits.dtype)


def em_label_shift(probs: torch.Tensor, train_prior: torch.Tensor | list[float], max_iter: int = 1000,
                   tol: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """Saerens et al. (2002) EM estimate of the test prior from unlabelled test posteriors.

    ``probs`` (N, C): the model's posteriors on the test set (under the training prior, so calibrate
    first). Starting from the training prior, alternate (eq. 2.9) ``p(y | x) ∝ probs * prior / train_prior``
    and (eq. 2.10) ``prior = mean_x p(y | x)`` until the prior moves less than ``tol`` (max abs change).
    Returns (estimated test prior (C,), adjusted posteriors (N, C)), float64.
    """
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"probs must be (N, C) with N >= 1, got shape {tuple(probs.shape)}")
    probs = probs.double()
    train = _prior(train_prior, probs.shape[1], "train_prior").to(probs.device)
    prior = train.clone()
    posterior = probs
    for _ in range(max_iter):
        weighted = probs * (prior / train)
        posterior = weighted / weighted.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        new_prior = posterior.mean(dim=0)
        converged = float((new_prior - prior).abs().max()) < tol
        prior = new_prior
        if converged:
            break
    weighted = probs * (prior / train)
    return prior, weighted / weighted.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
