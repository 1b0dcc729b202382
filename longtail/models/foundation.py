"""Pretrained image networks from ``timm`` and ``open_clip`` as longtail models (the optional
``foundation`` extra: ``pip install 'longtail[foundation]'``).

``model.name=timm`` takes any timm architecture (``model.params.arch``: ViT, ConvNeXt, ResNet,
EfficientNet, CLIP image towers such as ``vit_base_patch16_clip_224.openai``); ``model.name=open_clip``
takes an open_clip architecture (or the path of an open_clip model-config JSON file) and keeps CLIP's
text tower for as long as it is needed: to initialise the classifier from class-name prompts (LIFT's
semantic-aware initialisation) or to build the zero-shot head.

Weights: ``model.pretrained=true`` asks the library for them (its hub cache, or a download where the
machine may); ``model.weights=PATH`` reads a state dict or a library checkpoint from disk, strictly.
Both are only read when a run starts: a trained run's checkpoint holds every weight.

The features are what LIFT classifies: timm's pooled pre-logits features; for open_clip the image
tower's output *before* its projection to the joint space (the projection is kept, frozen, to map
text embeddings back: ``text @ proj.T``, as the authors' code does).
"""
from __future__ import annotations

import importlib
import math
from pathlib import Path
from types import ModuleType
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from longtail.models.classifier import Classifier, load_state_strictly, read_state_file
from longtail.models.finetune import apply_finetune
from longtail.models.heads import CosineHead, Head, make_head, register_head
from longtail.registry import MODELS, ConfigError

__all__ = ["FoundationBackbone", "ZeroShotHead", "optional_import", "timm_model", "open_clip_model",
           "model_data_config", "init_head_from_class_means", "DEFAULT_PROMPTS"]

EXTRA_HINT = "pip install 'longtail[foundation]'"
DEFAULT_PROMPTS = ("a photo of a {}.",)  # LIFT's "default" prompt
HEAD_INITS = ("none", "class_mean", "text")


def optional_import(package: str, what: str) -> ModuleType:
    """Import one of the foundation extra's libraries, or stop with the command that installs it."""
    try:
        return importlib.import_module(package)
    except ImportError:
        pip_name = {"open_clip": "open-clip-torch"}.get(package, package)
        raise ConfigError(f"{what} needs the {pip_name} package, which is not installed: {EXTRA_HINT}") from None


class FoundationBackbone(nn.Module):
    """A pretrained network as a longtail backbone: images -> pooled features (1, B, D).

    Images of another size than the network's input (CIFAR's 32 x 32 for a 224 x 224 ViT) are
    resized to it inside the model, with the pretrained config's interpolation, so the data pipeline,
    ``predict`` and ``export`` keep handing over the dataset's images. ``blocks`` are the transformer
    blocks the fine-tuning modes act on (None for networks without them); ``final_norm`` is what
    follows the last block (partial fine-tuning trains it with the last blocks)."""

    def __init__(self, net: nn.Module, feature_dim: int, input_size: int, interpolation: str,
                 blocks: nn.Module | None, final_norm: nn.Module | None) -> None:
        super().__init__()
        self.net = net
        self.feature_dim, self.input_size = feature_dim, input_size
        self.interpolation = interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear"
        self.blocks = [blocks] if blocks is not None else []  # a plain list: not registered twice
        self.final_norm = [final_norm] if final_norm is not None else []
        self.frozen = False  # set by model.finetune=linear (models/finetune.py)

    def train(self, mode: bool = True) -> "FoundationBackbone":
        """A frozen backbone (``model.finetune=linear``: nothing before the head trains) stays in eval
        mode: training batches do not move its batch-norm statistics and dropout stays off, so the head
        is trained on the features it is evaluated with (and on exactly the cached ones)."""
        return super().train(mode and not self.frozen)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            smaller = x.shape[-1] > self.input_size
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode=self.interpolation,
                              align_corners=False if self.interpolation != "nearest" else None,
                              antialias=smaller and self.interpolation != "nearest")
        return self.net(x).unsqueeze(0), None


@register_head
class ZeroShotHead(Head, nn.Module):
    """CLIP's zero-shot classifier on pre-projection features: ``scale * cos(f @ proj, t_c)`` with
    ``t_c`` the class-name prompts' text embedding. Frozen (buffers): it is the baseline a
    fine-tuned model is compared with, not something to train."""

    kind = "zero_shot"

    def __init__(self, in_features: int, out_features: int, embed_dim: int = 1, scale: float = 100.0) -> None:
        super().__init__()
        self.in_features, self.out_features, self.scale = in_features, out_features, float(scale)
        self.register_buffer("projection", torch.zeros(in_features, embed_dim))
        self.register_buffer("text", torch.zeros(out_features, embed_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        image = F.normalize(features @ self.projection, dim=1)
        return self.scale * F.linear(image, F.normalize(self.text, dim=1))

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "embed_dim": self.text.shape[1], "scale": self.scale}

    @classmethod
    def from_spec(cls, spec: dict[str, Any], in_features: int, out_features: int) -> nn.Module:
        return cls(in_features, out_features, spec["embed_dim"], spec["scale"])


# ------------------------------------------------------------------ weights
def _load_file(net: nn.Module, path: str, drop_prefixes: tuple[str, ...], what: str) -> None:
    try:
        state = read_state_file(path, unwrap=("state_dict", "model", "module"))
        if state and all(k.startswith("module.") for k in state):  # saved from a DDP/DataParallel wrapper
            state = {k.removeprefix("module."): v for k, v in state.items()}
        load_state_strictly(net, state, f"model.weights={path}", drop_prefixes,
                            hint=f"the {what} state dict (e.g. torch.save(model.state_dict(), path) of the same "
                                 "architecture)")
    except (OSError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _pretrained_error(what: str, error: Exception) -> ConfigError:
    return ConfigError(f"cannot load the pretrained weights of {what}: {str(error).splitlines()[0][:300]}. "
                       "On a machine without internet access, save them elsewhere and give model.weights=PATH "
                       "with model.pretrained=false")


def _check_weights(pretrained: bool, weights: str | None) -> None:
    if pretrained and weights:
        raise ConfigError("model.pretrained=true and model.weights are both set; give one: the library's weights "
                          "(pretrained) or a file (weights)")


# -------------------------------------------------------------------- timm
def _timm_blocks(net: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    blocks = getattr(net, "blocks", None)
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or not len(blocks) or not hasattr(blocks[0], "mlp"):
        return None, None
    norm = getattr(net, "fc_norm", None)
    norm = norm if isinstance(norm, nn.LayerNorm) else getattr(net, "norm", None)
    return blocks, norm if isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity) else None


@MODELS.register("timm")
def timm_model(num_classes: int, arch: str = "", in_channels: int = 3, head: str = "cosine", head_scale: float = 25.0,
               head_init: str = "none", create_kwargs: dict[str, Any] | None = None, pretrained: bool = False,
               pretrained_path: str | None = None, finetune: str = "full",
               finetune_params: dict[str, Any] | None = None, load_weights: bool = True) -> Classifier:
    """Any timm architecture ``arch`` with a ``linear``/``cosine`` head on its pooled features.

    ``create_kwargs`` go to ``timm.create_model`` (e.g. ``img_size``, ``drop_path_rate``)."""
    timm = optional_import("timm", "model.name=timm")
    if not arch:
        raise ConfigError("model.params.arch must name a timm architecture, e.g. vit_base_patch16_224 "
                          "(timm.list_models() lists them)")
    if head_init not in ("none", "class_mean"):
        raise ConfigError(f"model.params.head_init={head_init!r} for timm; allowed: none, class_mean "
                          "(text needs model.name=open_clip)")
    _check_weights(pretrained, pretrained_path)
    try:
        net = timm.create_model(arch, pretrained=pretrained and load_weights, num_classes=0,
                                **({"in_chans": in_channels} if in_channels != 3 else {}), **(create_kwargs or {}))
    except RuntimeError as error:
        if "Unknown model" in str(error):
            raise ConfigError(f"model.params.arch={arch!r} is not a timm architecture; "
                              "timm.list_models('*vit*') lists them") from None
        if not pretrained:
            raise ConfigError(f"timm cannot build {arch} with model.params.create_kwargs={create_kwargs}: "
                              f"{str(error).splitlines()[0][:300]}") from None
        raise _pretrained_error(arch, error) from error
    except (OSError, ValueError) as error:
        raise _pretrained_error(arch, error) from error
    if pretrained_path and load_weights:
        classifier = net.pretrained_cfg.get("classifier") or "head"
        names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
        _load_file(net, pretrained_path, tuple(f"{name}." for name in names), f"timm {arch}")
    data = timm.data.resolve_model_data_config(net)
    size = getattr(getattr(net, "patch_embed", None), "img_size", None) or data["input_size"][1:]
    blocks, norm = _timm_blocks(net)
    backbone = FoundationBackbone(net, net.num_features, int(size[0]), data["interpolation"], blocks, norm)
    model = Classifier(backbone, [_head(head, net.num_features, num_classes, head_scale)])
    model.head_init = head_init  # what builders.stage1_job still has to do (class means need the data)
    apply_finetune(model, finetune, finetune_params or {}, num_classes)
    return model


def _head(kind: str, features: int, num_classes: int, scale: float) -> nn.Module:
    if kind not in ("linear", "cosine"):
        raise ConfigError(f"model.params.head={kind!r}; allowed: linear, cosine (open_clip also zero_shot)")
    return make_head(kind, features, num_classes, scale)


# --------------------------------------------------------------- open_clip
def _open_clip_arch(open_clip: ModuleType, arch: str) -> str:
    """An open_clip name, or a model-config JSON file (registered under its file name's stem)."""
    if arch.endswith(".json"):
        path = Path(arch).expanduser()
        if not path.is_file():
            raise ConfigError(f"model.params.arch={arch}: no such open_clip model-config file")
        open_clip.add_model_config(path)
        return path.stem
    if arch not in open_clip.list_models():
        raise ConfigError(f"model.params.arch={arch!r} is not an open_clip architecture; "
                          "open_clip.list_models() lists them (e.g. ViT-B-16), or give a model-config .json file")
    return arch


@torch.no_grad()
def text_embeddings(clip: nn.Module, tokenizer: Any, class_names: Sequence[str], prompts: Sequence[str]) -> torch.Tensor:
    """(C, E) text embeddings of the class names, each prompt's normalised embedding averaged over
    the prompts (LIFT's "ensemble"; one prompt is its "default"); '_' in names becomes a space."""
    names = [name.replace("_", " ") for name in class_names]
    per_prompt = [F.normalize(clip.encode_text(tokenizer([p.format(n) for n in names])).float(), dim=-1)
                  for p in prompts]
    return torch.stack(per_prompt).mean(0)


@MODELS.register("open_clip")
def open_clip_model(num_classes: int, arch: str = "", tag: str | None = None, head: str = "cosine",
                    head_scale: float = 25.0, head_init: str = "text", prompts: Sequence[str] = DEFAULT_PROMPTS,
                    class_names: Sequence[str] = (), pretrained: bool = False, pretrained_path: str | None = None,
                    finetune: str = "full", finetune_params: dict[str, Any] | None = None,
                    load_weights: bool = True) -> Classifier:
    """open_clip's ``arch`` image tower (pretrained ``tag``, e.g. ``openai``) with a ``cosine`` or
    ``linear`` head initialised from class-name prompts (``head_init=text``), from class means, or
    not at all; ``head=zero_shot`` is CLIP's frozen zero-shot classifier."""
    open_clip = optional_import("open_clip", "model.name=open_clip")
    if not arch:
        raise ConfigError("model.params.arch must name an open_clip architecture, e.g. ViT-B-16 (with tag: openai)")
    if head_init not in HEAD_INITS:
        raise ConfigError(f"model.params.head_init={head_init!r}; allowed: {', '.join(HEAD_INITS)}")
    if head not in ("linear", "cosine", "zero_shot"):
        raise ConfigError(f"model.params.head={head!r}; allowed: linear, cosine, zero_shot")
    if isinstance(prompts, str) or not prompts or not all("{}" in p for p in prompts):
        raise ConfigError(f"model.params.prompts must be a list of templates with {{}} for the class name, "
                          f"e.g. ['a photo of a {{}}.'], got {prompts!r}")
    _check_weights(pretrained, pretrained_path)
    name = _open_clip_arch(open_clip, arch)
    if pretrained and not tag:
        tags = [t for a, t in open_clip.list_pretrained() if a == name]
        raise ConfigError(f"model.pretrained=true needs model.params.tag, the pretrained weights' name "
                          f"({', '.join(tags) or 'none listed for ' + name})")
    try:
        clip = open_clip.create_model(name, pretrained=tag if pretrained and load_weights else None)
    except (RuntimeError, OSError, ValueError) as error:
        raise _pretrained_error(f"open_clip {name} ({tag})", error) from error
    if pretrained_path and load_weights:
        _load_file(clip, pretrained_path, (), f"open_clip {name}")
    visual = clip.visual
    if not hasattr(visual, "transformer") or getattr(visual, "proj", None) is None:
        raise ConfigError(f"open_clip {name}: only ViT image towers (with a projection) are supported; "
                          "for other CLIP towers use model.name=timm with its timm name")
    projection = visual.proj.detach().clone()
    visual.proj = None  # features before the projection, as LIFT classifies them
    width = projection.shape[0]
    size = visual.image_size[0] if isinstance(visual.image_size, (tuple, list)) else visual.image_size
    interpolation = getattr(visual, "preprocess_cfg", {}).get("interpolation", "bicubic")
    backbone = FoundationBackbone(visual, width, int(size), interpolation, visual.transformer.resblocks,
                                  visual.ln_post)
    use_text = load_weights and (head == "zero_shot" or head_init == "text")
    if use_text and len(class_names) != num_classes:
        raise ConfigError(f"the text head needs the {num_classes} class names; the dataset gave {len(class_names)}")
    text = text_embeddings(clip, open_clip.get_tokenizer(name), class_names, prompts) if use_text else None
    if head == "zero_shot":
        zero_shot = ZeroShotHead(width, num_classes, projection.shape[1], float(clip.logit_scale.exp()))
        if text is not None:
            zero_shot.projection.copy_(projection)
            zero_shot.text.copy_(text)
        classifier: nn.Module = zero_shot
    else:
        classifier = _head(head, width, num_classes, head_scale)
        if text is not None:  # LIFT: text embeddings mapped back through the image projection
            classifier_weight_from(classifier, F.normalize(text @ projection.t(), dim=-1))
    del clip  # the text tower is not part of the model
    model = Classifier(backbone, [classifier])
    model.head_init = head_init if head != "zero_shot" else "none"
    apply_finetune(model, finetune if head != "zero_shot" else "linear", finetune_params or {}, num_classes)
    return model


@torch.no_grad()
def classifier_weight_from(head: nn.Module, weight: torch.Tensor) -> None:
    """Set a linear or cosine head's class vectors (C, D) (a linear head's bias to 0)."""
    if not isinstance(head, (nn.Linear, CosineHead)):
        raise ConfigError(f"model.params.head_init needs a linear or cosine head, not {type(head).__name__}")
    head.weight.copy_(weight.to(head.weight.dtype))
    if isinstance(head, nn.Linear) and head.bias is not None:
        head.bias.zero_()


def init_head_from_class_means(model: Classifier, features: torch.Tensor, targets: torch.Tensor) -> None:
    """LIFT's class-mean initialisation: each class vector is the normalised mean feature of the
    class's (un-augmented) training images."""
    num_classes = model.heads[0].out_features
    sums = torch.zeros(num_classes, features.shape[1]).index_add_(0, targets, features.float())
    counts = torch.bincount(targets, minlength=num_classes).clamp(min=1).unsqueeze(1)
    classifier_weight_from(model.heads[0], F.normalize(sums / counts, dim=-1).to(model.heads[0].weight.device))


def model_data_config(name: str, params: dict[str, Any]) -> dict[str, Any] | None:
    """The pretrained data config of a foundation model (input size, mean, std, interpolation), read
    without building it; None for other models."""
    arch = params.get("arch", "")
    if name == "timm" and arch:
        timm = optional_import("timm", "model.name=timm")
        kwargs = params.get("create_kwargs") or {}
        try:
            cfg = timm.get_pretrained_cfg(arch)
        except RuntimeError:
            cfg = None
        if cfg is None:
            return None
        size = kwargs.get("img_size", cfg.input_size[1])
        size = size[0] if isinstance(size, (tuple, list)) else size
        return {"input_size": int(size), "mean": tuple(cfg.mean), "std": tuple(cfg.std),
                "interpolation": cfg.interpolation}
    if name == "open_clip" and arch:
        open_clip = optional_import("open_clip", "model.name=open_clip")
        arch = _open_clip_arch(open_clip, arch)
        model_cfg = open_clip.get_model_config(arch) or {}
        pre = open_clip.get_pretrained_cfg(arch, params.get("tag") or "") or {}
        size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
        return {"input_size": int(size[0] if isinstance(size, (tuple, list)) else size),
                "mean": tuple(pre.get("mean", open_clip.OPENAI_DATASET_MEAN)),
                "std": tuple(pre.get("std", open_clip.OPENAI_DATASET_STD)),
                "interpolation": pre.get("interpolation", "bicubic")}
    return None
