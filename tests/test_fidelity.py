"""Each recipe follows the authors' code where the seeds' numbers come from (docs/FIDELITY.md)."""
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import longtail.stage2  # noqa: F401  (registers the stage-2 methods)
from longtail.config import load_config
from longtail.data.datasets import ImageSet
from longtail.engine import builders
from longtail.engine.distributed import DistInfo
from longtail.engine.optim import lr_factor
from longtail.functional import lt_counts
from longtail.registry import LOSSES, MODELS, STAGE2, load_all
from longtail.stage2.heads import NCMHead

ROOT = Path(__file__).resolve().parents[1]
CIFAR_RECIPES = sorted((ROOT / "configs").glob("cifar*_lt/if*/*.yaml"))


def recipe(path: str, *overrides: str):
    return load_config(ROOT / "configs" / path, list(overrides))


def stand_in_bundle(counts: list[int]) -> SimpleNamespace:
    """A training set of ``counts`` images per class (1x1 pixels: only the sampling is looked at)."""
    targets = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    train = ImageSet(targets=targets, num_classes=len(counts), class_names=[str(c) for c in range(len(counts))],
                     images=torch.zeros(len(targets), 1, 1, 1, dtype=torch.uint8))
    return SimpleNamespace(train=train, num_classes=len(counts), train_counts=counts)


ONE_PROCESS = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
CIFAR10_LT_IF100 = lt_counts(10, 5000, 100)  # 12,406 images


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


@pytest.mark.parametrize("suite", ["cifar10_lt/if100", "cifar100_lt/if100"])
def test_ride_cifar_augmentation_rotates_as_its_loaders(suite):
    """RIDE's data_loader/cifar_data_loaders.py: RandomCrop(32, 4), flip, RandomRotation(15)."""
    augment = recipe(f"{suite}/ride.yaml").data.augment
    assert (augment.crop_padding, augment.flip, augment.rotation) == (4, True, 15.0)
    assert recipe(f"{suite}/ce.yaml").data.augment.rotation == 0.0  # Cao et al.'s loaders do not rotate


@pytest.mark.parametrize("name", ["ce_sade", "balanced_softmax_sade"])
def test_sade_recipes_follow_sades_code(name):
    """Vanint/SADE-AgnosticLT configs/config_cifar100_ir100_sade.json and train.py's CustomLR (per epoch):
    x(1 + e)/5 for e < 5, x0.1 from 160, x0.01 from 180; Nesterov, wd 5e-4; RandomRotation(15)."""
    config = recipe(f"cifar100_lt/if100/{name}.yaml")
    sade = [min(1.0, (1 + e) / 5) * (0.01 if e >= 180 else 0.1 if e >= 160 else 1.0) for e in range(200)]
    assert [lr_factor(e, 200, config.schedule) for e in range(200)] == pytest.approx(sade)
    assert (config.optim.lr, config.optim.nesterov, config.optim.weight_decay) == (0.1, True, 5e-4)
    augment = config.data.augment
    assert (augment.crop_padding, augment.flip, augment.rotation, config.data.batch_size) == (4, True, 15.0, 128)
    assert config.model.name == "resnet32" and config.loss.name == name.removesuffix("_sade")


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


# ------------------------------------------------------------------------------ issue 22, round 2
SHIKE_RECIPES = ["cifar10_lt/if100/shike.yaml", "cifar100_lt/if100/shike.yaml", "imagenet_lt/shike_resnet50.yaml",
                 "inaturalist2018/shike_resnet50.yaml"]


def test_shike_averages_the_expert_logits_as_the_authors_code():
    """jinyan-06/SHIKE cifarTrain.py: ``output = sum(outputs) / len(outputs)`` (evaluation and stage 2);
    the paper's "summed" is ``model.params.aggregate=sum``."""
    load_all()
    for path in SHIKE_RECIPES:
        assert recipe(path).model.params["aggregate"] == "mean", path
    assert recipe(SHIKE_RECIPES[0], "model.params.aggregate=sum").model.params["aggregate"] == "sum"
    for name in ("shike_resnet32", "shike_resnet50"):  # and the models' own default
        assert MODELS.parameters(name)["aggregate"].default == "mean", name
    model = MODELS.build("shike_resnet32", {}, num_classes=10, in_channels=3).eval()
    with torch.no_grad():
        out = model(torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)))
    torch.testing.assert_close(out.logits, out.expert_logits.mean(0))


def bbn_authors_lr_factors(epochs: int) -> list[float]:
    """The lr factor of each 0-based epoch in megvii-research/BBN: WarmupMultiStepLR (lib/utils/lr_scheduler.py:
    linear warm-up from 1/3 over 5, x0.01 per passed milestone 120 / 160, both at the scheduler's
    ``last_epoch``), driven by torch's scheduler machinery the way main/train.py drives it: the
    constructor takes ``last_epoch`` to 0, then ``scheduler.step()`` runs before each 1-based epoch."""
    def factor(last_epoch: int) -> float:
        warm = 1 / 3 * (1 - last_epoch / 5) + last_epoch / 5 if last_epoch < 5 else 1.0
        return warm * 0.01 ** sum(last_epoch >= m for m in (120, 160))

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    factors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns that step() comes before optimizer.step(): BBN's order
        for _ in range(1, epochs + 1):
            scheduler.step()
            factors.append(optimizer.param_groups[0]["lr"])
    return factors


@pytest.mark.parametrize("suite", ["cifar10_lt/if100", "cifar100_lt/if100"])
def test_bbn_lr_follows_the_authors_scheduler_stepped_before_each_epoch(suite):
    config = recipe(f"{suite}/bbn.yaml")
    ours = [lr_factor(e, 200, config.schedule) for e in range(200)]
    authors = bbn_authors_lr_factors(200)
    assert ours == pytest.approx(authors, abs=1e-12)
    assert ours[0] == pytest.approx(7 / 15)  # x0.467 in the first epoch, not 1/3
    assert (ours[118], ours[119], ours[158], ours[159]) == pytest.approx((1.0, 0.01, 0.01, 1e-4))


def test_bbn_runs_each_half_through_the_shared_stages_in_its_own_call():
    """megvii-research/BBN lib/core/combiner.py bbn_mix: model(image_a, feature_cb=True), then
    model(image_b, feature_rb=True): batch-norm statistics per half, running statistics updated twice."""
    load_all()
    for suite in ("cifar10_lt/if100", "cifar100_lt/if100"):
        assert recipe(f"{suite}/bbn.yaml").model.params["shared_pass"] == "separate"
    assert MODELS.parameters("bbn_resnet32")["shared_pass"].default == "separate"
    x = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    x[4:] *= 3  # a reversed half with other statistics
    updates, logits = {}, {}
    for shared_pass in ("separate", "joint"):
        torch.manual_seed(0)
        model = MODELS.build("bbn_resnet32", {"shared_pass": shared_pass}, num_classes=10, in_channels=3).train()
        logits[shared_pass] = model(x).logits.detach()
        stem_bn = next(m for m in model.stem.modules() if isinstance(m, torch.nn.BatchNorm2d))
        updates[shared_pass] = int(stem_bn.num_batches_tracked)
    assert updates == {"separate": 2, "joint": 1}
    assert not torch.allclose(logits["separate"], logits["joint"])


# the authors' loaders: torch's default keeps the last partial batch (kaidic/LDAM-DRW cifar_train.py,
# jinyan-06/SHIKE cifarTrain.py, RIDE's data loaders); BBN's main/train.py sets drop_last=True and
# BALMS's run_networks.py stops each epoch after int(N / B) steps
DROPS_LAST = {"bbn", "balanced_softmax_balms"}


def test_each_cifar_recipe_keeps_or_drops_the_last_batch_as_its_authors():
    assert len(CIFAR_RECIPES) > 100
    for path in CIFAR_RECIPES:
        assert load_config(path).data.drop_last is (path.stem in DROPS_LAST), path
    assert load_config().data.drop_last is False  # the Digits-LT default, torch's DataLoader default


@pytest.mark.parametrize("name, steps", [("ce", 97), ("shike", 97), ("ride", 97), ("bbn", 96)])
def test_steps_per_epoch_at_cifar10_lt_if100(name, steps):
    """12,406 images in batches of 128: 96 full batches and 118 images left, kept (97 steps) or dropped."""
    config = recipe(f"cifar10_lt/if100/{name}.yaml")
    bundle = stand_in_bundle(CIFAR10_LT_IF100)
    sampler = builders.build_sampler(config, bundle, ONE_PROCESS, config.data.sampler, config.data.sampler_params,
                                     "data.sampler_params", 0)
    loader = builders.train_loader(config, bundle, sampler, lambda *batch: batch, torch.device("cpu"), 0)
    assert len(loader) == steps


MISLAS_RECIPES = sorted(p for p in (ROOT / "configs").rglob("mislas*.yaml") if "_base" not in p.parts)


def test_mislas_stage2_samples_as_the_authors_class_aware_sampler():
    """dvlab-research/MiSLAS datasets/sampler.py ClassAwareSampler(num_samples_cls=4), and train_stage2.py's
    loop of ceil(N / B) + 1 full batches (``if i > end_steps: break``)."""
    assert len(MISLAS_RECIPES) == 10
    for path in MISLAS_RECIPES:
        stage2 = load_config(path).stage2
        assert (stage2.sampler, stage2.sampler_params) == ("class_aware", {"num_samples_cls": 4, "extra_batches": 1})
    config = recipe("cifar10_lt/if100/mislas.yaml")
    bundle = stand_in_bundle(CIFAR10_LT_IF100)
    sampler = builders.build_sampler(config, bundle, ONE_PROCESS, config.stage2.sampler, config.stage2.sampler_params,
                                     "stage2.sampler_params", 1, batch_size=128)
    assert len(sampler) == 98 * 128  # ceil(12406 / 128) + 1 = 98 full batches
    drawn = bundle.train.targets[sampler.epoch_indices(0, 10)]
    assert bool((drawn.view(-1, 4) == drawn.view(-1, 4)[:, :1]).all())  # blocks of 4 of one class
    assert bool((torch.bincount(drawn[:40].view(-1, 4)[:, 0], minlength=10) == 1).all())  # a cycle of all 10
    # the earlier reading: independent class draws with replacement, N per epoch
    old = recipe("cifar10_lt/if100/mislas.yaml", "stage2.sampler=class_balanced", "stage2.sampler_params={}")
    sampler = builders.build_sampler(old, bundle, ONE_PROCESS, old.stage2.sampler, old.stage2.sampler_params,
                                     "stage2.sampler_params", 1, batch_size=128)
    assert len(sampler) == 12406


def test_class_balanced_losses_divide_by_the_batch_size_as_cui_et_al():
    """The seeds' CB-focal numbers are Cui et al.'s (richardaecn/class-balanced-loss, whose softmax and
    focal losses divide the weighted sum by the batch size); Cao et al.'s nn.CrossEntropyLoss(weight=w)
    divides by the summed weights: ``loss.params.normalize=weight_sum``."""
    load_all()
    paths = sorted((ROOT / "configs").glob("cifar*_lt/if*/class_balanced.yaml"))
    assert len(paths) == 8
    for path in paths:
        assert load_config(path).loss.params["normalize"] == "batch", path
    assert LOSSES.parameters("class_balanced")["normalize"].default == "batch"
    assert recipe("cifar10_lt/if100/class_balanced.yaml", "loss.params.normalize=weight_sum").loss.params[
        "normalize"] == "weight_sum"


def test_drw_phases_divide_by_the_summed_weights_as_cao_et_al_and_ride():
    """kaidic/LDAM-DRW LDAMLoss and RIDE's RIDELoss: F.cross_entropy(weight=per_cls_weights)."""
    load_all()
    counts = lt_counts(10, 500, 100)
    for path in sorted((ROOT / "configs").glob("cifar*_lt/if*/ldam_drw.yaml")):
        assert load_config(path).loss.params["normalize"] == "weight_sum", path
    assert LOSSES.parameters("ldam_drw")["normalize"].default == "weight_sum"
    for suite in ("cifar10_lt/if100", "cifar100_lt/if100"):
        config = recipe(f"{suite}/ride.yaml")
        ride = LOSSES.build("ride", config.loss.params, class_counts=counts, num_classes=10)
        assert ride.base.normalize == "weight_sum"


@pytest.mark.parametrize("base, beyond", [
    ("ride_cifar.yaml", "CIFAR-100-LT configs only"),
    ("shike_cifar.yaml", "hard-codes CIFAR-100-LT at IF 100"),
    ("bbn_cifar.yaml", "both of them are IF 50"),
])
def test_recipes_beyond_the_authors_configs_say_so(base, beyond):
    text = (ROOT / "configs" / "_base" / base).read_text()
    assert "Beyond the authors' configs" in text and beyond in text
