"""One behavioural test per method family on a real long tail (conftest.LONG_TAIL: Digits-LT at
imbalance factor 100, the MLP for 10 epochs), against the one shared plain-CE run (``long_tail_ce``).

Measured over seeds 0-2 (test set; balanced = mean per-class accuracy, few = the six few-shot classes):
    CE                       balanced 0.730 0.676 0.680   few 0.557 0.470 0.477
    balanced softmax         balanced 0.874 0.876 0.866   few 0.807 0.807 0.790
    logit adjustment (tau 1) balanced 0.874 0.876 0.866   few 0.807 0.807 0.790   (= balanced softmax at tau 1)
    LDAM-DRW (DRW at 5)      balanced 0.856 0.864 0.842   few 0.777 0.800 0.760
    balanced softmax + IKL   balanced 0.880 0.880 0.872   few 0.823 0.827 0.800
    CE + IKL                 balanced 0.764 0.696 0.740   few 0.620 0.500 0.570   (not asserted: +0.03..0.09)
    RIDE (3 experts, LDAM)   balanced 0.826 0.888 0.776   few 0.727 0.827 0.647
Every asserted family gains >= +0.096 balanced and >= +0.17 few on every seed, while CE alone spreads
0.054 (balanced) and 0.087 (few) across seeds; the margins asserted are +0.05 and +0.10 (stage-2
methods: tests/test_stage2.py). Turning a method's re-balancing off (its loss replaced by CE) gives
the CE numbers, which fail them.
"""
import json

import pytest
import torch

from longtail.commands.train import train_stage1
from longtail.config import load_config
from longtail.engine.distributed import init_distributed

from conftest import LONG_TAIL, REPO, balanced_accuracy

RIDE = ["model.name=ride_resnet32", "model.params={num_experts: 3, shared_stages: 1, reduce_width: true, "
        "head: cosine, head_scale: 30.0, aggregate: mean}", "loss.name=ride",
        "loss.params={base: ldam_drw, base_params: {max_margin: 15.0, scale: 1.0, drw_epoch: 5}, reweight_epoch: 5}"]
FAMILIES = {
    "balanced_softmax": ["loss.name=balanced_softmax"],
    "logit_adjustment": ["loss.name=logit_adjustment"],
    "ldam_drw": ["loss.name=ldam_drw", "loss.params.drw_epoch=5", "model.params.head=cosine",
                 "model.params.head_scale=1.0"],
    "balanced_softmax_ikl": ["loss.name=ikl", "loss.params.base=balanced_softmax"],
}


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    yield


def long_tail_run(tmp_path, overrides: list[str]) -> dict:
    config = load_config(None, [*LONG_TAIL, *overrides])
    return train_stage1(config, tmp_path, init_distributed("cpu"))["last"]["test"]


@pytest.mark.parametrize("family", [
    *FAMILIES, pytest.param("ride", marks=pytest.mark.slow)])
def test_rebalancing_family_lifts_tail_accuracy_over_ce(long_tail_ce, tmp_path, family):
    ce = long_tail_ce[2]
    method = long_tail_run(tmp_path, RIDE if family == "ride" else FAMILIES[family])
    assert balanced_accuracy(method) >= balanced_accuracy(ce) + 0.05
    assert method["few_top1"] >= ce["few_top1"] + 0.10


def test_ldam_margins_and_drw_lift_tail_over_the_same_cosine_head(tmp_path):
    # Much of LDAM-DRW's lift over a linear CE comes from its normalised (cosine) classifier alone. The
    # same cosine head trained by the scaled CE (margins 0, no DRW) reaches, seeds 0-2: balanced 0.806
    # 0.724 0.726, few 0.687 0.553 0.560, against LDAM-DRW's 0.856 0.864 0.842 / 0.777 0.800 0.760: a
    # gain of >= +0.05 balanced and >= +0.09 few on the same seed (asserted: +0.03 and +0.05).
    ldam = long_tail_run(tmp_path / "ldam", FAMILIES["ldam_drw"])
    # beta 0: the class-balanced weights DRW switches to are all 1, so no re-weighting ever happens
    plain = long_tail_run(tmp_path / "plain", [*FAMILIES["ldam_drw"], "loss.params.max_margin=0.0",
                                               "loss.params.beta=0.0"])
    assert balanced_accuracy(ldam) >= balanced_accuracy(plain) + 0.03
    assert ldam["few_top1"] >= plain["few_top1"] + 0.05


@pytest.fixture(scope="module")
def long_tail_with_val(tmp_path_factory, one_thread):
    """CE on ``LONG_TAIL`` with a stratified 20 % validation split of the long-tailed training set (the
    knowledge-transfer paper's 80/20 split): the calibrators are fitted on a long-tailed split."""
    run_dir = tmp_path_factory.mktemp("long_tail_val")
    train_stage1(load_config(None, [*LONG_TAIL, "data.val_fraction=0.2"]), run_dir, init_distributed("cpu"))
    return run_dir


def test_knowledge_transfer_ts_lowers_ece_where_plain_ts_cannot(long_tail_with_val):
    # Measured (test ECE, seeds 0-2; fitted on the long-tailed validation split, a handful of tail images):
    #   uncalibrated 0.131 0.158 0.143   TS 0.145 0.171 0.159   KT-TS 0.091 0.112 0.111
    # KT-TS gains 0.032-0.046 over uncalibrated and 0.048-0.059 over TS on every seed (margin asserted: 0.02).
    # TS fits one temperature to a head-dominated split and does not lower ECE on the balanced test set;
    # KT-TS re-weights the split with the tail distributions transferred from the head (seed 000, eq. 9).
    import json
    from longtail.commands.calibrate import calibrate_run
    after = {}
    for method in ("ts", "kt_ts"):
        out = calibrate_run(long_tail_with_val, method, dist_info=init_distributed("cpu"))
        written = json.loads((out / "metrics.json").read_text())
        before, after[method] = written["before"]["ece"], written["after"]["ece"]
    assert after["kt_ts"] <= before - 0.02
    assert after["kt_ts"] <= after["ts"] - 0.02


# ------------------------------------------------------------------ calibration on real long-tailed images
# CE with a small CNN on CIFAR-10-LT (the shared JPEG CIFAR-10, IF 100, at most 500 images a class: 987
# training images, 400 -> 4 a class, and a stratified 20 % validation split), 15 epochs: over-fitted and
# over-confident, as CE on a long tail is. Test ECE measured over seeds 0-2 (2026-12-04):
#   CE 0.328 0.335 0.345    TS 0.218 0.226 0.236    KT-TS 0.086 0.075 0.107
#   MiSLAS stage 2 with label-aware smoothing (eps 0.3 -> 0.0)   0.047 0.042 0.009
#   the same stage 2 with eps_head = 0 (no smoothing)            0.074 0.076 0.094
# TS gains 0.109-0.110 on every seed, KT-TS 0.129-0.151 more, smoothing 0.027-0.085 (asserted: 0.05,
# 0.06 and 0.015). A temperature fixed at 1, or smoothing that ignores its epsilons, gives 0 and fails.
CIFAR_LT_SMALL = ["model.name=small_cnn", "train.epochs=15", "schedule.name=cosine", "schedule.warmup_epochs=0.5",
                  "data.max_count=500", "data.val_fraction=0.2", "train.eval_every=0", "device=cpu"]
RECIPES = REPO / "configs" / "cifar10_lt" / "if100"
TS_MARGIN, KT_MARGIN, LAS_MARGIN = 0.05, 0.06, 0.015


@pytest.fixture(scope="module")
def cifar_lt_ce(shared_data, tmp_path_factory):
    from longtail.cli import main
    out = tmp_path_factory.mktemp("cifar_lt_ce")
    assert main(["train", str(RECIPES / "ce.yaml"), *CIFAR_LT_SMALL, f"data.root={shared_data / 'cifar10_jpg.tar.gz'}",
                 f"output_dir={out}", "name=ce"]) == 0
    return out / "ce"


def _test_ece(folder) -> float:
    return json.loads((folder / "metrics.json").read_text())["last"]["test"]["ece"]


@pytest.mark.slow
def test_temperature_scaling_lowers_the_ece_of_an_over_confident_long_tailed_model(cifar_lt_ce):
    from longtail.cli import main
    after = {}
    for method in ("ts", "kt_ts"):
        assert main(["calibrate", str(cifar_lt_ce), "--method", method]) == 0
        written = json.loads((cifar_lt_ce / "calibration" / method / "metrics.json").read_text())
        before, after[method] = written["before"]["ece"], written["after"]["ece"]
    assert before == pytest.approx(_test_ece(cifar_lt_ce))
    assert after["ts"] <= before - TS_MARGIN
    assert after["kt_ts"] <= after["ts"] - KT_MARGIN


@pytest.mark.slow
def test_label_aware_smoothing_lowers_ece_of_the_rebalanced_classifier(cifar_lt_ce):
    from longtail.cli import main
    mislas = str(RECIPES / "mislas.yaml")
    assert main(["stage2", str(cifar_lt_ce), mislas, "--name", "las"]) == 0
    assert main(["stage2", str(cifar_lt_ce), mislas, "stage2.params.eps_head=0.0", "--name", "plain"]) == 0
    assert _test_ece(cifar_lt_ce / "stage2_las") <= _test_ece(cifar_lt_ce / "stage2_plain") - LAS_MARGIN
