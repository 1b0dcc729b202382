"""Each recipe follows the authors' code where the seeds' numbers come from (docs/FIDELITY.md)."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch

import longtail.stage2  # noqa: F401  (registers the stage-2 methods)
from longtail.config import load_config
from longtail.engine.optim import lr_factor
from longtail.functional import lt_counts
from longtail.registry import STAGE2
from longtail.stage2.heads import NCMHead

ROOT = Path(__file__).resolve().parents[1]


def recipe(path: str, *overrides: str):
    return load_config(ROOT / "configs" / path, list(overrides))


@pytest.mark.parametrize("name", ["ce", "focal", "class_balanced", "ldam_drw", "crt"])
def test_cao_et_al_recipes_step_by_0_01_then_0_0001(name):
    """kaidic/LDAM-DRW cifar_train.py: lr x0.01 after epoch 160, x0.0001 after 180."""
    for suite in ("cifar10_lt/if100", "cifar100_lt/if10"):
        schedule = recipe(f"{suite}/{name}.yaml").schedule
        assert [lr_factor(e, 200, schedule) for e in (100, 170, 190)] == pytest.approx([1.0, 0.01, 0.0001])


def test_mislas_recipes_step_by_0_1_then_0_01():
    """dvlab-research/MiSLAS train_stage1.py: lr x0.1 after epoch 160, x0.01 after 180."""
    for path in sorted((ROOT / "configs").glob("cifar*_lt/if*/mislas.yaml")):
        schedule = load_config(path).schedule
        assert [lr_factor(e, 200, schedule) for e in (100, 170, 190)] == pytest.approx([1.0, 0.1, 0.01]), path


@pytest.mark.parametrize("suite", ["cifar10_lt/if100", "cifar100_lt/if100"])
def test_ride_cifar_diversity_factor_is_the_authors_latest(suite):
    """frank-xwang/RIDE-LongTailRecognition configs/config_imbalance_cifar100_ride.json: -0.45."""
    assert recipe(f"{suite}/ride.yaml").loss.params["diversity_factor"] == -0.45
    # the earlier reading stays one override away
    assert recipe(f"{suite}/ride.yaml", "loss.params.diversity_factor=-0.2").loss.params[
        "diversity_factor"] == -0.2


def test_shike_recipes_use_the_authors_dkt_form():
    """jinyan-06/SHIKE cifarTrain.py mix_outputs keeps the target column in the DKT softmaxes."""
    for path in ("cifar10_lt/if100/shike.yaml", "cifar100_lt/if100/shike.yaml"):
        assert recipe(path).loss.params["dkt_form"] == "code"
        assert recipe(path, "loss.params.dkt_form=paper").loss.params["dkt_form"] == "paper"


def _numpy_ncm(train, labels, test, centre):
    """Kang et al.'s KNNClassifier (feat_type cl2n / l2n, dist_type l2), written out in numpy."""
    mean = train.mean(axis=0) if centre else np.zeros(train.shape[1])
    unit = lambda x: (x - mean) / np.linalg.norm(x - mean, axis=1, keepdims=True)  # noqa: E731
    centroids = np.stack([unit(train)[labels == c].mean(axis=0) for c in np.unique(labels)])
    q = unit(test)
    return -((q[:, None, :] - centroids[None, :, :]) ** 2).sum(axis=-1)


@pytest.mark.parametrize("norm", ["cl2n", "l2"])
def test_ncm_head_is_kang_et_al_knn_classifier(norm):
    rng = np.random.default_rng(0)
    train = rng.normal(2.0, 1.0, (40, 5))  # an offset mean, so centring matters
    labels = np.repeat(np.arange(4), 10)
    test = rng.normal(2.0, 1.0, (7, 5))
    head = NCMHead.fit(torch.tensor(train, dtype=torch.float32), torch.tensor(labels), 4, norm)
    got = head(torch.tensor(test, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(got, _numpy_ncm(train, labels, test, norm == "cl2n"), rtol=1e-4, atol=1e-5)
    assert head.spec() == {"kind": "ncm", "norm": norm}


def test_ncm_centring_changes_the_prediction_and_cl2n_is_the_default():
    rng = np.random.default_rng(1)
    train = torch.tensor(rng.normal(3.0, 1.0, (60, 4)), dtype=torch.float32)
    labels = torch.arange(3).repeat_interleave(20)
    test = torch.tensor(rng.normal(3.0, 1.0, (50, 4)), dtype=torch.float32)
    predict = {norm: NCMHead.fit(train, labels, 3, norm)(test).argmax(1) for norm in ("cl2n", "l2")}
    assert not torch.equal(predict["cl2n"], predict["l2"])
    assert load_config(ROOT / "configs/_base/stage2/ncm.yaml").stage2.params == {"norm": "cl2n"}
    assert STAGE2.build("ncm", {}).norm == "cl2n"
    with pytest.raises(ValueError, match="cl2n"):
        STAGE2.build("ncm", {"norm": "l1"})


def test_focal_recipes_use_gamma_1_as_cao_et_al():
    """kaidic/LDAM-DRW cifar_train.py builds FocalLoss(gamma=1) for the focal rows."""
    for path in sorted((ROOT / "configs").glob("cifar*_lt/if*/focal.yaml")):
        assert load_config(path).loss.params == {"gamma": 1.0}, path


def test_balms_recipes_run_13000_iterations_of_512_with_autoaugment_and_black_cutout():
    """jiawei-ren/BalancedMetaSoftmax-Classification config/CIFAR10_LT/balanced_softmax_imba200.yaml."""
    paths = sorted((ROOT / "configs").glob("cifar*_lt/if*/balanced_softmax_balms.yaml"))
    assert len(paths) == 8
    for path in paths:
        config = load_config(path)
        classes, largest = (10, 5000) if config.data.dataset == "cifar10_lt" else (100, 500)
        batches = math.ceil(sum(lt_counts(classes, largest, config.data.imbalance_factor)) / 512)
        assert 13000 <= config.train.epochs * batches < 13000 + batches, path
        assert math.ceil(800 / batches) == config.schedule.warmup_epochs + 1, path
        assert config.data.batch_size == 512 and config.optim.weight_decay == 5e-4 and config.optim.lr == 0.1
        augment = config.data.augment
        assert (augment.autoaugment, augment.autoaugment_fill, augment.cutout, augment.cutout_fill) == (
            "cifar10", 128, 16, "black")
        assert config.loss.name == "balanced_softmax" and config.schedule.name == "cosine"
        assert lr_factor(0, config.train.epochs, config.schedule) == 0.5  # from lr 0.05 to 0.1


def test_ladc_keeps_both_readings_of_its_ambiguous_text():
    """Seed 002: eq. 6 printed as n_i d_i (stage2.params.weighting=printed; inverse distance is the
    default) and stage 1 "decreases learning rate by 0.01" (x0.1 steps by default; Cao et al.'s
    x0.01 / x0.0001 with schedule.factors)."""
    config = recipe("cifar100_lt/if100/ladc.yaml")
    assert config.stage2.params["weighting"] == "inverse"
    assert [lr_factor(e, 400, config.schedule) for e in (300, 330, 370)] == pytest.approx([1.0, 0.1, 0.01])
    printed = recipe("cifar100_lt/if100/ladc.yaml", "stage2.params.weighting=printed", "schedule.factors=[0.01, 0.0001]")
    assert printed.stage2.params["weighting"] == "printed"
    assert [lr_factor(e, 400, printed.schedule) for e in (330, 370)] == pytest.approx([0.01, 0.0001])
