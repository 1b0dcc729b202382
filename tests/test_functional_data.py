import pytest
import torch

from longtail.functional import checked_class_counts, imbalance_factor, lt_counts, shot_groups


def test_lt_counts_cifar10_if100_matches_cao_et_al():
    assert lt_counts(10, 5000, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]


def test_lt_counts_cifar100_if100_total():
    counts = lt_counts(100, 500, 100)
    assert sum(counts) == 10847 and counts[0] == 500 and counts[-1] == 5


def test_lt_counts_exp_formula_by_hand():
    # class i keeps int(500 * 50 ** (-i / 99)); i = 1: 500 * 50 ** (-1/99) = 480.6... -> 480
    assert lt_counts(100, 500, 50)[1] == 480
    assert lt_counts(100, 500, 50)[-1] == 10


def test_lt_counts_step_profile():
    assert lt_counts(4, 100, 10, profile="step") == [100, 100, 10, 10]
    assert lt_counts(5, 100, 10, profile="step") == [100, 100, 10, 10, 10]


def test_lt_counts_balanced_and_errors():
    assert lt_counts(3, 7, 1) == [7, 7, 7]
    with pytest.raises(ValueError, match=">= 1"):
        lt_counts(10, 5000, 0.5)
    with pytest.raises(ValueError, match="profile"):
        lt_counts(10, 5000, 10, profile="linear")


def test_shot_groups_thresholds_are_inclusive_for_medium():
    groups = shot_groups([500, 101, 100, 20, 19, 1])
    assert groups == {"many": [0, 1], "medium": [2, 3], "few": [4, 5]}


def test_shot_groups_cifar100_if100():
    groups = shot_groups(lt_counts(100, 500, 100))
    # with thresholds (not index ranges) CIFAR-100-LT IF100 splits 35 / 35 / 30
    assert (len(groups["many"]), len(groups["medium"]), len(groups["few"])) == (35, 35, 30)


def test_imbalance_factor():
    assert imbalance_factor([5000, 50]) == 100
    assert imbalance_factor([3, 0]) == float("inf")


def test_checked_class_counts_is_the_one_check_behind_losses_and_stage2():
    # one count per class, positive; the messages the losses, functional formulas and stage-2 methods show
    counts = checked_class_counts(range(3, 0, -1), 3)
    assert counts.dtype == torch.float32 and counts.tolist() == [3.0, 2.0, 1.0]
    assert checked_class_counts(torch.tensor([4, 1]), dtype=torch.float64).dtype == torch.float64
    with pytest.raises(ValueError, match="one count per class, shape \\(4,\\); got 3 class counts for 4 classes"):
        checked_class_counts([5, 2, 1], 4)
    for bad in ([], [[1, 2], [3, 4]]):
        with pytest.raises(ValueError, match="one count per class"):
            checked_class_counts(bad)
    with pytest.raises(ValueError, match=r"classes \[1, 3\] have no training images.*Remove the empty classes"):
        checked_class_counts([5, 0, 2, -1])
