"""The loss formulas of longtail.functional against hand / numpy computations (not the same code)."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from longtail.functional import (balanced_softmax_loss, class_balanced_weights, focal_loss, ikl_alpha,
                                 ikl_class_medians, ikl_correlation_labels, ikl_uncertainty_loss,
                                 label_smoothing_loss, ldam_loss, ldam_margins, logit_adjusted_loss,
                                 normalize_weighted_losses,
                                 ride_class_temperatures, ride_diversity_loss, shike_dkt_loss, shike_grand_teacher,
                                 shike_mutual_loss,
                                 soft_target_cross_entropy)

LOGITS = np.array([[1.0, -0.5, 2.0], [0.3, 0.2, -1.0], [-2.0, 1.5, 0.5], [0.0, 0.0, 0.0]])
TARGETS = np.array([0, 1, 2, 1])
COUNTS = [100, 10, 1]


def np_log_softmax(z):
    z = np.asarray(z, dtype=np.float64)
    shifted = z - z.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def np_ce(z, y):
    return -np_log_softmax(z)[np.arange(len(y)), y]


def np_kl(p, q):
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1)) - np.log(q)), 0.0), axis=-1)


def t(array, dtype=torch.float32):
    return torch.tensor(np.asarray(array), dtype=dtype)


# ------------------------------------------------------------------------------ single-prediction losses

def test_balanced_softmax_is_ce_on_logits_plus_log_counts():
    expected = np_ce(LOGITS + np.log(COUNTS), TARGETS)
    got = balanced_softmax_loss(t(LOGITS), t(TARGETS, torch.long), COUNTS, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    assert balanced_softmax_loss(t(LOGITS), t(TARGETS, torch.long), COUNTS).item() == pytest.approx(expected.mean())


def test_logit_adjusted_loss_uses_tau_times_log_prior():
    prior = np.array(COUNTS) / sum(COUNTS)
    expected = np_ce(LOGITS + 0.5 * np.log(prior), TARGETS)
    got = logit_adjusted_loss(t(LOGITS), t(TARGETS, torch.long), COUNTS, tau=0.5, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    # tau = 1: the prior and the counts differ by a constant, so this is the balanced softmax
    tau_one = logit_adjusted_loss(t(LOGITS), t(TARGETS, torch.long), COUNTS, reduction="sum").item()
    assert tau_one == pytest.approx(np_ce(LOGITS + np.log(COUNTS), TARGETS).sum(), rel=1e-6)


def test_ldam_two_classes_by_hand():
    # n = (16, 1): n^(-1/4) = (0.5, 1) -> margins (0.25, 0.5) once the largest is 0.5
    assert ldam_margins([16, 1]).tolist() == pytest.approx([0.25, 0.5])
    logits = t([[0.2, -0.1], [0.2, -0.1]])
    targets = torch.tensor([0, 1])
    # sample 0, class 0: s * (0.2 - 0.25, -0.1) = (-1.5, -3.0)  -> CE = log(1 + e^(-1.5))
    # sample 1, class 1: s * (0.2, -0.1 - 0.5) = (6.0, -18.0)   -> CE = log(1 + e^(24))
    expected = [math.log1p(math.exp(-1.5)), math.log1p(math.exp(24.0))]
    got = ldam_loss(logits, targets, [16, 1], max_margin=0.5, scale=30.0, reduction="none")
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    weighted = ldam_loss(logits, targets, [16, 1], weight=t([1.0, 3.0]))
    assert weighted.item() == pytest.approx((expected[0] + 3 * expected[1]) / 4, rel=1e-5)
    # the recipes' form: a head that already multiplies its cosines by s = 30, margins in those units
    prescaled = ldam_loss(30 * logits, targets, [16, 1], max_margin=15.0, scale=1.0, reduction="none")
    assert prescaled.tolist() == pytest.approx(expected, rel=1e-5)


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, targets = t(LOGITS), t(TARGETS, torch.long)
    weight = t([0.2, 1.0, 3.0])
    assert focal_loss(logits, targets, gamma=0.0).item() == pytest.approx(F.cross_entropy(logits, targets).item())
    assert focal_loss(logits, targets, gamma=0.0, weight=weight).item() == pytest.approx(
        F.cross_entropy(logits, targets, weight=weight).item(), rel=1e-6)


def test_focal_down_weights_easy_samples_by_hand():
    p = np.exp(np_log_softmax(LOGITS))[np.arange(4), TARGETS]
    expected = -(1 - p) ** 2 * np.log(p)
    got = focal_loss(t(LOGITS), t(TARGETS, torch.long), gamma=2.0, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_weight_normalisations_by_hand():
    # per-sample losses l = (1, 2, 3) of samples whose class weights are w = (2, 1, 1): w l = (2, 2, 3)
    weighted, weights = torch.tensor([2.0, 2.0, 3.0]), torch.tensor([2.0, 1.0, 1.0])
    # weight_sum: (2 + 2 + 3) / (2 + 1 + 1) = 7 / 4; each value times B / sum(w) = 3 / 4
    by_weight_sum = normalize_weighted_losses(weighted, weights, "weight_sum")
    assert by_weight_sum.tolist() == pytest.approx([1.5, 1.5, 2.25])
    assert by_weight_sum.mean().item() == pytest.approx(7 / 4)
    # batch: (2 + 2 + 3) / 3 = 7 / 3, the values unchanged
    assert normalize_weighted_losses(weighted, weights, "batch").tolist() == [2.0, 2.0, 3.0]
    assert normalize_weighted_losses(weighted, weights, "batch").mean().item() == pytest.approx(7 / 3)
    # weight_sum is torch's CrossEntropyLoss(weight=w) (Cao et al.'s CB and DRW); batch its per-sample mean (Cui et al.)
    logits, y, w = t(LOGITS), torch.tensor(TARGETS), torch.tensor([0.5, 2.0, 4.0])
    per_sample = F.cross_entropy(logits, y, weight=w, reduction="none")
    assert normalize_weighted_losses(per_sample, w[y], "weight_sum").mean().item() == pytest.approx(
        torch.nn.CrossEntropyLoss(weight=w)(logits, y).item(), rel=1e-6)
    assert normalize_weighted_losses(per_sample, w[y], "batch").mean().item() == pytest.approx(
        float(np.mean(np.array([0.5, 2.0, 4.0])[TARGETS] * np_ce(LOGITS, TARGETS))), rel=1e-6)
    with pytest.raises(ValueError, match="weight_sum"):
        normalize_weighted_losses(weighted, weights, "mean")


def test_class_balanced_weights_by_hand():
    # beta = 0.9, n = (10, 1): raw weights 0.1 / (1 - 0.9^10) and 0.1 / 0.1 = 1, then scaled to sum to 2
    raw = [0.1 / (1 - 0.9 ** 10), 1.0]
    expected = [2 * w / sum(raw) for w in raw]
    assert class_balanced_weights([10, 1], beta=0.9).tolist() == pytest.approx(expected, rel=1e-6)
    assert class_balanced_weights([5, 3, 1], beta=0.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="beta"):
        class_balanced_weights([5, 1], beta=1.0)


def test_label_smoothing_and_soft_targets_by_numpy():
    eps, num_classes = 0.2, 3
    soft = np.full((4, 3), eps / num_classes)
    soft[np.arange(4), TARGETS] += 1 - eps
    expected = -(soft * np_log_softmax(LOGITS)).sum(axis=1)
    got = label_smoothing_loss(t(LOGITS), t(TARGETS, torch.long), epsilon=eps, reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)
    got_soft = soft_target_cross_entropy(t(LOGITS), t(soft), reduction="none")
    np.testing.assert_allclose(got_soft.numpy(), expected, rtol=1e-6)


def test_reductions_and_input_errors():
    logits, targets = t(LOGITS), t(TARGETS, torch.long)
    assert balanced_softmax_loss(logits, targets, COUNTS, reduction="none").shape == (4,)
    assert focal_loss(logits, targets, reduction="sum").item() == pytest.approx(
        focal_loss(logits, targets, reduction="none").sum().item())
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, targets, reduction="average")
    with pytest.raises(ValueError, match="one count per class"):
        balanced_softmax_loss(logits, targets, [10, 1])
    with pytest.raises(ValueError, match=r"classes \[1\] have no training images"):
        ldam_loss(logits, targets, [10, 0, 1])
    with pytest.raises(ValueError, match="soft_targets"):
        soft_target_cross_entropy(logits, torch.ones(4, 2))


# ----------------------------------------------------------------------------------- SHIKE and RIDE

EXPERTS = np.array([  # 2 experts x 2 samples x 3 classes
    [[1.0, 3.0, 0.0], [0.5, -1.0, 2.0]],
    [[2.0, 0.0, 1.0], [1.5, 0.5, -0.5]],
])
EXPERT_TARGETS = np.array([0, 2])


def test_grand_teacher_by_hand():
    # sample 0, target 0: non-target logits (classes 1, 2) are (3, 0) and (0, 1): mean (1.5, 0.5),
    # hardest negative = class 1 -> mean 1.5 there, max over experts (1) elsewhere
    # sample 1, target 2: non-target (classes 0, 1) are (0.5, -1) and (1.5, 0.5): mean (1, -0.25),
    # hardest = class 0 -> 1.0, elsewhere max(-1, 0.5) = 0.5
    teacher = shike_grand_teacher(t(EXPERTS), t(EXPERT_TARGETS, torch.long), form="paper")
    assert teacher.tolist() == [[1.5, 1.0], [1.0, 0.5]]
    # the authors' code: the same values with the target column put back at logit 0
    teacher = shike_grand_teacher(t(EXPERTS), t(EXPERT_TARGETS, torch.long), form="code")
    assert teacher.tolist() == [[0.0, 1.5, 1.0], [1.0, 0.5, 0.0]]


def test_grand_teacher_takes_max_except_at_consensus_hardest_negative():
    experts = t([[[0.0, 4.0, 1.0, -1.0]], [[0.0, 0.0, 2.0, -3.0]], [[0.0, 0.0, 0.0, 5.0]]])  # 3 experts, target 0
    # means of classes 1..3: (4/3, 1, 1/3) -> hardest is class 1 (mean 4/3); max elsewhere: (2, 5)
    assert shike_grand_teacher(experts, torch.tensor([0]), form="paper")[0].tolist() == pytest.approx(
        [4 / 3, 2.0, 5.0])


def test_dkt_loss_by_numpy():
    teacher = np.array([[1.5, 1.0], [1.0, 0.5]])
    keep = [[1, 2], [0, 1]]
    expected = np.zeros(2)
    for m in range(2):
        student = np.stack([EXPERTS[m, b, keep[b]] for b in range(2)])
        expected += np_kl(np.exp(np_log_softmax(teacher)), np.exp(np_log_softmax(student)))
    got = shike_dkt_loss(t(EXPERTS), t(EXPERT_TARGETS, torch.long), reduction="none", form="paper")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # temperature T: both sides divided by T, the KL multiplied by T^2
    expected_t2 = np.zeros(2)
    for m in range(2):
        student = np.stack([EXPERTS[m, b, keep[b]] for b in range(2)])
        expected_t2 += 4 * np_kl(np.exp(np_log_softmax(teacher / 2)), np.exp(np_log_softmax(student / 2)))
    got_t2 = shike_dkt_loss(t(EXPERTS), t(EXPERT_TARGETS, torch.long), temperature=2.0, reduction="sum",
                            form="paper")
    assert got_t2.item() == pytest.approx(expected_t2.sum(), rel=1e-5)


def test_dkt_loss_code_form_by_hand():
    """jinyan-06/SHIKE mix_outputs: softmaxes over all C columns, the teacher's target column at logit 0,
    each expert's at -30. One expert, C = 2, logits (0, 0), target 0: the paper's KL over the single
    non-target class is 0; the code's teacher is softmax(0, 0) = (1/2, 1/2) and the student
    softmax(-30, 0), so KL = 1/2 ln((1/2) / s_0) + 1/2 ln((1/2) / s_1) = 15 - ln 2 + ln(1 + e^-30)."""
    logits, target = torch.zeros(1, 1, 2, dtype=torch.float64), torch.tensor([0])
    assert shike_dkt_loss(logits, target, form="paper").item() == pytest.approx(0.0, abs=1e-12)
    assert shike_dkt_loss(logits, target, form="code").item() == pytest.approx(
        15 - math.log(2) + math.log1p(math.exp(-30)), rel=1e-12)


def test_dkt_loss_code_form_by_numpy():
    full_teacher = np.array([[0.0, 1.5, 1.0], [1.0, 0.5, 0.0]])  # test_grand_teacher_by_hand, target at 0
    expected = np.zeros(2)
    for m in range(2):
        student = EXPERTS[m].copy()
        student[np.arange(2), EXPERT_TARGETS] = -30.0
        expected += np_kl(np.exp(np_log_softmax(full_teacher)), np.exp(np_log_softmax(student)))
    got = shike_dkt_loss(t(EXPERTS), t(EXPERT_TARGETS, torch.long), reduction="none", form="code")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    assert torch.equal(shike_dkt_loss(t(EXPERTS), t(EXPERT_TARGETS, torch.long), reduction="none"), got)
    with pytest.raises(ValueError, match="unknown SHIKE DKT form 'eq8'"):
        shike_dkt_loss(t(EXPERTS), t(EXPERT_TARGETS, torch.long), form="eq8")


def test_mutual_loss_sums_all_ordered_pairs():
    p = np.exp(np_log_softmax(EXPERTS))
    expected = np_kl(p[0], p[1]) + np_kl(p[1], p[0])
    got = shike_mutual_loss(t(EXPERTS), reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    three = np.concatenate([EXPERTS, EXPERTS[:1] * 0.5])
    p3 = np.exp(np_log_softmax(three))
    expected3 = sum(np_kl(p3[j], p3[k]) for j in range(3) for k in range(3) if j != k).mean()
    assert shike_mutual_loss(t(three)).item() == pytest.approx(expected3, rel=1e-5)


def _numeric_grad(fn, x, eps=1e-2):
    grad = torch.zeros_like(x)
    flat, out = x.view(-1), grad.view(-1)
    for i in range(flat.numel()):
        keep = flat[i].item()
        flat[i] = keep + eps
        up = fn(x).item()
        flat[i] = keep - eps
        down = fn(x).item()
        flat[i] = keep
        out[i] = (up - down) / (2 * eps)
    return grad


@pytest.mark.parametrize("loss", ["mutual", "dkt", "dkt_paper"])
def test_shike_teachers_are_not_detached(loss):
    """As the authors' code, gradients flow through the teacher side too: autograd equals the
    finite-difference gradient of the whole loss (a detached teacher would not)."""
    targets = t(EXPERT_TARGETS, torch.long)
    fn = (lambda z: shike_mutual_loss(z, reduction="sum")) if loss == "mutual" else \
        (lambda z: shike_dkt_loss(z, targets, reduction="sum", form="paper" if loss == "dkt_paper" else "code"))
    logits = t(EXPERTS).double().requires_grad_(True)
    fn(logits).backward()
    numeric = _numeric_grad(fn, t(EXPERTS).double(), eps=1e-4)
    np.testing.assert_allclose(logits.grad.numpy(), numeric.numpy(), atol=2e-4)


def test_ride_diversity_by_numpy_with_detached_ensemble():
    temperature = np.array([1.0, 2.0, 0.5])
    mean_logits = EXPERTS.mean(axis=0)
    q = np.exp(np_log_softmax(mean_logits / temperature))
    expected = sum(np_kl(q, np.exp(np_log_softmax(EXPERTS[m] / temperature))) for m in range(2))
    expected = expected * temperature.mean() ** 2
    got = ride_diversity_loss(t(EXPERTS), t(temperature), reduction="none")
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)
    # the ensemble is a constant target: d/dz_m of T^2 KL(q || softmax(z_m / T)) = T (p_m - q)
    logits = t(EXPERTS).requires_grad_(True)
    ride_diversity_loss(logits, 2.0, reduction="sum").backward()
    q2 = np.exp(np_log_softmax(mean_logits / 2.0))
    expected_grad = np.stack([2.0 * (np.exp(np_log_softmax(EXPERTS[m] / 2.0)) - q2) for m in range(2)])
    np.testing.assert_allclose(logits.grad.numpy(), expected_grad, atol=1e-6)


def test_ride_class_temperatures_by_hand():
    # n = (30, 6, 3, 1): mean 10 -> beta = 0.5 * n / 10 + 0.5 = (2, 0.8, 0.65, 0.55), divided by the max 2
    got = ride_class_temperatures([30, 6, 3, 1], temperature=1.5, gamma=0.5)
    assert got.tolist() == pytest.approx([1.5, 0.6, 0.4875, 0.4125])
    assert ride_class_temperatures([30, 6, 3, 1], gamma=0.0).tolist() == [1.0] * 4
    with pytest.raises(ValueError, match="gamma"):
        ride_class_temperatures([30, 1], gamma=3.0)


def test_expert_losses_reject_single_predictions():
    with pytest.raises(ValueError, match=r"\(M, B, C\)"):
        shike_mutual_loss(t(LOGITS))


# ------------------------------------------------------------------------------------------------ IKL

def test_ikl_uncertainty_loss_only_on_previously_correct_samples():
    tau = 2.0
    prev = np.exp(np_log_softmax(LOGITS[::-1] / tau))
    mask = np.array([True, False, True, False])
    kl = tau ** 2 * np_kl(prev, np.exp(np_log_softmax(LOGITS / tau)))
    got = ikl_uncertainty_loss(t(prev), t(LOGITS), torch.tensor(mask), tau=tau, reduction="none")
    np.testing.assert_allclose(got.numpy(), np.where(mask, kl, 0.0), rtol=1e-5, atol=1e-7)
    mean = ikl_uncertainty_loss(t(prev), t(LOGITS), torch.tensor(mask), tau=tau)
    assert mean.item() == pytest.approx(kl[mask].mean(), rel=1e-5)  # eq. 5: divided by |D_CKS| = 2
    none_selected = ikl_uncertainty_loss(t(prev), t(LOGITS), torch.zeros(4, dtype=torch.bool), tau=tau)
    assert none_selected.item() == 0.0


def test_ikl_class_medians_match_numpy():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(9, 4))
    labels = np.array([0, 0, 1, 1, 1, 0, 3, 0, 1])  # class 2 is empty; class 0 has an even count
    got = ikl_class_medians(t(features, torch.float64), t(labels, torch.long), num_classes=4)
    for cls in (0, 1, 3):
        np.testing.assert_allclose(got[cls].numpy(), np.median(features[labels == cls], axis=0), rtol=1e-12)
    assert got[2].tolist() == [0.0] * 4


def test_ikl_correlation_labels_from_numpy_cosine():
    centers = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [-1.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    norms = np.linalg.norm(centers, axis=1, keepdims=True)
    unit = centers / np.where(norms > 0, norms, 1)
    similarity = np.clip(unit @ unit.T, 0, None)
    np.fill_diagonal(similarity, 1.0)
    expected = (np.eye(4) + similarity / similarity.sum(axis=1, keepdims=True)) / 2
    got = ikl_correlation_labels(t(centers))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6, atol=1e-7)
    # class 0 and 1 have cosine 1/2: class 0's label is (1 + 1/1.5)/2 on itself, (0.5/1.5)/2 on class 1
    assert got[0].tolist() == pytest.approx([(1 + 1 / 1.5) / 2, 0.5 / 1.5 / 2, 0.0, 0.0], abs=1e-6)
    assert got[3].tolist() == pytest.approx([0.0, 0.0, 0.0, 1.0])  # a class with no features: one-hot
    assert got.sum(dim=1).tolist() == pytest.approx([1.0] * 4)


@pytest.mark.parametrize("schedule, start, middle", [
    ("equal", 0.5, 0.5), ("linear", 0.0, 0.5), ("cosine", 0.0, 0.5), ("parabolic", 0.0, 0.25)])
def test_ikl_alpha_schedules(schedule, start, middle):
    assert ikl_alpha(0, 200, schedule) == pytest.approx(start)
    assert ikl_alpha(100, 200, schedule) == pytest.approx(middle)
    assert ikl_alpha(200, 200, schedule) == pytest.approx(0.5 if schedule == "equal" else 1.0)


def test_ikl_alpha_errors():
    assert ikl_alpha(50, 200, "cosine") == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    with pytest.raises(ValueError, match="allowed: equal, linear, cosine, parabolic"):
        ikl_alpha(1, 10, "quadratic")
    with pytest.raises(ValueError, match="epoch"):
        ikl_alpha(11, 10)
