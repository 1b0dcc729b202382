"""The registered loss modules and the NCM head against formulas written out here, element by element
in float64, not through the ``longtail.functional`` functions they call (a wrong wrapper, a wrong
buffer, or a wrong functional all show up)."""
import math

import pytest
import torch

from longtail.registry import LOSSES, load_all
from longtail.stage2.heads import NCMHead
from longtail.types import ModelOutput

COUNTS = [50, 20, 5, 1]


def loss_module(name: str, **params) -> torch.nn.Module:
    load_all()
    return LOSSES.build(name, params, class_counts=COUNTS, num_classes=len(COUNTS))


def cases() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(6, len(COUNTS), generator=generator)
    return logits, torch.tensor([0, 1, 2, 3, 3, 2])


def per_sample(module: torch.nn.Module, logits: torch.Tensor, targets: torch.Tensor) -> list[float]:
    output = ModelOutput(logits=logits, features=torch.zeros(len(logits), 1))
    return module(output, targets).tolist()


def neg_log_softmax(row: list[float], target: int) -> float:
    exps = [math.exp(value) for value in row]
    return -math.log(exps[target] / sum(exps))


def test_balanced_softmax_module_is_ce_over_count_weighted_exponentials():
    # Ren et al. 2020: p_y = n_y exp(z_y) / sum_j n_j exp(z_j)
    logits, targets = cases()
    expected = []
    for row, y in zip(logits.double().tolist(), targets.tolist()):
        weighted = [n * math.exp(z) for n, z in zip(COUNTS, row)]
        expected.append(-math.log(weighted[y] / sum(weighted)))
    assert per_sample(loss_module("balanced_softmax"), logits, targets) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("tau", [1.0, 0.5, 2.0])
def test_logit_adjustment_module_adds_tau_log_prior(tau):
    # Menon et al. 2021, eq. 10: CE on z_j + tau log pi_j with pi_j = n_j / sum n
    logits, targets = cases()
    total = sum(COUNTS)
    expected = [neg_log_softmax([z + tau * math.log(n / total) for z, n in zip(row, COUNTS)], y)
                for row, y in zip(logits.double().tolist(), targets.tolist())]
    assert per_sample(loss_module("logit_adjustment", tau=tau), logits, targets) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0])
def test_focal_module_is_modulated_log_likelihood(gamma):
    # Lin et al. 2017: -(1 - p_y)^gamma log p_y
    logits, targets = cases()
    expected = []
    for row, y in zip(logits.double().tolist(), targets.tolist()):
        p = math.exp(-neg_log_softmax(row, y))
        expected.append(-((1 - p) ** gamma) * math.log(p))
    assert per_sample(loss_module("focal", gamma=gamma), logits, targets) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("norm", ["cl2n", "l2"])
def test_ncm_head_is_minus_squared_distance_to_normalised_class_means(norm):
    # Kang et al.'s cl2n: subtract the mean of all training features, then L2-normalise; l2: normalise only
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(12, 5, generator=generator) * 4 + 1
    targets = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 2])
    queries = torch.randn(7, 5, generator=generator) * 3
    rows = features.double().tolist()
    centre = [sum(column) / len(rows) for column in zip(*rows)] if norm == "cl2n" else [0.0] * 5

    def normalised(vector: list[float]) -> list[float]:
        shifted = [v - c for v, c in zip(vector, centre)]
        length = math.sqrt(sum(v * v for v in shifted))
        return [v / length for v in shifted]

    means = []
    for c in range(3):
        members = [normalised(f) for f, t in zip(rows, targets.tolist()) if t == c]
        means.append([sum(column) / len(members) for column in zip(*members)])
    expected = [[-sum((q - m) ** 2 for q, m in zip(normalised(query), mean)) for mean in means]
                for query in queries.double().tolist()]
    head = NCMHead.fit(features, targets, num_classes=3, norm=norm)
    assert head(queries).flatten().tolist() == pytest.approx(sum(expected, []), abs=1e-5)
