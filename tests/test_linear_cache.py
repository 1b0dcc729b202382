"""A linear probe (``model.finetune=linear``) trains on cached features (engine/cached_features.py): one
backbone pass over the training images, the same head weights and metrics as the uncached run when
nothing random is drawn per epoch, and ``cache_features=auto`` only caching where that is exact."""
import pytest
import torch

pytest.importorskip("timm", reason="the foundation extra (timm) is not installed")

import longtail.models  # noqa: E402,F401  (registers the models)
from longtail.config import load_config  # noqa: E402
from longtail.engine import builders  # noqa: E402
from longtail.engine.cached_features import CachedFeatureLoader, cache_decision, random_augmentations  # noqa: E402
from longtail.engine.distributed import DistInfo  # noqa: E402
from longtail.engine.trainer import Trainer, seed_everything  # noqa: E402
from longtail.engine import trainer as trainer_module  # noqa: E402
from longtail.registry import ConfigError  # noqa: E402

# Digits-LT (8 x 8 grey, no augmentation by default) on a 2-block timm ViT (no dropout: train and eval
# mode give the same features)
DIGITS_VIT = ["device=cpu", "model.name=timm", "model.params.arch=vit_tiny_patch16_224",
              "model.params.create_kwargs={img_size: 8, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}",
              "train.epochs=3", "train.eval_every=0", "optim.lr=0.05", "train.amp=none", "model.finetune=linear"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _fit(tmp_path, cache: str, monkeypatch):
    """Train; return (the trained model, its results, images the backbone saw outside evaluation, job)."""
    config = load_config(None, DIGITS_VIT + [f"model.finetune_params.cache_features={cache}"])
    seed_everything(config.seed)
    bundle = builders.build_bundle(config)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    job = builders.stage1_job(config, bundle, dist)
    seen, evaluating = [0], [False]
    job.model.backbone.register_forward_hook(
        lambda module, inputs, output: None if evaluating[0] else seen.__setitem__(0, seen[0] + inputs[0].shape[0]))
    def counted(evaluation):
        def wrapper(*args, **kwargs):
            evaluating[0] = True
            try:
                return evaluation(*args, **kwargs)
            finally:
                evaluating[0] = False
        return wrapper

    # the epochs' evaluations and the final scores are evaluation; the cache's extraction is not
    monkeypatch.setattr(Trainer, "evaluate", counted(Trainer.evaluate))
    monkeypatch.setattr(trainer_module, "final_scores", counted(trainer_module.final_scores))
    fit = Trainer(config, job, bundle, tmp_path / cache, dist).fit()
    return job.model, fit.results, seen[0], job, bundle


def test_cached_linear_probe_equals_uncached_and_passes_each_image_once(tmp_path, monkeypatch):
    cached_model, cached, cached_seen, cached_job, bundle = _fit(tmp_path, "true", monkeypatch)
    plain_model, plain, plain_seen, plain_job, _ = _fit(tmp_path, "false", monkeypatch)
    assert isinstance(cached_job.loader, CachedFeatureLoader) and not isinstance(plain_job.loader, CachedFeatureLoader)
    train_images, epochs = len(bundle.train.targets), 3
    # the cache: one pass over the training images, whatever the epochs; uncached: every epoch's batches
    assert cached_seen == train_images
    assert cached_job.loader.extractions == 1
    assert plain_seen == epochs * plain_job.loader.samples_per_epoch > train_images
    for name, value in plain_model.heads.state_dict().items():
        torch.testing.assert_close(cached_model.heads.state_dict()[name], value, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(cached_model.backbone.state_dict(), plain_model.backbone.state_dict())
    for key in ("top1", "many_top1", "few_top1"):
        assert cached["last"]["test"][key] == pytest.approx(plain["last"]["test"][key], abs=1e-6)
    assert cached["last"]["test"]["nll"] == pytest.approx(plain["last"]["test"]["nll"], rel=1e-4)


def test_auto_caches_only_without_random_augmentation():
    def decide(*overrides):
        return cache_decision(load_config(None, DIGITS_VIT + list(overrides)))

    cache, line = decide()
    assert cache and "cached features" in line
    cache, line = decide("data.augment.flip=true")
    assert not cache and "flip" in line and "not cached" in line
    cache, line = decide("data.augment.flip=true", "model.finetune_params.cache_features=true")
    assert cache and "NOT applied (flip" in line
    assert decide("model.finetune_params.cache_features=false")[0] is False
    assert decide("model.finetune=full") == (False, "")
    with pytest.raises(ConfigError, match="cache_features"):
        decide("model.finetune_params.cache_features=sometimes")
    config = load_config(None, DIGITS_VIT + ["data.augment.crop_padding=4", "data.augment.mixup_alpha=1.0",
                                             "data.augment.cutout=4"])
    assert random_augmentations(config.data.augment) == ["crop_padding=4", "cutout=4", "mixup_alpha=1.0"]


def test_cache_features_is_a_linear_only_setting():
    from longtail.models.finetune import FINETUNE_MODES
    assert FINETUNE_MODES["linear"] == {"cache_features": "auto"}
    assert "cache_features" not in FINETUNE_MODES["lora"]


def test_a_stopped_cached_run_resumes_to_the_same_head(tmp_path):
    """The cache is extracted lazily, after --resume has loaded the checkpoint: the resumed run ends
    where the uninterrupted one does."""
    import timm
    from longtail.cli import main
    from longtail.engine.checkpoint import load_checkpoint
    torch.manual_seed(123)  # weights a resumed run's freshly built (seeded) backbone does not have
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1, img_size=8, patch_size=4, depth=2,
                               embed_dim=32, num_heads=2)
    torch.save(source.state_dict(), tmp_path / "vit.pt")
    common = ["train", *DIGITS_VIT, "model.finetune_params.cache_features=true", f"model.weights={tmp_path / 'vit.pt'}"]
    assert main([*common, f"output_dir={tmp_path / 'whole'}"]) == 0
    assert main([*common, f"output_dir={tmp_path / 'parts'}", "train.stop_at_epoch=1"]) == 0
    (run,) = [p for p in (tmp_path / "parts").iterdir() if p.is_dir()]
    assert main(["train", "--resume", str(run)]) == 0
    (whole,) = [p for p in (tmp_path / "whole").iterdir() if p.is_dir()]
    heads = [load_checkpoint(r / "checkpoints" / "last.pt", torch.device("cpu"))["model"] for r in (whole, run)]
    for key in [k for k in heads[0] if k.startswith("heads.")]:
        torch.testing.assert_close(heads[1][key], heads[0][key], atol=1e-6, rtol=1e-5)
