"""Loss modules: registry contract (per-sample output, config errors) and their epoch state."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import longtail.losses  # noqa: F401  (registers the losses)
from longtail.functional import balanced_softmax_loss, ldam_loss, ride_diversity_loss, shike_dkt_loss, shike_mutual_loss
from longtail.losses.terms import as_terms
from longtail.registry import LOSSES, ConfigError
from longtail.types import Batch, ModelOutput

COUNTS = [60, 20, 8, 3]
C = len(COUNTS)


def make_output(batch=6, experts=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    expert_logits = torch.randn(experts, batch, C, generator=g, requires_grad=True)
    return ModelOutput(logits=expert_logits.sum(0), features=torch.rand(batch, 5, generator=g),
                       expert_logits=expert_logits)


def targets(batch=6):
    return torch.arange(batch) % C


def build(name, **params):
    return LOSSES.build(name, params, where="loss.params", class_counts=COUNTS, num_classes=C, num_samples=20)


# Parameters each registered loss is built with in the contract test below: one entry per name in
# LOSSES, so a newly registered loss fails test_every_registered_loss_has_test_params until it has one.
LOSS_PARAMS = {
    "ce": {}, "label_smoothing": {}, "focal": {}, "class_balanced": {}, "ldam_drw": {},
    "balanced_softmax": {}, "logit_adjustment": {}, "shike": {}, "ride": {}, "ikl": {},
}


def test_every_registered_loss_has_test_params():
    assert sorted(LOSS_PARAMS) == sorted(LOSSES.names())


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_loss_returns_a_differentiable_per_sample_loss(name):
    loss = build(name, **LOSS_PARAMS[name])
    if hasattr(loss, "on_epoch_start"):
        loss.on_epoch_start(0, 10)
    output = make_output()
    batch = Batch(images=torch.zeros(6, 3, 2, 2), targets=targets(), indices=torch.arange(6))
    result = as_terms(loss(output, targets(), batch))
    values = result.total
    assert values.shape == (6,) and bool(torch.isfinite(values).all())
    if result.terms:  # the named parts add up to what is trained
        torch.testing.assert_close(sum(result.terms.values()), values)
    values.mean().backward()
    assert output.expert_logits.grad.abs().sum() > 0


def test_unknown_parameter_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="allowed: base, beta, gamma"):
        build("class_balanced", gama=2.0)


def test_plain_losses_match_torch():
    output, y = make_output(), targets()
    torch.testing.assert_close(build("ce")(output, y), F.cross_entropy(output.logits, y, reduction="none"))
    torch.testing.assert_close(build("label_smoothing", epsilon=0.3)(output, y),
                               F.cross_entropy(output.logits, y, reduction="none", label_smoothing=0.3))


def test_class_balanced_is_a_plain_mean_of_weighted_losses():
    output, y = make_output(), targets()
    beta = 0.99
    raw = np.array([(1 - beta) / (1 - beta ** n) for n in COUNTS])
    weights = raw / raw.sum() * C
    ce = F.cross_entropy(output.logits, y, reduction="none").detach().numpy()
    got = build("class_balanced", beta=beta)(output, y).detach().numpy()
    np.testing.assert_allclose(got, weights[y.numpy()] * ce, rtol=1e-5)  # Cui et al.'s: sum(w l) / B
    # Cao et al.'s nn.CrossEntropyLoss(weight=w): sum(w l) / sum(w)
    by_weight_sum = build("class_balanced", beta=beta, normalize="weight_sum")(output, y)
    expected = F.cross_entropy(output.logits, y, weight=torch.tensor(weights, dtype=torch.float32))
    assert by_weight_sum.mean().item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="'ce' or 'focal'"):
        build("class_balanced", base="sigmoid")
    with pytest.raises(ConfigError, match="normalize"):
        build("class_balanced", normalize="sum")


def test_ldam_drw_switches_to_class_balanced_weights_at_drw_epoch():
    output, y = make_output(), targets()
    loss = build("ldam_drw")
    loss.on_epoch_start(159, 200)  # default: 80 % of the run, epoch 160 of 200
    torch.testing.assert_close(loss(output, y), ldam_loss(output.logits, y, COUNTS, reduction="none"))
    loss.on_epoch_start(160, 200)
    margins = np.array(COUNTS, dtype=float) ** -0.25
    margins = 0.5 * margins / margins.max()
    shifted = output.logits.detach() - torch.tensor(margins, dtype=torch.float32)[y, None] * F.one_hot(y, C)
    raw = np.array([(1 - 0.9999) / (1 - 0.9999 ** n) for n in COUNTS])
    weight = torch.tensor(raw / raw.sum() * C, dtype=torch.float32)
    # the batch mean is torch's weighted mean, as Cao et al.'s F.cross_entropy(weight=...)
    expected = F.cross_entropy(30 * shifted, y, weight=weight)
    assert loss(output, y).mean().item() == pytest.approx(expected.item(), rel=1e-5)
    cui = build("ldam_drw", normalize="batch")  # the other normalisation: sum(w l) / B
    cui.on_epoch_start(160, 200)
    expected_batch = (F.cross_entropy(30 * shifted, y, reduction="none") * weight[y]).mean()
    assert cui(output, y).mean().item() == pytest.approx(expected_batch.item(), rel=1e-5)
    explicit = build("ldam_drw", drw_epoch=3)
    explicit.on_epoch_start(2, 200)
    assert explicit.weight.tolist() == [1.0] * C
    explicit.on_epoch_start(3, 200)
    assert explicit.weight.tolist() == pytest.approx(weight.tolist())


def test_shike_loss_is_eq_10_with_the_authors_effective_weights():
    output, y = make_output(), targets()
    experts = output.expert_logits
    ce = sum(F.cross_entropy(z, y, reduction="none") for z in experts)
    expected = ce + 10.0 / C * shike_dkt_loss(experts, y, reduction="none") \
        + 1.0 / C * shike_mutual_loss(experts, reduction="none")
    result = build("shike")(output, y)
    torch.testing.assert_close(result.total, expected)
    torch.testing.assert_close(result.terms["ce"], ce)
    torch.testing.assert_close(result.terms["dkt"], 10.0 / C * shike_dkt_loss(experts, y, reduction="none"))
    torch.testing.assert_close(result.terms["mutual"], 1.0 / C * shike_mutual_loss(experts, reduction="none"))
    custom = ce + 2.0 * shike_dkt_loss(experts, y, reduction="none") \
        + 0.5 * shike_mutual_loss(experts, reduction="none")
    torch.testing.assert_close(build("shike", alpha=2.0, beta=0.5)(output, y).total, custom)
    paper = build("shike", dkt_form="paper")(output, y).terms["dkt"]
    torch.testing.assert_close(paper, 10.0 / C * shike_dkt_loss(experts, y, reduction="none", form="paper"))
    assert not torch.allclose(paper, result.terms["dkt"])  # the two forms differ (the default is the code's)
    with pytest.raises(ValueError, match="dkt_form"):
        build("shike", dkt_form="eq8")
    single = ModelOutput(logits=output.logits, features=output.features)
    with pytest.raises(ValueError, match="multi-expert model"):
        build("shike")(single, y)


def test_ride_loss_per_expert_base_plus_diversity_and_class_temperature():
    output, y = make_output(), targets()
    experts = output.expert_logits
    loss = build("ride", base="balanced_softmax", diversity_factor=-0.2, diversity_temperature=1.5)
    loss.on_epoch_start(0, 10)
    base = sum(balanced_softmax_loss(z, y, COUNTS, reduction="none") for z in experts)
    result = loss(output, y)
    torch.testing.assert_close(result.total, base - 0.2 * ride_diversity_loss(experts, 1.5, reduction="none"))
    torch.testing.assert_close(result.terms["base"], base)
    loss.on_epoch_start(8, 10)  # from 80 % of the run: per-class temperature as RIDE's code
    prior = np.array(COUNTS) / sum(COUNTS)
    weights = C * prior * 0.05 + 1 - 0.05
    assert loss.temperature.tolist() == pytest.approx((1.5 * weights / weights.max()).tolist())
    with pytest.raises(ValueError, match="single-prediction loss"):
        build("ride", base="shike")


def test_ride_forwards_the_drw_switch_to_its_base():
    loss = build("ride", base_params={"drw_epoch": 2})
    loss.on_epoch_start(1, 10)
    assert loss.base.weight.tolist() == [1.0] * C
    loss.on_epoch_start(2, 10)
    assert loss.base.weight.tolist() != [1.0] * C
    with pytest.raises(ConfigError, match="loss.params.base_params.drw_epochs"):
        build("ride", base_params={"drw_epochs": 2})


def test_counts_are_checked_when_built():
    with pytest.raises(ValueError, match=r"classes \[2\] have no training images"):
        LOSSES.build("balanced_softmax", {}, class_counts=[5, 2, 0], num_classes=3)
    with pytest.raises(ValueError, match="3 class counts for 4 classes"):
        LOSSES.build("ce", {}, class_counts=[5, 2, 1], num_classes=4)
