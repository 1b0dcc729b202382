"""BBN, the Bilateral-Branch Network with cumulative learning (Zhou et al., CVPR 2020,
Fig. 3; code Megvii-Nanjing/BBN).

A ResNet-32 whose stages 1-2 and all but the last block of stage 3 are shared; the last block is
duplicated into a conventional branch (fed by the uniform sampler) and a re-balancing branch (fed
by the reversed sampler). One linear classifier reads both branches' pooled features side by side,
so the two "heads" W_c, W_r are the halves of its weight, as in BBN's code.

How the trainer feeds it (``data.pair_sampler: reversed``; ``longtail.data.bbn.PairedLoader``):

- training: ``forward`` takes the uniform batch and the reversed batch concatenated along the batch
  axis, ``[x_uniform; x_reversed]`` (2B images). The shared stages run on both halves ("Batch
  norm" below); the conventional branch sees the first B, the re-balancing branch the last B. It returns B rows:
  ``logits = W [2 alpha f_c ; 2 (1 - alpha) f_r] + b = 2 (alpha W_c f_c + (1 - alpha) W_r f_r) + b``
  (BBN's ``mixed_feature = 2 * cat(l * feature_a, (1 - l) * feature_b)``). The paired loader sets
  the batch's ``targets`` to the uniform labels, ``mix_targets`` to the reversed ones and
  ``mix_weight`` to the same alpha (both follow ``bbn_alpha`` of the epoch), so the mixed loss is BBN's
  ``alpha * L(logits, y_uniform) + (1 - alpha) * L(logits, y_reversed)``.
- evaluation: one ordinary batch through both branches with an equal mix (alpha = 1/2), i.e.
  ``logits = W [f_c ; f_r] + b``; ``expert_logits`` (2, B, C) are the head on each branch alone
  (``W_c f_c + b``, ``W_r f_r + b``), so evaluation reports each branch's accuracy.
- ``on_epoch_start(epoch, total_epochs)`` sets alpha = ``bbn_alpha(epoch, total_epochs)``
  (longtail.functional), 1 - (epoch / total_epochs)^2.

Batch norm: BBN's code (megvii-research/BBN ``lib/core/combiner.py`` ``bbn_mix``) calls the network
twice per step, ``model(image_a, feature_cb=True)`` and ``model(image_b, feature_rb=True)``, so the
shared stages normalise the uniform and the reversed batch each with its own statistics and update
their running statistics twice per step (uniform first). ``shared_pass="separate"`` (the default)
does the same; ``shared_pass="joint"`` runs both halves through the shared stages in one call
(statistics over the 2B images, one running-statistics update per step; faster).
"""
from __future__ import annotations

import torch
from torch import nn

from longtail.functional import bbn_alpha, bbn_mixed_features
from longtail.models.cifar_resnet import BasicBlock, cifar_trunk, init_weights
from longtail.models.classifier import expert_head_logits, global_pool, parameters_outside, run_shared_stages
from longtail.models.heads import make_head
from longtail.registry import MODELS
from longtail.types import ModelOutput

__all__ = ["BBN", "bbn_resnet32", "SHARED_PASSES"]

SHARED_PASSES = ("separate", "joint")


class BBN(nn.Module):
    """Shared stem and stages, conventional and re-balancing branches, one head on both branches'
    features. See the module docstring for the paired training batch."""

    def __init__(self, stem: nn.Module, shared: list[nn.Module], conventional: nn.Module, rebalancing: nn.Module,
                 head: nn.Module, shared_pass: str = "separate") -> None:
        super().__init__()
        if shared_pass not in SHARED_PASSES:
            raise ValueError(f"unknown shared_pass {shared_pass!r}; allowed: separate (two calls, batch-norm "
                             "statistics per half, as BBN's code) or joint (one call over both halves)")
        self.shared_pass = shared_pass
        self.stem = stem
        self.shared = nn.ModuleList(shared)
        self.conventional = conventional
        self.rebalancing = rebalancing
        self.heads = nn.ModuleList([head])
        # a tensor, not a float, so a compiled forward does not recompile every epoch
        self.register_buffer("alpha", torch.tensor(1.0), persistent=False)

    def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
        self.alpha.fill_(bbn_alpha(epoch, total_epochs))

    def _shared(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return run_shared_stages(self.stem, self.shared, x)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        if self.training:
            if x.shape[0] % 2:
                raise ValueError(f"BBN trains on a uniform and a reversed batch concatenated, got an odd batch of "
                                 f"{x.shape[0]}; set data.pair_sampler: reversed")
            if self.shared_pass == "separate":  # two calls, as BBN's code: batch norm per half
                halves = [self._shared(half) for half in x.chunk(2)]
                uniform, reversed_ = halves[0][0], halves[1][0]
                maps = halves[0][1] + halves[1][1]  # the uniform pass's shared maps, then the reversed pass's
            else:
                h, maps = self._shared(x)
                uniform, reversed_ = h.chunk(2)
            weight: torch.Tensor | float = self.alpha
        else:
            h, maps = self._shared(x)
            uniform = reversed_ = h
            weight = 0.5
        conventional_map, rebalancing_map = self.conventional(uniform), self.rebalancing(reversed_)
        f_c, f_r = global_pool(conventional_map), global_pool(rebalancing_map)
        features = bbn_mixed_features(f_c, f_r, weight)
        logits = self.heads[0](features)
        zeros = torch.zeros_like(f_c)
        extras = {
            # the head on one branch's own features, the other half zeroed
            "conventional_logits": self.heads[0](torch.cat([f_c, zeros], dim=1)),
            "rebalancing_logits": self.heads[0](torch.cat([zeros, f_r], dim=1)),
        }
        branch_logits = None
        if not self.training:  # both branches saw the same images: report each branch's accuracy as an "expert"
            branch_logits = torch.stack([extras["conventional_logits"], extras["rebalancing_logits"]])
        return ModelOutput(logits=logits, features=features, expert_logits=branch_logits,
                           intermediate=maps + [conventional_map, rebalancing_map], extras=extras)

    def logits_from_features(self, expert_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, expert_logits (1, B, C)) from cached features (1, B, 2D), as ``forward``."""
        return expert_head_logits(self.heads, expert_features, "sum")

    def backbone_parameters(self) -> list[nn.Parameter]:
        return parameters_outside(self, self.heads)


@MODELS.register("bbn_resnet32")
def bbn_resnet32(num_classes: int, in_channels: int = 3, head: str = "linear", head_scale: float = 30.0,
                 shortcut: str = "A", pretrained_path: str | None = None, shared_pass: str = "separate") -> BBN:
    """BBN's CIFAR ResNet-32: stages 1-2 and four blocks of stage 3 shared, one 64-channel block per
    branch, a head on the 128-d pair of features. With ``pretrained_path`` (a plain ResNet-32 state
    dict) both branches start from its last block. ``shared_pass``: see the module docstring."""
    trunk = cifar_trunk(32, in_channels, shortcut, pretrained_path)
    last_stage = trunk.stages[-1]
    conventional = last_stage[-1]
    width = trunk.channels[-1]
    rebalancing = BasicBlock(width, width, 1, shortcut)
    rebalancing.apply(init_weights)
    if pretrained_path is not None:
        rebalancing.load_state_dict(conventional.state_dict())
    # The classifier keeps torch's own nn.Linear initialisation (uniform, bound 1/sqrt(128)): BBN's code builds
    # it in Network, outside the backbone whose _weights_init draws He-normal (std sqrt(2/128), 2.4x wider).
    head_module = make_head(head, 2 * width, num_classes, head_scale)
    return BBN(trunk.stem, [*trunk.stages[:-1], last_stage[:-1]], conventional, rebalancing, head_module,
               shared_pass)
