from pathlib import Path

import pytest

from longtail.config import apply_overrides, load_config
from longtail.registry import ConfigError, Registry

ROOT = Path(__file__).resolve().parents[1]


def test_default_config_is_digits_lt():
    config = load_config()
    assert config.data.dataset == "digits_lt" and config.model.name == "mlp"


def test_overrides_parse_yaml_values():
    config = load_config(None, ["optim.lr=1e-3", "data.augment.flip=false", "schedule.milestones=[3, 6]",
                                "loss.params.tau=2"])
    assert config.optim.lr == 1e-3 and config.data.augment.flip is False
    assert config.schedule.milestones == [3, 6] and config.loss.params == {"tau": 2}


def test_unknown_key_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["optim.learning_rate=0.1"])
    assert "optim.learning_rate" in str(error.value) and "lr" in str(error.value)


def test_bad_literal_names_allowed_values():
    with pytest.raises(ConfigError, match="'cosine', 'step'"):
        load_config(None, ["schedule.name=poly"])


def test_imbalance_factor_below_one_is_rejected():
    with pytest.raises(ConfigError, match="imbalance factor.*>= 1"):
        load_config(None, ["data.imbalance_factor=0.5"])


def test_select_val_needs_validation_split():
    with pytest.raises(ConfigError, match="val_fraction"):
        load_config(None, ["train.select=val"])


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides({}, ["optim.lr"])


def test_every_recipe_validates():
    recipes = [p for p in (ROOT / "configs").rglob("*.yaml") if not {"_base", "studies"} & set(p.parts)]
    assert len(recipes) >= 60
    for recipe in recipes:
        load_config(recipe)


def test_recipe_base_inheritance():
    config = load_config(ROOT / "configs/cifar100_lt/if50/ldam_drw.yaml")
    assert config.data.dataset == "cifar100_lt" and config.data.imbalance_factor == 50
    assert config.model.name == "resnet32" and config.loss.params["drw_epoch"] == 160
    assert config.schedule.milestones == [160, 180] and config.optim.weight_decay == 2e-4
    # the cosine head scales by s = 30 itself, so evaluation sees the logits the loss trained
    assert config.model.params == {"head": "cosine", "head_scale": 30.0}
    assert config.loss.params["max_margin"] == 15.0 and config.loss.params["scale"] == 1.0


def test_registry_duplicate_and_unknown_names():
    registry = Registry("thing")

    @registry.register("a")
    def make_a(num_classes: int, width: int = 3) -> tuple:
        return num_classes, width

    with pytest.raises(ValueError, match="registered twice"):
        registry.register("a")(make_a)
    with pytest.raises(ConfigError, match="available: a"):
        registry.get("b")
    assert registry.build("a", {"width": 5}, num_classes=10, ignored_context=1) == (10, 5)
    with pytest.raises(ConfigError, match="unknown key thing.params.depth.*allowed: width"):
        registry.build("a", {"depth": 5}, where="thing.params", num_classes=10)
    with pytest.raises(ConfigError, match="set by longtail itself"):
        registry.build("a", {"num_classes": 5}, num_classes=10)
