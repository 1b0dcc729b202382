"""SHIKE, RIDE, BBN and IKL end to end through ``longtail train`` on Digits-LT (the CIFAR recipes with
the data swapped for the offline digits, 2 epochs), and the recipes checked against the authors' code."""
import json
import math
from pathlib import Path

import pytest
import torch

from longtail.cli import main
from longtail.config import load_config
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.optim import lr_factor
from longtail.functional import bbn_alpha, bbn_mixed_features
from longtail.models.bbn import BBN
from longtail.registry import LOSSES, MODELS, SAMPLERS, STAGE2, load_all

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = [f"{dataset}/if100/{method}.yaml" for dataset in ("cifar10_lt", "cifar100_lt")
           for method in ("shike", "ride", "bbn", "ce_ikl", "balanced_softmax_ikl", "ldam_drw_ikl")]
RECIPES += ["imagenet_lt/shike_resnet50.yaml", "imagenet_lt/ride_resnet50.yaml",
            "inaturalist2018/shike_resnet50.yaml"]
NUM_CLASSES = {"cifar10_lt": 10, "cifar100_lt": 100, "imagenet_lt": 1000, "inaturalist2018": 8142}


def train(tmp_path: Path, recipe: str, *overrides: str) -> Path:
    """Train a recipe on Digits-LT (IF 10, at most 40 images a class, no augmentation) for 2 epochs."""
    digits = [f"output_dir={tmp_path}", "data.dataset=digits_lt", "data.root=null", "data.imbalance_factor=10",
              "data.max_count=40", "data.batch_size=32", "data.augment={}", "train.epochs=2",
              "train.eval_every=0", "train.log_interval=5", "train.scale_schedule=true"]
    assert main(["train", str(CONFIGS / recipe), *digits, *overrides]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    return run


def last_test_metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())["last"]["test"]


def check_ikl_state(state: dict) -> None:
    """The IKL loss state a checkpoint must carry for the next epoch: last epoch's predictions."""
    assert bool(state["has_previous"])
    assert state["pred_values"].abs().sum() > 0 and state["pred_correct"].any()
    assert not torch.equal(state["soft_labels"], torch.eye(len(state["soft_labels"])))


# ------------------------------------------------------------------------------------- recipes
@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_validates_and_builds(recipe):
    load_all()
    cfg = load_config(CONFIGS / recipe)
    num_classes = NUM_CLASSES[recipe.split("/")[0]]
    counts = [max(1, 500 // (i + 1)) for i in range(num_classes)]
    LOSSES.build(cfg.loss.name, cfg.loss.params, where="loss.params", class_counts=counts,
                 num_classes=num_classes, num_samples=sum(counts))
    unknown = set(cfg.model.params) - set(MODELS.parameters(cfg.model.name))
    assert not unknown, f"{recipe}: model.params {unknown} not taken by {cfg.model.name}"
    for sampler in (cfg.data.sampler, cfg.data.pair_sampler):
        if sampler is not None:
            SAMPLERS.get(sampler)
    if cfg.stage2 is not None:
        STAGE2.build(cfg.stage2.method, cfg.stage2.params, class_counts=counts, num_classes=num_classes, seed=0)
        LOSSES.build(cfg.stage2.loss.name, cfg.stage2.loss.params, class_counts=counts, num_classes=num_classes)


@pytest.mark.parametrize("recipe", [r for r in RECIPES if "shike" in r])
def test_shike_weights_match_the_authors_kl_div_mean(recipe):
    # the authors: 10 x KL_nt + 1 x KL_mu with F.kl_div(reduction="mean"), i.e. divided by C
    cfg = load_config(CONFIGS / recipe)
    num_classes = NUM_CLASSES[recipe.split("/")[0]]
    assert cfg.loss.params["alpha"] * num_classes == pytest.approx(10.0, rel=1e-6)
    assert cfg.loss.params["beta"] * num_classes == pytest.approx(1.0, rel=1e-6)


def shike_stage1_lr(epoch: int) -> float:
    """jinyan-06/SHIKE CosineAnnealingLRWarmup(T_max=180, warmup_epochs=5, base_lr=0.05, warmup_lr=0.15)."""
    if epoch < 5:
        return (0.15 - 0.05) / 4 * (epoch - 1) + 0.05
    return 0.15 * (1 + math.cos(math.pi * (epoch - 5) / (180 - 5))) / 2


def shike_stage2_lr(epoch: int) -> float:
    """jinyan-06/SHIKE's classifier-retraining scheduler (T_max=20, warmup_lr=0.1), from its own epoch 0."""
    if epoch < 5:
        return (0.1 - 0.05) / 4 * (epoch - 1) + 0.05
    return 0.1 * (1 + math.cos(math.pi * (epoch - 5) / (20 - 5))) / 2


def ride_lr(epoch: int) -> float:
    """RIDE's CustomLR for CIFAR (step1 160, step2 180, gamma 0.01, warmup 5) on lr 0.1."""
    factor = 1e-4 if epoch >= 180 else 1e-2 if epoch >= 160 else 1.0
    return 0.1 * factor * ((1 + epoch) / 5 if epoch < 5 else 1.0)


def bbn_warmup_multistep(last_epoch: int) -> float:
    """megvii-research/BBN lib/utils/lr_scheduler.py WarmupMultiStepLR.get_lr (milestones 120/160,
    gamma 0.01, warmup_factor 1/3, warmup_epochs 5, linear) on lr 0.1, at the scheduler's last_epoch."""
    warm = 1 / 3 * (1 - last_epoch / 5) + last_epoch / 5 if last_epoch < 5 else 1.0
    return 0.1 * warm * 0.01 ** sum(last_epoch >= m for m in (120, 160))  # bisect_right


def bbn_lr(epoch: int) -> float:
    """BBN's main/train.py steps the scheduler before each 1-based epoch (the constructor already took
    last_epoch to 0), so 0-based epoch e trains at last_epoch e + 1: x7/15 first, x0.01 from epoch 119."""
    return bbn_warmup_multistep(epoch + 1)


@pytest.mark.parametrize("recipe,stage,authors", [
    ("cifar100_lt/if100/shike.yaml", "stage1", shike_stage1_lr),
    ("cifar100_lt/if100/shike.yaml", "stage2", shike_stage2_lr),
    ("cifar100_lt/if100/ride.yaml", "stage1", ride_lr),
    ("cifar10_lt/if100/bbn.yaml", "stage1", bbn_lr),
])
def test_recipe_lr_per_epoch_matches_the_authors_scheduler(recipe, stage, authors):
    cfg = load_config(CONFIGS / recipe)
    section = cfg if stage == "stage1" else cfg.stage2
    epochs = cfg.train.epochs if stage == "stage1" else cfg.stage2.epochs
    ours = [section.optim.lr * lr_factor(e, epochs, section.schedule) for e in range(epochs)]
    assert ours == pytest.approx([authors(e) for e in range(epochs)], abs=1e-12)
    if "shike" in recipe:
        assert cfg.train.epochs + cfg.stage2.epochs == 200


def test_bbn_alpha_is_a_parabolic_decay():
    assert [bbn_alpha(e, 10) for e in (0, 5, 10)] == [1.0, 0.75, 0.0]
    assert bbn_alpha(3, 7) == pytest.approx(40 / 49)
    with pytest.raises(ValueError, match="epoch"):
        bbn_alpha(11, 10)


def test_bbn_mixed_features_weigh_the_branches_by_twice_alpha():
    """By hand: 2 [alpha f_c ; (1 - alpha) f_r]; alpha = 1/2 is the plain pair the evaluation uses."""
    conventional, rebalancing = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, -4.0]])
    assert bbn_mixed_features(conventional, rebalancing, 0.25).tolist() == [[0.5, 1.0, 4.5, -6.0]]
    assert bbn_mixed_features(conventional, rebalancing, 0.5).tolist() == [[1.0, 2.0, 3.0, -4.0]]
    assert bbn_mixed_features(conventional, rebalancing, torch.tensor(1.0)).tolist() == [[2.0, 4.0, 0.0, -0.0]]


# ---------------------------------------------------------------------------------- end to end
def test_shike_trains_then_retrains_one_head_per_expert(tmp_path):
    run = train(tmp_path, "cifar10_lt/if100/shike.yaml", "stage2.epochs=2")
    assert len(last_test_metrics(run)["expert_top1"]) == 3
    stage2 = json.loads((run / "stage2" / "metrics.json").read_text())
    assert stage2["method"] == "crt" and len(stage2["history"]) == 2
    assert len(stage2["last"]["test"]["expert_top1"]) == 3
    before = load_checkpoint(run / "checkpoints" / "last.pt")["model"]
    after = load_checkpoint(run / "stage2" / "checkpoints" / "last.pt")["model"]
    assert before.keys() == after.keys()  # fresh cosine heads of the same kind
    assert stage2["features"] == "images"  # the authors' stage 2: augmented images, BN in train mode
    for key, value in before.items():
        if key.startswith("heads."):
            assert not torch.equal(value, after[key]), key
        elif not key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked"):
            assert torch.equal(value, after[key]), f"stage 2 changed the frozen backbone: {key}"


def test_ride_trains_with_drw_and_class_temperatures_switched_on(tmp_path):
    run = train(tmp_path, "cifar10_lt/if100/ride.yaml", "loss.params.base_params.drw_epoch=1",
                "loss.params.reweight_epoch=1")
    metrics = last_test_metrics(run)
    assert len(metrics["expert_top1"]) == 3 and 0 <= metrics["top1"] <= 1


def test_bbn_trains_on_uniform_plus_reversed_batches_with_moving_alpha(tmp_path, monkeypatch):
    import longtail.engine.trainer as trainer
    calls = []
    batch_loss = trainer.batch_loss

    def recording_loss(loss_fn, output, batch):
        model_alpha = float(output.extras["model_alpha"])
        calls.append((len(batch.images), len(output.logits), model_alpha, *set(batch.mix_weight.tolist())))
        return batch_loss(loss_fn, output, batch)

    forward = BBN.forward

    def forward_with_alpha(self, x):
        output = forward(self, x)
        output.extras["model_alpha"] = self.alpha
        return output

    monkeypatch.setattr(BBN, "forward", forward_with_alpha)
    monkeypatch.setattr(trainer, "batch_loss", recording_loss)
    run = train(tmp_path, "cifar10_lt/if100/bbn.yaml")
    assert calls and all(images == 2 * rows for images, rows, _, _ in calls)  # paired batches, one row each
    # the paired loader's label weight is the model's feature weight, one value per batch
    assert all(alpha == pytest.approx(weight) for _, _, alpha, weight in calls)
    alphas = [alpha for _, _, alpha, _ in calls]
    assert sorted(set(alphas), reverse=True) == [1.0, 0.75] and alphas == sorted(alphas, reverse=True)
    assert len(last_test_metrics(run)["expert_top1"]) == 2  # the conventional and the re-balancing branch


@pytest.mark.parametrize("recipe,overrides", [
    ("cifar10_lt/if100/ce_ikl.yaml", ["model.name=mlp"]),
    ("cifar10_lt/if100/ldam_drw_ikl.yaml", ["model.name=mlp", "loss.params.base_params.drw_epoch=1"]),
    ("cifar10_lt/if100/shike.yaml", ["stage2=null", "loss.name=ikl",
                                     "loss.params={base: shike, base_params: {alpha: 1.0, beta: 0.1}, topk: null}"]),
])
def test_ikl_plugs_into_any_base_loss(tmp_path, recipe, overrides):
    run = train(tmp_path, recipe, *overrides)
    check_ikl_state(load_checkpoint(run / "checkpoints" / "last.pt")["loss"])
    assert ("expert_top1" in last_test_metrics(run)) == ("shike" in recipe)


def test_ikl_state_is_saved_and_resume_continues_exactly(tmp_path):
    recipe, common = "cifar10_lt/if100/balanced_softmax_ikl.yaml", ["model.name=mlp"]
    full = train(tmp_path / "full", recipe, *common)
    split = train(tmp_path / "split", recipe, *common, "train.stop_at_epoch=1")
    stopped = load_checkpoint(split / "checkpoints" / "last.pt")
    assert stopped["epoch"] == 0
    check_ikl_state(stopped["loss"])
    # epoch 2 weighs IKL by (1/2)^2 and reads epoch 1's predictions: only a restored state gives the same run
    assert main(["train", "--resume", str(split)]) == 0
    full_state, split_state = (load_checkpoint(r / "checkpoints" / "last.pt") for r in (full, split))
    for key, value in full_state["loss"].items():
        assert torch.equal(split_state["loss"][key], value), key
    for key, value in full_state["model"].items():
        torch.testing.assert_close(split_state["model"][key], value, rtol=0, atol=1e-6)
    assert last_test_metrics(split)["top1"] == last_test_metrics(full)["top1"]
