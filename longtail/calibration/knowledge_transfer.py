"""Knowledge-transfer temperature scaling (Chen & Su, "Transfer Knowledge from Head to Tail:
Uncertainty Calibration under Long-tailed Distribution", CVPR 2023, Sec. 3.3): temperature scaling
whose validation loss is importance-weighted so that it estimates the loss on a balanced test set.

The four steps of the paper's "Training procedures", each callable alone:
1. class Gaussians of the training features (:func:`longtail.functional.diagonal_class_gaussians`);
2. head classes, ``n_c >= zeta`` (:func:`head_mask_from_counts`);
3. importance weights of the validation samples from the head-to-tail calibrated Gaussians, eq. 5-8
   (:func:`longtail.functional.kt_importance_weights`);
4. the temperature by weighted NLL, eq. 9 (:func:`longtail.functional.fit_temperature`).
As the authors' code (JiahaoChen1/Calibration), the Gaussians come from the training features, not
the validation ones the paper's text names.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from longtail.calibration.calibrators import TemperatureScaling
from longtail.functional import diagonal_class_gaussians, fit_temperature, kt_importance_weights
from longtail.registry import CALIBRATORS

__all__ = ["head_mask_from_counts", "KnowledgeTransferTS"]


def head_mask_from_counts(class_counts: Sequence[int] | torch.Tensor, head_threshold: float | None = None
                          ) -> torch.Tensor:
    """Head classes ``A_head = {c | n_c >= zeta}`` (Chen & Su 2023, Sec. 3.1) as a bool mask.

    ``head_threshold=None`` takes zeta = the mean class count: on the authors' CIFAR-10-LT set-up
    (IF 10, 80 % of the long-tailed training set) that gives their 4 head classes (``--num_head_cls 4``).
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float64)
    if counts.ndim != 1 or counts.numel() == 0:
        raise ValueError(f"class_counts must be one count per class, got shape {tuple(counts.shape)}")
    zeta = float(counts.mean()) if head_threshold is None else float(head_threshold)
    mask = counts >= zeta
    if not bool(mask.any()):
        raise ValueError(f"no class has >= {zeta:g} training samples (largest {int(counts.max())}), so there is "
                         "no head class to transfer from; lower head_threshold")
    return mask


@CALIBRATORS.register("kt_ts")
class KnowledgeTransferTS(TemperatureScaling):
    """Temperature scaling with the knowledge-transfer importance weights (eq. 9).

    alpha: weight of the tail class's own statistics in eq. 7. Default 0.998, the value of the
        authors' command line (their class default is 0.9).
    head_threshold: zeta; None = the mean training class count (see :func:`head_mask_from_counts`).
    eta: weight clip (eta1, eta2) of eq. 8; (0.3, 5.0) in the paper and code.
    var_floor: added lower bound on the class variances. Not in the authors' code, which fails on a
        zero variance (a class of one sample, or a ReLU unit never active in a class); 1e-6 is far
        below the variance of real features, so it changes nothing else.
    """

    name = "kt_ts"
    needs_features = True

    def __init__(self, alpha: float = 0.998, head_threshold: float | None = None,
                 eta: Sequence[float] = (0.3, 5.0), var_floor: float = 1e-6) -> None:
        super().__init__()
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if len(eta) != 2 or not 0 < eta[0] <= eta[1]:
            raise ValueError(f"eta must be (eta1, eta2) with 0 < eta1 <= eta2, got {eta}")
        if var_floor < 0:
            raise ValueError(f"var_floor must be >= 0, got {var_floor}")
        self.alpha = float(alpha)
        self.head_threshold = head_threshold
        self.eta = (float(eta[0]), float(eta[1]))
        self.var_floor = float(var_floor)
        self.head_mask = torch.zeros(0, dtype=torch.bool)
        self.weights = torch.zeros(0, dtype=torch.float64)

    def config(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "head_threshold": self.head_threshold, "eta": list(self.eta),
                "var_floor": self.var_floor}

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, features: torch.Tensor | None = None,
            train_features: torch.Tensor | None = None, train_targets: torch.Tensor | None = None,
            class_counts: Sequence[int] | None = None, head_mask: Sequence[bool] | torch.Tensor | None = None,
            **extra: Any) -> "KnowledgeTransferTS":
        """logits, targets, features: the validation split; train_features/train_targets: the split the
        model was trained on; class_counts: its class sizes (default: counted from train_targets);
        head_mask: overrides the head_threshold rule."""
        if features is None or train_features is None or train_targets is None:
            raise ValueError("kt_ts needs features= (validation features), train_features= and train_targets= "
                             "besides the validation logits and targets: it models each class's feature Gaussian")
        if features.shape[0] != logits.shape[0]:
            raise ValueError(f"features has {features.shape[0]} rows but logits has {logits.shape[0]}; "
                             "both must be the validation split, in the same order")
        num_classes = logits.shape[1]
        means, variances = diagonal_class_gaussians(train_features.detach(), train_targets.detach(), num_classes)
        variances = variances.clamp(min=self.var_floor)
        if head_mask is None:
            counts = (torch.bincount(train_targets.detach().long().cpu(), minlength=num_classes)
                      if class_counts is None else class_counts)
            head_mask = head_mask_from_counts(counts, self.head_threshold)
        self.head_mask = torch.as_tensor(head_mask, dtype=torch.bool).cpu()
        self.weights = kt_importance_weights(features.detach(), targets.detach(), means, variances,
                                             self.head_mask.to(means.device), self.alpha, self.eta).cpu()
        self.temperature = fit_temperature(logits.detach(), targets.detach(),
                                           sample_weight=self.weights.to(logits.device))
        self.num_classes = num_classes
        return self

    def _fitted_state(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "head_mask": self.head_mask.tolist()}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])
        self.head_mask = torch.tensor(state["head_mask"], dtype=torch.bool)
