"""Pretrained backbones (timm, open_clip), fine-tuning modes, head initialisation, LoRA merging for
export and test-time ensembling, on real but tiny randomly initialised timm/open_clip ViTs (no weights
can be downloaded here: the tests save their own and load them back through ``model.weights``)."""
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

timm = pytest.importorskip("timm", reason="the foundation extra (timm) is not installed")
open_clip = pytest.importorskip("open_clip", reason="the foundation extra (open-clip-torch) is not installed")
pytest.importorskip("peft", reason="the foundation extra (peft) is not installed")

import longtail.models  # noqa: E402,F401  (registers the models)
from longtail.cli import main  # noqa: E402
from longtail.runs import load_run  # noqa: E402
from longtail.config import load_config  # noqa: E402
from longtail.engine import builders  # noqa: E402
from longtail.engine.distributed import DistInfo  # noqa: E402
from longtail.engine.optim import build_optimizer  # noqa: E402
from longtail.models.finetune import FINETUNE_MODES, lift_bottleneck, merged_for_export, parameter_counts  # noqa: E402
from longtail.models.tta import TestTimeEnsemble as Ensemble, tta_views  # noqa: E402
from longtail.registry import MODELS, ConfigError  # noqa: E402

C = 5
NAMES = ["cat", "dog", "sea_turtle", "apple", "car"]
TINY_VIT = {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2}
TINY_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8,
                                             "head_width": 32},
             "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
# Digits-LT (8 x 8 grey) on a 2-block ViT with 4 x 4 patches: a real run in seconds
DIGITS_VIT = ["device=cpu", "model.name=timm", "model.params.arch=vit_tiny_patch16_224",
              "model.params.create_kwargs={img_size: 8, patch_size: 4, depth: 2, embed_dim: 32, num_heads: 2}",
              "train.epochs=2", "train.eval_every=0", "optim.lr=0.05"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: more threads only spin


@pytest.fixture(scope="module")
def clip_json(tmp_path_factory):
    path = tmp_path_factory.mktemp("clip") / "tiny-clip-test.json"
    path.write_text(json.dumps(TINY_CLIP))
    return str(path)


def timm_vit(**context):
    return MODELS.build("timm", {"arch": "vit_tiny_patch16_224", "create_kwargs": TINY_VIT}, where="model.params",
                        num_classes=C, **context)


def clip_vit(clip_json, params=None, **context):
    return MODELS.build("open_clip", {"arch": clip_json, **(params or {})}, where="model.params", num_classes=C,
                        class_names=NAMES, **context)


def images(n=4, seed=0):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- weights

def test_timm_weights_load_bit_exactly_and_mismatches_are_listed(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", num_classes=10, **TINY_VIT)  # with timm's own head
    torch.save(reference.state_dict(), tmp_path / "vit.pt")
    model = timm_vit(pretrained_path=str(tmp_path / "vit.pt")).eval()
    for key, value in reference.state_dict().items():
        if not key.startswith("head."):  # the classifier of the source network is dropped
            assert torch.equal(model.backbone.net.state_dict()[key], value), key
    reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(images()).features, reference.forward_head(
            reference.forward_features(images()), pre_logits=True), rtol=0, atol=0)
    wrapped = {"state_dict": {f"module.{k}": v for k, v in reference.state_dict().items()}}
    torch.save(wrapped, tmp_path / "wrapped.pt")  # a library checkpoint saved from DDP
    assert torch.equal(timm_vit(pretrained_path=str(tmp_path / "wrapped.pt")).backbone.net.pos_embed,
                       reference.pos_embed)
    deeper = timm.create_model("vit_tiny_patch16_224", num_classes=0, **{**TINY_VIT, "depth": 3, "embed_dim": 32})
    torch.save(deeper.state_dict(), tmp_path / "deeper.pt")
    with pytest.raises(ConfigError, match=r"does not fit .*unexpected \(\d+\): blocks\.2\..*wrong shape \(\d+\): "
                                          r"blocks\.0\.attn\.proj\.bias"):
        timm_vit(pretrained_path=str(tmp_path / "deeper.pt"))


def test_weights_are_not_read_again_when_a_checkpoint_is_loaded(tmp_path):
    # eval/predict/export rebuild the model with load_weights=False: the file may be gone by then
    assert timm_vit(pretrained_path=str(tmp_path / "gone.pt"), load_weights=False) is not None
    with pytest.raises(ConfigError, match="does not exist"):
        timm_vit(pretrained_path=str(tmp_path / "gone.pt"))


def test_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="not a timm architecture"):
        MODELS.build("timm", {"arch": "vit_nonexistent"}, where="model.params", num_classes=C)
    with pytest.raises(ConfigError, match="finetune_params r do not apply to finetune=adaptformer; allowed: "
                                          "bottleneck, scale"):
        timm_vit(finetune="adaptformer", finetune_params={"r": 4})
    with pytest.raises(ConfigError, match="blocks=3: the backbone has 2 blocks"):
        timm_vit(finetune="partial", finetune_params={"blocks": 3})
    with pytest.raises(ConfigError, match="has none; use full, linear, bitfit or lora"):
        MODELS.build("timm", {"arch": "resnet18"}, where="model.params", num_classes=C, finetune="vpt")
    config = load_config(None, ["model.finetune=lora"])  # the Digits-LT MLP is not a pretrained network
    with pytest.raises(ConfigError, match="model.finetune apply to pretrained timm/open_clip models"):
        builders.build_model(config, builders.build_bundle(config), torch.device("cpu"))
    with pytest.raises(ConfigError, match="model.finetune"):
        load_config(None, ["model.finetune=prefix"])


def test_a_missing_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    with pytest.raises(ConfigError, match=r"needs the timm package, which is not installed: "
                                          r"pip install 'longtail\[foundation\]'"):
        timm_vit()


# ---------------------------------------------------------------------------------- fine-tuning modes

# what each mode trains besides the head, as parameter-name patterns of the tiny 2-block ViTs
TRAINS = {
    "full": lambda name: True,
    "linear": lambda name: False,
    "partial": lambda name: ".blocks.1." in name or ".resblocks.1." in name or name.endswith(
        ("net.norm.weight", "net.norm.bias", "ln_post.weight", "ln_post.bias")),
    "lora": lambda name: "lora_" in name,
    "adaptformer": lambda name: ".adapter." in name,
    "vpt": lambda name: name.endswith(".prompt"),
    "bitfit": lambda name: name.endswith("bias"),
    "ssf": lambda name: ".ssf." in name,
}
# trainable parameters besides the 5 x 64 cosine head, worked out by hand for the timm ViT (D = 64, MLP 256,
# 2 blocks): lora r 8 on qkv: 8 x (64 + 192) a block; adaptformer width 4: LN 128 + down 64 x 4 + 4 + up
# 4 x 64 + 64 + scale 1; vpt deep 10 x 64; bitfit: patch embedding 64, per block norm1 64 + qkv 192 + proj 64
# + norm2 64 + fc1 256 + fc2 64, final norm 64; ssf: scale and shift after qkv, proj, fc1, fc2 and both norms
EXTRA = {"linear": 0, "lora": 2 * 8 * (64 + 192), "adaptformer": 2 * (128 + 260 + 320 + 1), "vpt": 2 * 10 * 64,
         "ssf": 2 * 2 * (192 + 64 + 256 + 64 + 128), "bitfit": 64 + 2 * (64 + 192 + 64 + 64 + 256 + 64) + 64}
# a width-1 adapter (LIFT's default for 5 classes) can be dead on every class token of a small batch
PARAMS = {"adaptformer": {"bottleneck": 4}}


@pytest.mark.parametrize("family", ["timm", "open_clip"])
@pytest.mark.parametrize("mode", list(FINETUNE_MODES))
def test_each_mode_moves_exactly_its_parameters(mode, family, clip_json):
    torch.manual_seed(0)
    params = PARAMS.get(mode, {})
    model = (timm_vit(finetune=mode, finetune_params=params) if family == "timm"
             else clip_vit(clip_json, finetune=mode, finetune_params=params))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {name for name, _ in model.named_parameters() if name.startswith("heads.") or TRAINS[mode](name)}
    assert trainable == expected and trainable
    if family == "timm" and mode in EXTRA:
        assert parameter_counts(model)["trainable"] == C * 64 + EXTRA[mode]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = build_optimizer(model.parameters(), load_config(None, ["optim.weight_decay=0.1"]).optim,
                                torch.device("cpu"))
    for step in range(2):  # the second step: adapters zero-initialised on one side have moved on the other
        loss = F.cross_entropy(model(images(seed=step)).logits, torch.arange(4) % C)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    if family == "open_clip" and mode == "lora":
        # peft's LoRA on nn.MultiheadAttention adds the update to the fused in-projection for each forward and
        # takes it off again: the frozen weights move by float rounding only
        rounded = {name for name in moved - expected if ".attn.base_layer." in name and name.endswith("weight")}
        assert rounded and all((model.get_parameter(name) - before[name]).abs().max() < 1e-6 for name in rounded)
        moved -= rounded
    assert moved == expected
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in optimizer.state} <= held
    frozen_grads = [name for name, p in model.named_parameters() if not p.requires_grad and p.grad is not None]
    assert not frozen_grads


def test_lift_adapter_width():
    assert [lift_bottleneck(c, 12) for c in (100, 1000, 365, 8142)] == [4, 32, 8, 256]
    adapter = timm_vit(finetune="adaptformer").backbone.net.blocks[0].mlp.adapter
    assert adapter.down_proj.out_features == 1  # 5 classes, 2 blocks


def test_adapters_start_as_the_pretrained_function():
    torch.manual_seed(0)
    plain = timm_vit().eval()
    for mode in ("lora", "adaptformer"):
        torch.manual_seed(0)
        adapted = timm_vit(finetune=mode).eval()
        with torch.no_grad():
            torch.testing.assert_close(adapted(images()).features, plain(images()).features)


def test_lora_merges_into_plain_weights(clip_json):
    for model in (timm_vit(finetune="lora"), clip_vit(clip_json, finetune="lora")):
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        model.eval()
        merged = merged_for_export(model)
        assert not any("lora" in name for name, _ in merged.named_parameters())
        with torch.no_grad():
            before, after = model(images()).logits, merged(images()).logits
        assert (before - timm_vit().eval()(images()).logits).abs().max() > 1e-2  # LoRA changed the function
        torch.testing.assert_close(after, before, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------- heads, zero-shot

def test_open_clip_text_head_and_zero_shot_are_clip(clip_json):
    torch.manual_seed(0)
    open_clip.add_model_config(clip_json)
    reference = open_clip.create_model("tiny-clip-test").eval()
    torch.save(reference.state_dict(), Path(clip_json).with_suffix(".pt"))
    weights = str(Path(clip_json).with_suffix(".pt"))
    tokenizer = open_clip.get_tokenizer("tiny-clip-test")
    with torch.no_grad():
        text = F.normalize(reference.encode_text(tokenizer([f"a photo of a {n.replace('_', ' ')}." for n in NAMES])),
                           dim=-1)
        clip_logits = reference.logit_scale.exp() * F.normalize(reference.encode_image(images()), dim=-1) @ text.T
    zero_shot = clip_vit(clip_json, {"head": "zero_shot"}, pretrained_path=weights).eval()
    assert parameter_counts(zero_shot)["trainable"] == 0
    with torch.no_grad():
        torch.testing.assert_close(zero_shot(images()).logits, clip_logits, atol=1e-4, rtol=1e-4)
    lift = clip_vit(clip_json, {"head_scale": 25.0}, pretrained_path=weights)  # cosine head, text init
    expected = F.normalize(text @ reference.visual.proj.detach().T, dim=-1)
    torch.testing.assert_close(lift.heads[0].weight.detach(), expected)
    ensemble = clip_vit(clip_json, {"prompts": ["a photo of a {}.", "itap of a {}."]}, pretrained_path=weights)
    assert not torch.allclose(ensemble.heads[0].weight, lift.heads[0].weight)


def test_class_mean_head_init(tmp_path):
    config = load_config(None, DIGITS_VIT + ["model.params.head_init=class_mean", "train.amp=none"])
    bundle = builders.build_bundle(config)
    dist = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    torch.manual_seed(0)
    model = builders.build_model(config, bundle, dist.device)
    builders.init_head(config, model, bundle, dist)
    model.eval()
    with torch.no_grad():
        features = model.backbone(builders.build_augment(config, bundle).normalize(bundle.train.images))[0][0]
    targets = bundle.train.targets
    means = torch.stack([features[targets == c].mean(0) for c in range(bundle.num_classes)])
    torch.testing.assert_close(model.heads[0].weight.detach(), F.normalize(means, dim=-1), atol=1e-5, rtol=1e-4)


# -------------------------------------------------------------------------------------- data config

def test_the_data_pipeline_follows_the_pretrained_config(cifar10_small):
    recipe = ["model.name=timm", "model.params.arch=vit_tiny_patch16_224", "data.dataset=image_folder",
              f"data.root={cifar10_small['tree']}"]
    bundle = builders.build_bundle(load_config(None, recipe))
    assert bundle.image_size == 224 and bundle.mean == (0.5, 0.5, 0.5) and bundle.std == (0.5, 0.5, 0.5)
    own = builders.build_bundle(load_config(None, recipe + ["data.image_size=64", "model.normalization=dataset"]))
    assert own.image_size == 64 and own.mean != (0.5, 0.5, 0.5)
    clip = builders.build_bundle(load_config(None, recipe + ["model.name=open_clip", "model.params.arch=ViT-B-16",
                                                            "model.params.tag=openai"]))
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073)) and clip.image_size == 224


def test_small_images_are_resized_to_the_input_size_inside_the_model():
    model = timm_vit().eval()
    calls = []
    model.backbone.net.patch_embed.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape))
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    assert calls == [torch.Size([2, 3, 32, 32])]


# --------------------------------------------------------------------------------------------- TTA

def test_tta_views_and_averaged_logits():
    x = images(2)
    flip = tta_views(x, "flip")
    assert len(flip) == 2 and torch.equal(flip[1], x.flip(-1))
    five = tta_views(x, "five_crop", resize=40 / 32)
    big = F.interpolate(x, size=(40, 40), mode="bilinear", align_corners=False)
    import torchvision.transforms.functional as TF
    for got, want in zip(five, TF.five_crop(big, [32, 32])):
        assert torch.equal(got, want)
    assert len(tta_views(x, "ten_crop")) == 10
    model = timm_vit().eval()
    with torch.no_grad():
        ensembled = Ensemble(model, "flip")(x).logits
        expected = (model(x).logits + model(x.flip(-1)).logits) / 2
        assert not torch.allclose(model(x).logits, expected)
    torch.testing.assert_close(ensembled, expected)
    config = load_config(None, ["eval.tta=ten_crop"])
    wrapped = builders.evaluation_model(config, model)
    assert wrapped.mode == "ten_crop" and not wrapped.training  # predict() puts the model back as it was
    assert builders.evaluation_model(load_config(None), model) is model


# ------------------------------------------------------------------------ a real run, eval, export

def test_a_lora_run_counts_exports_and_evaluates_with_tta(tmp_path):
    assert main(["train", *DIGITS_VIT, f"output_dir={tmp_path}", "model.finetune=lora", "train.amp=none",
                 "train.channels_last=yes"]) == 0
    run = tmp_path / "digits_lt_ce"
    metrics = json.loads((run / "metrics.json").read_text())
    model = load_run(run).model
    assert metrics["parameters"] == parameter_counts(model)
    assert 0 < metrics["parameters"]["trainable"] < metrics["parameters"]["total"] / 4
    assert "trainable of" in (run / "train.log").read_text()
    out = tmp_path / "model.pt"
    assert main(["export", str(run), "--format", "torchscript", "--out", str(out)]) == 0
    from longtail.commands.export import load_export
    forward, info = load_export(out)
    loaded = load_run(run)
    test_images = loaded.bundle.test.images[:64]
    with torch.no_grad():
        expected = loaded.model(loaded.augment.normalize(test_images)).logits
    torch.testing.assert_close(forward(test_images.float()), expected, atol=1e-4, rtol=0)
    module = torch.jit.load(str(out))
    assert not any("lora" in name for name, _ in module.named_parameters())
    assert main(["eval", str(run), "eval.tta=flip"]) == 0
    assert 0 <= json.loads(next((run / "evals").glob("*/metrics.json")).read_text())["last"]["test"]["top1"] <= 1


def test_deep_vpt_gives_every_block_its_own_prompts(clip_json):
    for model in (timm_vit(finetune="vpt"), clip_vit(clip_json, finetune="vpt")):
        blocks = model.backbone.blocks[0]
        lengths = []
        for block in blocks:
            block.block.register_forward_pre_hook(lambda m, args: lengths.append(args[0].shape[1]))
        with torch.no_grad():
            model.eval()(images(2))
        assert lengths == [1 + 16 + 10] * 2  # class token, 4 x 4 patches, 10 prompts: the previous ones replaced
    shallow = timm_vit(finetune="vpt", finetune_params={"deep": False})
    assert sum(p.numel() for n, p in shallow.named_parameters() if n.endswith(".prompt")) == 10 * 64


def test_zero_shot_evaluation_of_a_recipe(clip_json, cifar10_small, tmp_path, capsys):
    torch.manual_seed(0)
    open_clip.add_model_config(clip_json)
    torch.save(open_clip.create_model("tiny-clip-test").state_dict(), tmp_path / "clip.pt")
    recipe = tmp_path / "zs.yaml"
    recipe.write_text(f"name: zs\noutput_dir: {tmp_path}\ndevice: cpu\n"
                      f"data: {{dataset: image_folder, root: {cifar10_small['tree']}, num_workers: 0}}\n"
                      f"model: {{name: open_clip, params: {{arch: {clip_json}}}, weights: {tmp_path / 'clip.pt'}}}\n")
    assert main(["eval", str(recipe), "eval.tta=flip", "--zero-shot"]) == 0
    results = json.loads((tmp_path / "zs_zero_shot" / "metrics.json").read_text())
    assert results["selection"].startswith("zero-shot") and 0 <= results["last"]["test"]["top1"] <= 1
    assert "tta: flip" in (tmp_path / "zs_zero_shot" / "config.yaml").read_text()
    (tmp_path / "timm.yaml").write_text("model: {name: timm, params: {arch: resnet18}}\n")
    assert main(["eval", str(tmp_path / "timm.yaml"), "--zero-shot"]) == 2
    assert "error: --zero-shot needs a recipe with model.name=open_clip" in capsys.readouterr().err


def test_layerwise_lr_decay_for_full_fine_tuning():
    from longtail.models.finetune import layerwise_groups
    model = timm_vit(finetune="full", finetune_params={"layer_decay": 0.5})
    groups = layerwise_groups(model, 1.0)
    lr_of = {id(p): group["lr"] for group in groups for p in group["params"]}
    net = model.backbone.net
    assert lr_of[id(net.patch_embed.proj.weight)] == lr_of[id(net.cls_token)] == 0.125  # 0.5^(2 + 1)
    assert lr_of[id(net.blocks[0].attn.qkv.weight)] == 0.25 and lr_of[id(net.blocks[1].mlp.fc2.bias)] == 0.5
    assert lr_of[id(net.norm.weight)] == lr_of[id(model.heads[0].weight)] == 1.0
    assert len(lr_of) == len(list(model.parameters()))
    optimizer = build_optimizer(groups, load_config(None, ["optim.lr=1.0"]).optim, torch.device("cpu"))
    assert sorted(group["lr"] for group in optimizer.param_groups) == [0.125, 0.25, 0.5, 1.0]
    with pytest.raises(ConfigError, match="layer_decay must be in"):
        timm_vit(finetune_params={"layer_decay": 1.5})


@pytest.mark.parametrize("recipe, epochs, top1", [("cifar100_lt/if100", 10, 81.7), ("imagenet_lt", 10, 78.3),
                                                  ("places_lt", 10, 52.2), ("inaturalist2018", 20, None)])
def test_lift_recipes_hold_the_authors_settings(recipe, epochs, top1):
    from longtail.report.papers import load_paper_numbers, paper_entry_for
    config = load_config(Path(__file__).parents[1] / "configs" / recipe / "lift_clip_vitb16.yaml")
    model, optim = config.model, config.optim
    assert (model.name, model.params["arch"], model.params["tag"], model.pretrained) == ("open_clip", "ViT-B-16",
                                                                                          "openai", True)
    assert (model.finetune, model.params["head"], model.params["head_scale"], model.params["head_init"]) == (
        "adaptformer", "cosine", 25.0, "text")
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay, config.data.batch_size) == (
        "sgd", 0.01, 0.9, 5e-4, 128)
    assert (config.schedule.name, config.schedule.per_step, config.schedule.warmup_epochs) == ("cosine", False, 0)
    assert (config.loss.name, config.loss.params, config.train.epochs) == ("logit_adjustment", {"tau": 1.0}, epochs)
    assert config.eval.tta == "five_crop" and config.eval.tta_resize * 224 == pytest.approx(248)
    entry = paper_entry_for({"config": config.model_dump(mode="json"), "stage": "stage 1"}, load_paper_numbers())
    assert (entry["metrics"]["top1"] if entry else None) == top1


def test_resume_does_not_read_the_weights_file_again(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", num_classes=0, in_chans=1,
                               **{**TINY_VIT, "img_size": 8, "patch_size": 4, "embed_dim": 32})
    torch.save(source.state_dict(), tmp_path / "vit.pt")
    assert main(["train", *DIGITS_VIT, f"output_dir={tmp_path}", f"model.weights={tmp_path / 'vit.pt'}",
                 "model.params.head_init=class_mean", "train.stop_at_epoch=1"]) == 0
    (tmp_path / "vit.pt").unlink()  # an offline machine that resumes elsewhere
    assert main(["train", "--resume", str(tmp_path / "digits_lt_ce")]) == 0
    assert json.loads((tmp_path / "digits_lt_ce" / "metrics.json").read_text())["last"]["epoch"] == 2


def test_a_linear_probes_backbone_stays_in_eval_mode_and_its_batch_norm_statistics_do_not_move():
    """model.finetune=linear freezes everything before the head: model.train() leaves the backbone
    (batch norm, dropout) as evaluated, so a training forward does not move its running statistics;
    a fine-tuned backbone (bitfit) trains as usual."""
    probe = MODELS.build("timm", {"arch": "resnet10t", "create_kwargs": {"drop_rate": 0.5}}, where="model.params",
                         num_classes=C, finetune="linear")
    probe.train()
    batch_norms = [m for m in probe.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and not probe.backbone.training and all(not m.training for m in batch_norms)
    assert all(head.training for head in probe.heads)
    before = [m.running_mean.clone() for m in batch_norms]
    probe(images(n=4))
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, batch_norms))
    tuned = MODELS.build("timm", {"arch": "resnet10t"}, where="model.params", num_classes=C, finetune="bitfit")
    tuned.train()
    assert tuned.backbone.training and all(m.training for m in tuned.backbone.modules()
                                           if isinstance(m, torch.nn.BatchNorm2d))
