"""What of a pretrained backbone trains: ``model.finetune`` and its ``model.finetune_params``.

- ``full``: everything (``layer_decay``: block i of L trains at lr x decay^(L - i), the embeddings at
  decay^(L + 1), the final norm and head at lr);  ``linear``: only the head (``cache_features``: auto, true,
  false: train it on one pass's cached features, ``longtail/engine/cached_features.py``);  ``partial``: the last ``blocks`` transformer
  blocks and the norm after them;  ``bitfit``: the backbone's biases;
- ``lora``: low-rank updates of ``target_modules`` through ``peft`` (merged into the weights for export);
- ``adaptformer``: a bottleneck adapter beside every block's MLP (Chen et al. 2022; LIFT's choice);
- ``vpt``: ``length`` learnable prompt tokens appended to every block's input (``deep``) or the first's;
- ``ssf``: a learnable per-channel scale and shift after every linear layer and LayerNorm of the blocks.

The head always trains. Frozen parameters get ``requires_grad=False``, so the optimiser (which takes
only trainable ones) holds no state for them and no gradient is computed for them. AdaptFormer, VPT
and SSF are a few lines each on the blocks of a timm or open_clip ViT, so they are written here; LoRA
is peft's. The adapters are LIFT's (shijxcs/LIFT ``models/peft_modules.py``): AdaptFormer
``LayerNorm -> down -> ReLU -> up``, up-projection zero so training starts from the pretrained
function, a learnable scalar scale starting at 1, fed with the block's input before its second norm;
VPT's uniform init with bound sqrt(6 / (3 patch^2 + dim)); SSF scale ~ N(1, 0.02), shift ~ N(0, 0.02).
"""
from __future__ import annotations

import copy
import math
import warnings
from functools import reduce
from operator import mul
from typing import Any

import torch
from torch import nn

from longtail.registry import ConfigError

__all__ = ["FINETUNE_MODES", "apply_finetune", "layerwise_groups", "parameter_counts", "merged_for_export", "lift_bottleneck",
           "AdaptFormer", "ParallelAdapterMLP", "PromptedBlock", "SSF"]

# every mode with its parameters and their defaults (None: worked out from the model)
FINETUNE_MODES: dict[str, dict[str, Any]] = {
    "full": {"layer_decay": None},
    "linear": {"cache_features": "auto"},  # engine/cached_features.py
    "partial": {"blocks": 1},
    "bitfit": {},
    "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": None},
    "adaptformer": {"bottleneck": None, "scale": "learnable"},
    "vpt": {"length": 10, "deep": True},
    "ssf": {},
}
NEEDS_BLOCKS = ("partial", "adaptformer", "vpt", "ssf")


def lift_bottleneck(num_classes: int, num_blocks: int) -> int:
    """LIFT's default adapter width: the power of two at or below C / (2 L), at least 1 (CIFAR-100 on
    a 12-block ViT: 4; ImageNet-LT: 32; Places-LT: 8; iNaturalist 2018: 256)."""
    return 2 ** max(0, int(math.log2(num_classes / (num_blocks * 2))))


class AdaptFormer(nn.Module):
    """LIFT's AdaptFormer adapter: ``scale * up(relu(down(LayerNorm(x))))``."""

    def __init__(self, dim: int, bottleneck: int, scale: float | None = None) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        nn.init.kaiming_normal_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.weight)  # the adapted model starts as the pretrained one
        nn.init.zeros_(self.up_proj.bias)
        if scale is None:
            self.scale = nn.Parameter(torch.ones(1))
        else:
            self.register_buffer("scale", torch.full((1,), float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(torch.relu(self.down_proj(self.ln(x)))) * self.scale


class ParallelAdapterMLP(nn.Module):
    """A block's ``norm -> mlp`` with an adapter beside it that sees the block's un-normalised input:
    the block keeps adding ``mlp(x)`` to its residual, which is now ``mlp(norm(x)) + adapter(x)``."""

    def __init__(self, norm: nn.Module, mlp: nn.Module, adapter: nn.Module) -> None:
        super().__init__()
        self.norm, self.mlp, self.adapter = norm, mlp, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.norm(x)) + self.adapter(x)


class PromptedBlock(nn.Module):
    """A transformer block whose input gets ``length`` learnable tokens appended (after the class
    token and patches, so token pooling still reads position 0); ``replaces`` prompt tokens appended
    by the block before it are dropped first (deep VPT: each block has its own prompts)."""

    def __init__(self, block: nn.Module, length: int, dim: int, bound: float, replaces: int) -> None:
        super().__init__()
        self.block, self.replaces = block, replaces
        self.prompt = nn.Parameter(torch.empty(length, dim).uniform_(-bound, bound))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.replaces:
            x = x[:, :-self.replaces]
        x = torch.cat([x, self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        return self.block(x, *args, **kwargs)


class SSF(nn.Module):
    """Scale and shift of the last dimension (Lian et al. 2022)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim).normal_(1.0, 0.02))
        self.shift = nn.Parameter(torch.empty(dim).normal_(0.0, 0.02))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _apply_ssf(module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
    return module.ssf(output)


def _settings(mode: str, params: dict[str, Any]) -> dict[str, Any]:
    if mode not in FINETUNE_MODES:
        raise ConfigError(f"model.finetune={mode!r}; allowed: {', '.join(FINETUNE_MODES)}")
    allowed = FINETUNE_MODES[mode]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"model.finetune_params {', '.join(unknown)} do not apply to finetune={mode}; "
                          f"allowed: {', '.join(allowed) or '(none)'}")
    return {**allowed, **params}


def _blocks(model: nn.Module, mode: str) -> nn.Module:
    blocks = getattr(model.backbone, "blocks", [])
    if not blocks:
        raise ConfigError(f"model.finetune={mode} acts on a ViT's transformer blocks, and this backbone has none; "
                          "use full, linear, bitfit or lora (with finetune_params.target_modules)")
    return blocks[0]


def _norm_and_mlp(block: nn.Module) -> tuple[str, nn.Module]:
    for name in ("norm2", "ln_2"):  # timm's Block, open_clip's ResidualAttentionBlock
        if isinstance(getattr(block, name, None), nn.Module) and isinstance(getattr(block, "mlp", None), nn.Module):
            return name, getattr(block, name)
    raise ConfigError(f"model.finetune=adaptformer needs blocks with a norm2/ln_2 and an mlp; "
                      f"{type(block).__name__} has neither")


def _first_conv(module: nn.Module) -> nn.Conv2d:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d))


def _token_pooled(net: nn.Module) -> bool:
    pool = getattr(net, "global_pool", getattr(net, "pool_type", "token"))
    return pool in ("token", "tok")


def apply_finetune(model: nn.Module, mode: str, params: dict[str, Any], num_classes: int) -> None:
    """Freeze ``model``'s backbone (a ``FoundationBackbone``) but what ``mode`` trains, adding the
    mode's modules; the heads stay trainable."""
    settings = _settings(mode, params)
    if mode == "full":
        decay = settings["layer_decay"]
        if decay is not None and not 0 < decay <= 1:
            raise ConfigError(f"model.finetune_params.layer_decay must be in (0, 1], got {decay}")
        if decay is not None:
            _blocks(model, "full with layer_decay")
        model.layer_decay = decay
        return
    backbone = model.backbone
    backbone.requires_grad_(False)
    if mode == "linear":
        backbone.frozen = True
        backbone.eval()
    blocks = _blocks(model, mode) if mode in NEEDS_BLOCKS else None
    if mode == "partial":
        count = int(settings["blocks"])
        if not 0 < count <= len(blocks):
            raise ConfigError(f"model.finetune_params.blocks={count}: the backbone has {len(blocks)} blocks; "
                              f"give 1 to {len(blocks)}")
        for block in list(blocks)[-count:]:
            block.requires_grad_(True)
        for norm in backbone.final_norm:
            norm.requires_grad_(True)
    elif mode == "bitfit":
        for name, param in backbone.named_parameters():
            if name.endswith("bias"):
                param.requires_grad_(True)
    elif mode == "lora":
        _add_lora(backbone, settings)
    elif mode == "adaptformer":
        width = settings["bottleneck"] or lift_bottleneck(num_classes, len(blocks))
        scale = settings["scale"]
        if scale != "learnable" and not isinstance(scale, (int, float)):
            raise ConfigError(f"model.finetune_params.scale must be 'learnable' or a number, got {scale!r}")
        for block in blocks:
            norm_name, norm = _norm_and_mlp(block)
            adapter = AdaptFormer(backbone.feature_dim, int(width), None if scale == "learnable" else float(scale))
            block.mlp = ParallelAdapterMLP(norm, block.mlp, adapter)
            setattr(block, norm_name, nn.Identity())
    elif mode == "vpt":
        if not _token_pooled(backbone.net):
            raise ConfigError("model.finetune=vpt needs a ViT pooled on its class token (global_pool='token'); "
                              "prompt tokens would enter an average pool")
        length, dim = int(settings["length"]), backbone.feature_dim
        bound = math.sqrt(6.0 / float(3 * reduce(mul, _first_conv(backbone.net).kernel_size, 1) + dim))
        replaces = 0
        for index in range(len(blocks) if settings["deep"] else 1):
            blocks[index] = PromptedBlock(blocks[index], length, dim, bound, replaces)
            replaces = length
    elif mode == "ssf":
        for block in blocks:
            attention = [m for m in block.modules() if isinstance(m, nn.MultiheadAttention)]
            inside = {id(m) for a in attention for m in a.modules()}  # called functionally, never as modules
            for layer in [m for m in block.modules() if isinstance(m, (nn.Linear, nn.LayerNorm))]:
                if id(layer) in inside:
                    continue
                layer.ssf = SSF(layer.weight.shape[0])
                layer.register_forward_hook(_apply_ssf)


def _add_lora(backbone: nn.Module, settings: dict[str, Any]) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("model.finetune=lora needs the peft package, which is not installed: "
                          "pip install 'longtail[foundation]'") from None
    targets = settings["target_modules"]
    if targets is None:
        blocks = getattr(backbone, "blocks", [])
        block = blocks[0][0] if blocks else None
        attention = getattr(block, "attn", None)
        if isinstance(attention, nn.MultiheadAttention):
            targets = ["attn"]  # open_clip: peft adapts the fused in-projection and the out-projection
        elif isinstance(getattr(attention, "qkv", None), nn.Linear):
            targets = ["qkv"]  # timm ViT: the fused query/key/value projection
        else:
            raise ConfigError("model.finetune=lora: give model.finetune_params.target_modules (names of the "
                              "linear or conv layers to adapt) for this backbone")
    config = LoraConfig(r=int(settings["r"]), lora_alpha=settings["alpha"], lora_dropout=settings["dropout"],
                        target_modules=list(targets))
    try:
        inject_adapter_in_model(config, backbone.net)
    except ValueError as error:
        raise ConfigError(f"model.finetune=lora: {error}") from None
    for name, param in backbone.named_parameters():
        param.requires_grad_("lora_" in name)


def layerwise_groups(model: nn.Module, lr: float) -> list[dict[str, Any]]:
    """Optimiser parameter groups of a model fine-tuned with ``layer_decay`` (BEiT/MAE's layer-wise lr
    decay): embeddings and everything before the first block at lr x d^(L+1), block i (0-based) at
    lr x d^(L-i), the final norm and the head at lr. Frozen parameters are left out."""
    decay, blocks = model.layer_decay, model.backbone.blocks[0]
    depth = {id(p): index + 1 for index, block in enumerate(blocks) for p in block.parameters()}
    top = len(blocks) + 1
    for module in [*model.backbone.final_norm, model.heads]:
        depth.update({id(p): top for p in module.parameters()})
    groups: dict[int, list[nn.Parameter]] = {}
    for param in model.parameters():
        if param.requires_grad:
            groups.setdefault(depth.get(id(param), 0), []).append(param)
    return [{"params": params, "lr": lr * decay ** (top - level)} for level, params in sorted(groups.items())]


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (each parameter once)."""
    params = {id(p): p for p in model.parameters()}.values()
    return {"trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params)}


@torch.no_grad()
def merged_for_export(model: nn.Module) -> nn.Module:
    """``model`` with every LoRA update merged into its layer's weights and the peft wrappers removed
    (a plain network, equal to the trained one up to rounding); the model itself unless it has LoRA."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return model
    if not any(isinstance(m, LoraLayer) for m in model.modules()):
        return model
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                with warnings.catch_warnings():  # peft warns when a nested layer was merged with its parent
                    warnings.simplefilter("ignore", UserWarning)
                    child.merge()
                setattr(parent, name, child.get_base_layer())
    return model
