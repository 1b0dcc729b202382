"""Label mixing rules of mixed-sample augmentation."""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["remix_label_weight"]


def remix_label_weight(lam: float, targets: torch.Tensor, mix_targets: torch.Tensor,
                       class_counts: Sequence[int] | torch.Tensor, kappa: float = 3.0,
                       tau: float = 0.5) -> torch.Tensor:
    """Remix's weight of label ``targets`` (Chou et al. 2020, eq. 4; used by LADC, Wang
    et al., AAAI 2022, "Representation Enhancement").

    The images are mixed as ``lam * x_i + (1 - lam) * x_j``; the label weight of ``y_i`` is
    0 if ``n_i / n_j >= kappa`` and ``lam < tau`` (the minority partner takes the whole label),
    1 if ``n_i / n_j <= 1 / kappa`` and ``1 - lam < tau``, and ``lam`` otherwise.
    Returns (B,) float32; the loss is ``w * L(y_i) + (1 - w) * L(y_j)``.
    """
    counts = torch.as_tensor(class_counts, dtype=torch.float32, device=targets.device)
    n_i, n_j = counts[targets], counts[mix_targets]
    weight = torch.full(targets.shape, float(lam), dtype=torch.float32, device=targets.device)
    # the ratio tests are written as products so integer counts compare exactly with 1 / kappa
    weight = weight.masked_fill((n_i >= kappa * n_j) & (lam < tau), 0.0)
    return weight.masked_fill((kappa * n_i <= n_j) & (1.0 - lam < tau), 1.0)
