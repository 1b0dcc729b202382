"""Models: output contract of every registered model, CIFAR ResNet sizes, SHIKE's DKF, expert
aggregation, heads (cosine, LWS, tau-norm), BBN's paired batch and alpha, pretrained loading."""
from collections import OrderedDict
from functools import cache
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

import longtail.models  # noqa: F401  (registers the models)
from longtail.losses.terms import batch_loss
from longtail.losses import CrossEntropy
from longtail.functional import bbn_alpha
from longtail.models import BBN, Classifier, CosineHead, LinearHead, LWSHead, TauNormHead, make_head
from longtail.models.heads import fresh_like
from longtail.models.cifar_resnet import PadShortcut
from longtail.registry import MODELS, ConfigError
from longtail.types import Batch, ModelOutput

C = 5


def build(name, **params):
    context = {"num_classes": C}
    if name in ("mlp", "small_cnn"):
        context.update(in_channels=1, image_size=8)
    return MODELS.build(name, params, where="model.params", **context)


@cache
def built_for_eval(name):
    """One default-built model per name for the read-only tests (the big ones take a second to build)."""
    return build(name).eval()


def images(shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# name -> (input shape, experts M, feature dim D per expert); ResNet-152 (slow to build) is resnet50's code path
CASES = {
    "resnet20": ((2, 3, 32, 32), 1, 64),
    "resnet32": ((2, 3, 32, 32), 1, 64),
    "resnet44": ((2, 3, 32, 32), 1, 64),
    "resnet56": ((2, 3, 32, 32), 1, 64),
    "shike_resnet32": ((2, 3, 32, 32), 3, 64),
    "ride_resnet32": ((2, 3, 32, 32), 3, 48),
    "mlp": ((4, 1, 8, 8), 1, 128),
    "small_cnn": ((4, 1, 8, 8), 1, 128),
    "resnet50": ((2, 3, 64, 64), 1, 2048),
    "resnext50_32x4d": ((2, 3, 64, 64), 1, 2048),
    "resnet152": ((2, 3, 64, 64), 1, 2048),
    "shike_resnet50": ((2, 3, 64, 64), 3, 2048),
    "ride_resnet50": ((2, 3, 64, 64), 3, 1536),
}


def test_every_registered_model_has_a_case():
    # models that other test modules register for themselves (e.g. test_stage2's two-expert CNN) are not the package's
    packaged = {name for name in MODELS.names() if not MODELS.get(name).__module__.startswith(("test", "conftest"))}
    assert packaged == set(CASES) | {"bbn_resnet32", "timm", "open_clip"}  # the last two: test_foundation.py


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "resnet152" else n for n in CASES])
def test_output_contract(name):
    shape, experts, dim = CASES[name]
    model = built_for_eval(name)
    with torch.no_grad():
        out = model(images(shape))
    batch = shape[0]
    assert isinstance(out, ModelOutput) and len(model.heads) == experts
    assert out.logits.shape == (batch, C) and out.features.shape == (batch, experts * dim)
    if experts == 1:
        assert out.expert_logits is None and out.expert_features is None
        expert_features = out.features.unsqueeze(0)
    else:
        assert out.expert_logits.shape == (experts, batch, C) and out.expert_features.shape == (experts, batch, dim)
        torch.testing.assert_close(out.features, torch.cat(list(out.expert_features), dim=1))
        expert_features = out.expert_features
    logits, expert_logits = model.logits_from_features(expert_features)
    torch.testing.assert_close(logits, out.logits)
    assert expert_logits.shape == (experts, batch, C)
    backbone, heads = model.backbone_parameters(), list(model.heads.parameters())
    assert {id(p) for p in backbone}.isdisjoint(id(p) for p in heads)
    assert len(backbone) + len(heads) == len(list(model.parameters()))


@pytest.mark.parametrize("depth, millions", [(20, 0.27), (32, 0.46), (44, 0.66), (56, 0.85)])
def test_cifar_resnet_sizes_match_he_et_al(depth, millions):
    model = MODELS.build(f"resnet{depth}", {}, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.005)


def test_option_b_adds_two_projection_shortcuts():
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # 1x1 convs 16->32 and 32->64 plus their BN weight and bias
    extra = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert count(build("resnet32", shortcut="B")) - count(build("resnet32")) == extra


def test_option_a_shortcut_subsamples_and_zero_pads_channels():
    x = images((1, 2, 4, 4))
    out = PadShortcut(2, 6, stride=2)(x)
    assert out.shape == (1, 6, 2, 2)
    assert out[:, :2].abs().sum() == 0 and out[:, 4:].abs().sum() == 0
    torch.testing.assert_close(out[:, 2:4], x[:, :, ::2, ::2])


def test_channels_last_gives_the_same_logits():
    for name in ("resnet32", "shike_resnet32"):
        model = build(name).eval()
        x = images((2, 3, 32, 32))
        with torch.no_grad():
            plain = model(x).logits
            model = model.to(memory_format=torch.channels_last)
            torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)).logits, plain,
                                       rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- SHIKE / RIDE

def conv_count(module):
    return sum(isinstance(m, torch.nn.Conv2d) for m in module.modules())


def test_dkf_aligns_shallow_maps_to_the_expert_maps_and_multiplies_them():
    model = build("shike_resnet32").eval()
    backbone = model.backbone
    fusion = backbone.fusion
    assert fusion.sources == [1, 2, 1]
    assert [conv_count(a) for a in fusion.alignments] == [2, 1, 2]
    x = images((2, 3, 32, 32))
    with torch.no_grad():
        h, maps = backbone.shared_maps(x)
        deep = [branch(h) for branch in backbone.branches]
        aligned = fusion.align(maps)
        out = model(x)
    assert [m.shape for m in maps] == [(2, 16, 32, 32), (2, 32, 16, 16)]
    assert all(a.shape == d.shape == (2, 64, 8, 8) for a, d in zip(aligned, deep))
    by_hand = torch.stack([(d * a).mean(dim=(2, 3)) for d, a in zip(deep, aligned)])
    torch.testing.assert_close(out.expert_features, by_hand)
    torch.testing.assert_close(out.expert_logits, torch.stack([
        30 * F.normalize(f, dim=1) @ F.normalize(head.weight, dim=1).T for f, head in zip(by_hand, model.heads)]),
        rtol=1e-4, atol=1e-4)


def test_dkf_shapes_on_resnet50():
    model = built_for_eval("shike_resnet50")
    fusion = model.backbone.fusion
    assert fusion.sources == [1, 2, 3] and [conv_count(a) for a in fusion.alignments] == [3, 2, 1]
    with torch.no_grad():
        h, maps = model.backbone.shared_maps(images((2, 3, 64, 64)))
        aligned = fusion.align(maps)
        deep = [branch(h) for branch in model.backbone.branches]
    assert all(a.shape == d.shape == (2, 2048, 2, 2) for a, d in zip(aligned, deep))


def test_dkf_trains_and_can_be_switched_off_or_reassigned():
    model = build("shike_resnet32")
    model(images((4, 3, 32, 32))).logits.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.backbone.fusion.parameters())

    plain = build("shike_resnet32", dkf=False).eval()
    assert plain.backbone.fusion is None
    x = images((2, 3, 32, 32))
    with torch.no_grad():
        h, _ = plain.backbone.shared_maps(x)
        torch.testing.assert_close(plain(x).expert_features,
                                   torch.stack([branch(h).mean(dim=(2, 3)) for branch in plain.backbone.branches]))

    assert [conv_count(a) for a in build("shike_resnet32", dkf_sources=[2, 2, 1]).backbone.fusion.alignments] == [1, 1, 2]
    with pytest.raises(ValueError, match="one shared stage"):
        build("shike_resnet32", dkf_sources=[3, 1, 1])
    with pytest.raises(ValueError, match="one shared stage"):
        build("shike_resnet32", dkf_sources=[1, 2])
    with pytest.raises(ValueError, match="dkf is false"):
        build("shike_resnet32", dkf=False, dkf_sources=[1, 2, 1])


def test_experts_are_initialised_independently():
    model = build("ride_resnet32", reduce_width=False)
    first, second = (branch[0][0].conv1.weight for branch in model.backbone.branches[:2])
    assert not torch.equal(first, second)


def test_sum_and_mean_aggregation():
    x = images((2, 3, 32, 32))
    with torch.no_grad():
        shike = build("shike_resnet32").eval()(x)
        ride = build("ride_resnet32").eval()(x)
        shike_sum = build("shike_resnet32", aggregate="sum").eval()(x)
    # SHIKE's and RIDE's code both average the expert logits; the sum stays an option
    torch.testing.assert_close(shike.logits, shike.expert_logits.mean(0))
    torch.testing.assert_close(ride.logits, ride.expert_logits.mean(0))
    torch.testing.assert_close(shike_sum.logits, shike_sum.expert_logits.sum(0))
    with pytest.raises(ValueError, match="allowed: sum, mean"):
        build("shike_resnet32", aggregate="max")


def test_ride_layout():
    model = build("ride_resnet32")
    assert len(model.backbone.shared) == 1 and len(model.backbone.branches[0]) == 2
    assert isinstance(model.heads[0], CosineHead) and model.heads[0].in_features == 48
    wide = build("ride_resnet32", reduce_width=False, shared_stages=2)
    assert len(wide.backbone.shared) == 2 and wide.heads[0].in_features == 64
    with pytest.raises(ValueError, match="shared_stages must be 1 to 2"):
        build("ride_resnet32", shared_stages=3)


def test_unknown_model_param_names_the_allowed_ones():
    with pytest.raises(ConfigError, match="allowed: .*dkf, dkf_sources"):
        build("shike_resnet32", dfk=True)


# --------------------------------------------------------------------------- heads

def test_cosine_head_is_bounded_by_its_scale_and_ignores_feature_length():
    head = CosineHead(8, 4, scale=30.0)
    x = images((16, 8)) * 100
    logits = head(x)
    assert logits.abs().max() <= 30.0 + 1e-4
    torch.testing.assert_close(head(x / 100), logits)
    along_class_2 = head(head.weight[2:3].detach() * 3.0)
    assert along_class_2[0, 2].item() == pytest.approx(30.0, abs=1e-4)


def test_cosine_head_class_vectors_start_at_unit_length_as_the_authors_normed_linear():
    """SHIKE's, RIDE's and LDAM-DRW's NormedLinear: uniform(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5), i.e. every
    class vector of length 1. The length sets how fast a normalised weight turns (step ~ lr / |w|^2), so
    it must match theirs, for the stage-1 heads and for cRT's fresh ones alike."""
    torch.manual_seed(0)
    authors = torch.empty(64, 100).uniform_(-1, 1).renorm_(2, 1, 1e-5).mul_(1e5)  # (in, out): columns
    head = CosineHead(64, 100)
    for weight in (head.weight, fresh_like(head).weight):
        torch.testing.assert_close(weight.norm(dim=1), authors.norm(dim=0))
    # the same first SGD step as NormedLinear from the same direction: the angle each class vector turns
    x, y = images((32, 64)), torch.arange(32) % 100
    reference = authors.clone().requires_grad_(True)
    head.weight.data.copy_(authors.T)
    (F.cross_entropy(30 * F.normalize(x, dim=1) @ F.normalize(reference, dim=0), y)).backward()
    F.cross_entropy(head(x), y).backward()
    torch.testing.assert_close(head.weight.grad, reference.grad.T)


def test_tau_norm_head():
    base = LinearHead(6, 3)
    x = images((4, 6))
    w = base.weight.detach().numpy()
    torch.testing.assert_close(TauNormHead(base, tau=0.0)(x), x @ base.weight.detach().T)
    unit_rows = w / np.sqrt((w ** 2).sum(axis=1, keepdims=True))
    np.testing.assert_allclose(TauNormHead(base, tau=1.0)(x).numpy(), x.numpy() @ unit_rows.T, rtol=1e-5, atol=1e-6)
    assert not list(TauNormHead(base).parameters())
    with pytest.raises(TypeError, match="linear"):
        TauNormHead(CosineHead(6, 3))


def test_lws_trains_only_the_scales():
    base = LinearHead(6, 3)
    head = LWSHead(base)
    assert [name for name, p in head.named_parameters() if p.requires_grad] == ["scales"]
    x = images((8, 6))
    torch.testing.assert_close(head(x), base(x))
    before = base.weight.detach().clone()
    optimizer = torch.optim.SGD([p for p in head.parameters() if p.requires_grad], lr=0.5)
    F.cross_entropy(head(x), torch.arange(8) % 3).backward()
    optimizer.step()
    assert torch.equal(base.weight, before) and not torch.equal(head.scales, torch.ones(3))
    torch.testing.assert_close(head(x), base(x) * head.scales)
    assert LWSHead(LinearHead(6, 3), train_base=True).base.weight.requires_grad


def test_make_head_names_the_allowed_kinds():
    assert isinstance(make_head("cosine", 4, 2, 16.0), CosineHead) and make_head("cosine", 4, 2, 16.0).scale == 16.0
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        make_head("norm", 4, 2)


# --------------------------------------------------------------------------- BBN

def test_bbn_alpha_is_a_parabolic_decay():
    assert [bbn_alpha(e, 10) for e in (0, 5, 10)] == [1.0, 0.75, 0.0]
    with pytest.raises(ValueError):
        bbn_alpha(11, 10)


@pytest.mark.parametrize("shared_pass", ["separate", "joint"])
def test_bbn_training_mixes_the_two_halves_with_alpha(shared_pass):
    model = build("bbn_resnet32", shared_pass=shared_pass)
    assert isinstance(model, BBN) and len(model.heads) == 1
    model.on_epoch_start(3, 10)
    alpha = 1 - 0.3 ** 2
    assert model.alpha.item() == pytest.approx(alpha)
    uniform, reversed_ = images((4, 3, 32, 32), seed=1), images((4, 3, 32, 32), seed=2)
    x = torch.cat([uniform, reversed_])
    out = model(x)
    assert out.logits.shape == (4, C) and out.features.shape == (4, 128)
    assert out.expert_logits is None  # the branches saw different images: no per-branch logits of one batch
    def shared(images_in):
        h = model.stem(images_in)
        for stage in model.shared:
            h = stage(h)
        return h

    with torch.no_grad():  # by hand: shared stages on each half alone (BBN's two calls) or on all 8 images
        if shared_pass == "separate":
            h_c, h_r = shared(uniform), shared(reversed_)
        else:
            h_c, h_r = shared(x).chunk(2)
        f_c = model.conventional(h_c).mean(dim=(2, 3))
        f_r = model.rebalancing(h_r).mean(dim=(2, 3))
        w, b = model.heads[0].weight, model.heads[0].bias
        by_hand = 2 * (alpha * f_c @ w[:, :64].T + (1 - alpha) * f_r @ w[:, 64:].T) + b
    torch.testing.assert_close(out.logits, by_hand, rtol=1e-4, atol=1e-4)

    targets, mix_targets = torch.tensor([0, 1, 2, 3]), torch.tensor([4, 4, 3, 2])
    batch = Batch(images=x, targets=targets, indices=torch.arange(4), mix_targets=mix_targets,
                  mix_weight=torch.full((4,), alpha))  # what the paired loader sets (test_loaders)
    expected = alpha * F.cross_entropy(out.logits, targets) + (1 - alpha) * F.cross_entropy(out.logits, mix_targets)
    loss, terms = batch_loss(CrossEntropy([1] * C, C), out, batch)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(terms["targets"], alpha * F.cross_entropy(out.logits, targets))
    torch.testing.assert_close(terms["mix_targets"], (1 - alpha) * F.cross_entropy(out.logits, mix_targets))

    with pytest.raises(ValueError, match="pair_sampler"):
        model(images((3, 3, 32, 32)))


def test_bbn_classifier_keeps_torchs_linear_initialisation():
    """megvii-research/BBN builds its classifier (nn.Linear(128, C)) in lib/net/network.py, outside the
    backbone whose _weights_init draws He-normal: so it keeps torch's uniform(-1/sqrt(128), 1/sqrt(128))."""
    torch.manual_seed(0)
    model = MODELS.build("bbn_resnet32", {}, where="model.params", num_classes=100, in_channels=3)
    head = model.heads[0]
    bound = 1 / math.sqrt(128)
    for tensor in (head.weight, head.bias):
        assert tensor.abs().max() <= bound
        assert tensor.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)  # a uniform draw's std
    # the branches' convolutions keep the backbone's He-normal draw (std sqrt(2 / fan_in))
    conv = model.rebalancing.conv1.weight
    assert conv.std().item() == pytest.approx(math.sqrt(2 / conv[0].numel()), rel=0.1)


def test_bbn_evaluates_one_batch_with_an_equal_mix():
    # seeded: with some initial weights the logits reach ~60 and two summation orders differ by 1.5e-4,
    # past the default float32 tolerance (it failed after test_foundation.py had drawn from the generator)
    torch.manual_seed(0)
    model = build("bbn_resnet32").eval()
    model.on_epoch_start(9, 10)
    x = images((3, 3, 32, 32))
    with torch.no_grad():
        out = model(x)
        h = model.stem(x)
        for stage in model.shared:
            h = stage(h)
        features = torch.cat([model.conventional(h).mean(dim=(2, 3)), model.rebalancing(h).mean(dim=(2, 3))], dim=1)
    assert out.logits.shape == (3, C)
    torch.testing.assert_close(out.features, features)
    torch.testing.assert_close(out.logits, model.heads[0](features))
    torch.testing.assert_close(model.logits_from_features(out.features.unsqueeze(0))[0], out.logits)
    branch_sum = out.extras["conventional_logits"] + out.extras["rebalancing_logits"] - model.heads[0].bias
    torch.testing.assert_close(branch_sum, out.logits, rtol=1e-4, atol=1e-4)
    # each branch alone, as an "expert" for per-branch accuracy: the head on its half of the features
    d = features.shape[1] // 2
    weight, bias = model.heads[0].weight, model.heads[0].bias
    assert out.expert_logits.shape == (2, 3, C)
    # (float32 logits of ~50 summed in another order: tolerance as above)
    torch.testing.assert_close(out.expert_logits[0], features[:, :d] @ weight[:, :d].T + bias, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.expert_logits[1], features[:, d:] @ weight[:, d:].T + bias, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- pretrained weights

def ldam_names(model):
    """The backbone's weights under LDAM-DRW's resnet_cifar names, plus its classifier."""
    renames = OrderedDict([("stem.", ""), ("shared.0.", "layer1."), ("shared.1.", "layer2."), ("branches.0.", "layer3.")])
    state = {}
    for key, value in model.backbone.state_dict().items():
        prefix = next(p for p in renames if key.startswith(p))
        state[renames[prefix] + key[len(prefix):]] = value
    state["linear.weight"], state["linear.bias"] = torch.randn(10, 64), torch.randn(10)
    return state


def test_cifar_state_dict_in_ldam_naming_round_trips(tmp_path):
    source = build("resnet32", shortcut="B")
    state = ldam_names(source)
    assert {"conv1.weight", "bn1.running_mean", "layer2.0.shortcut.0.weight", "layer3.4.bn2.weight"} <= set(state)
    torch.save(state, tmp_path / "r32.pt")
    loaded = build("resnet32", shortcut="B", pretrained_path=str(tmp_path / "r32.pt"))
    for (key, a), b in zip(source.backbone.state_dict().items(), loaded.backbone.state_dict().values()):
        assert torch.equal(a, b), key
    shike = build("shike_resnet32", pretrained_path=str(tmp_path / "r32.pt"))
    for branch in shike.backbone.branches:  # every expert starts from the pretrained stage 3
        assert torch.equal(branch[0][4].conv2.weight, state["layer3.4.conv2.weight"])
    bbn = build("bbn_resnet32", shortcut="B", pretrained_path=str(tmp_path / "r32.pt"))
    assert torch.equal(bbn.rebalancing.conv1.weight, state["layer3.4.conv1.weight"])
    assert torch.equal(bbn.shared[2][3].conv1.weight, state["layer3.3.conv1.weight"])


def test_torchvision_state_dict_round_trips(tmp_path):
    reference = torchvision.models.resnet50(weights=None)
    with torch.no_grad():
        reference.bn1.running_mean.uniform_()
    torch.save(reference.state_dict(), tmp_path / "r50.pth")
    model = build("resnet50", pretrained_path=str(tmp_path / "r50.pth"))
    assert torch.equal(model.backbone.stem.conv1.weight, reference.conv1.weight)
    assert torch.equal(model.backbone.stem.bn1.running_mean, reference.bn1.running_mean)
    assert torch.equal(model.backbone.branches[0][2].conv3.weight, reference.layer4[2].conv3.weight)
    assert model.heads[0].out_features == C
    model.eval()
    reference.fc = torch.nn.Identity()
    reference.eval()
    x = images((2, 3, 64, 64))
    with torch.no_grad():
        torch.testing.assert_close(model(x).features, reference(x))
    with pytest.raises(ValueError, match="reduced-width"):
        build("ride_resnet50", pretrained_path=str(tmp_path / "r50.pth"))


def test_wrong_pretrained_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        build("resnet32", pretrained_path=str(tmp_path / "missing.pt"))
    (tmp_path / "garbage.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="cannot read"):
        build("resnet32", pretrained_path=str(tmp_path / "garbage.pt"))
    torch.save({"epoch": 3, "model": {"w": torch.zeros(1)}}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="not a state dict"):
        build("resnet32", pretrained_path=str(tmp_path / "checkpoint.pt"))
    torch.save(ldam_names(build("resnet32")), tmp_path / "r32.pt")
    with pytest.raises(ValueError, match=r"does not fit .*missing \(\d+\): layer1\.0\.bn3.*wrong shape"):
        build("resnet50", pretrained_path=str(tmp_path / "r32.pt"))
    torch.save(ldam_names(build("resnet32", shortcut="B")), tmp_path / "option_b.pt")
    with pytest.raises(ValueError, match="unexpected .*shortcut"):
        build("resnet32", shortcut="A", pretrained_path=str(tmp_path / "option_b.pt"))


# --------------------------------------------------------------------------- small models

def test_small_models_take_their_params():
    assert build("mlp", hidden=[32]).heads[0].in_features == 32
    assert build("small_cnn", width=8).heads[0].in_features == 32
    with pytest.raises(ValueError, match="hidden"):
        build("mlp", hidden=[])
    assert isinstance(build("mlp"), Classifier)
