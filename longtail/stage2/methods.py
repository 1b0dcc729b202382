"""Stage-2 methods (registered in ``longtail.registry.STAGE2``): what to do with the classifier(s)
of a model whose backbone stage 1 trained and stage 2 keeps frozen.

- ``crt``: re-initialise every head and retrain it (Kang et al. 2020);
- ``lws``: learn one scale per class on top of each frozen head (Kang et al. 2020);
- ``tau_norm``: post-hoc ``w_c / ||w_c||^tau``, tau grid-searched on the validation split when there
  is one (Kang et al. 2020);
- ``ncm``: nearest class mean of centred, L2-normalised features (Kang et al. 2020);
- ``mislas``: label-aware smoothing, shift learning on BN and the enhanced classifier
  ``z = diag(s)(rW + dW)^T x`` (Zhong et al., CVPR 2021), on backbone passes over augmented images;
- ``ladc``: LADC's calibrated tail features and LWS-Plus (Wang et al., AAAI 2022), on cached features.

A method's constructor takes its ``stage2.params``; ``run(ctx)`` replaces ``ctx.model.heads``, trains
them with ``ctx.train`` (the engine's Trainer) and returns what metrics.json should record about it.
Sampling (``stage2.sampler``), the loss (``stage2.loss``, else the method's own), the optimizer,
schedule and feature mode (``stage2.features``, see ``longtail.stage2.training``) come from the config.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import nn

from longtail.engine.logging import LOG
from longtail.functional import label_aware_epsilons, ladc_head_classes, smoothed_targets, soft_target_cross_entropy
from longtail.losses.basic import CrossEntropy
from longtail.metrics import per_class_accuracy
from longtail.models.heads import LWSHead, TauNormHead, fresh_like
from longtail.registry import STAGE2
from longtail.stage2.heads import NCM_NORMS, LWSPlusHead, NCMHead
from longtail.stage2.ladc import TailGaussians, choose_covariance, log_choice, memory_budget
from longtail.stage2.training import Stage2Context
from longtail.types import Batch, ModelOutput

__all__ = ["Stage2Method", "CRT", "LWS", "TauNorm", "NCM", "LabelAwareSmoothingLoss", "MiSLAS", "LADC",
           "DEFAULT_TAU_GRID"]

DEFAULT_TAU_GRID = [round(0.1 * i, 1) for i in range(21)]  # 0.0, 0.1, ..., 2.0


class Stage2Method:
    """Base of the registered methods. ``post_hoc`` methods do not train (stage2.epochs is unused);
    ``feature_modes`` are the ``stage2.features`` modes a method supports, its default first."""

    post_hoc = False
    feature_modes: tuple[str, ...] = ("images", "cached")

    def __init__(self) -> None:
        """No parameters (an explicit signature, so the registry rejects unknown stage2.params)."""

    def run(self, ctx: Stage2Context) -> dict[str, Any]:
        raise NotImplementedError


def _replace_heads(model: nn.Module, heads: Sequence[nn.Module]) -> list[nn.Parameter]:
    for i, head in enumerate(heads):
        model.heads[i] = head
    return [p for head in heads for p in head.parameters() if p.requires_grad]


def _fine_tuned(head: nn.Module) -> nn.Module:
    """The stage-1 head itself, trained further (cRT with ``reinit: false``)."""
    return head.requires_grad_(True)


# The classifiers a method's ``head`` option can put in place of each stage-1 head (MiSLAS and LADC
# each allow a subset): a fresh head (cRT), learnt per-class scales on the frozen head (LWS), scales
# and biases (LADC's LWS-Plus), or scales with the stage-1 head fine-tuned (MiSLAS's "enhanced").
STAGE2_HEADS: dict[str, Callable[[nn.Module], nn.Module]] = {
    "crt": fresh_like,
    "fine_tuned": _fine_tuned,
    "lws": LWSHead,
    "lws_plus": LWSPlusHead,
    "enhanced": partial(LWSHead, train_base=True),
}


def _check_head(method: str, head: str, allowed: Sequence[str]) -> None:
    if head not in allowed:
        raise ValueError(f"unknown {method} head {head!r}; allowed: {', '.join(allowed)}")


def _stage2_heads(model: nn.Module, head: str, base_lr_factor: float = 1.0) -> list[tuple[list[nn.Parameter], float]]:
    """Replace each of ``model.heads`` by ``STAGE2_HEADS[head]`` of it; the optimiser's parameter
    groups ``(parameters, lr factor)``: the new heads' own parameters at lr, and the wrapped stage-1
    heads' weights, where they are trained (``enhanced``), at ``base_lr_factor`` x lr."""
    heads = [STAGE2_HEADS[head](old) for old in model.heads]
    params = _replace_heads(model, heads)
    bases = [p for h in heads if isinstance(getattr(h, "base", None), nn.Module)
             for p in h.base.parameters() if p.requires_grad]
    if not bases:
        return [(params, 1.0)]
    trained = {id(p) for p in bases}
    return [([p for p in params if id(p) not in trained], 1.0), (bases, base_lr_factor)]


def _ce(ctx: Stage2Context) -> nn.Module:
    return ctx.loss(CrossEntropy(ctx.counts, ctx.num_classes))


class _NewHeads(Stage2Method):
    """Kang et al.'s decoupled classifiers: ``head`` (STAGE2_HEADS) in place of each stage-1 head,
    trained with the stage-2 sampler (class-balanced by default) and CE (or ``stage2.loss``).

    ``bn_shift`` (``stage2.features: images`` only): the frozen backbone's BatchNorm running statistics
    follow the stage-2 batches (true, the default: Kang et al.'s code puts every network in train mode,
    facebookresearch/classifier-balancing ``run_networks.py``), or the backbone runs in eval mode
    (false: how MiSLAS's code trains a stage 2 without its shift learning on BN, ``train_stage2.py``
    with ``shift_bn: False``, the reading of the cRT / LWS rows in Zhong et al.'s tables)."""

    head = ""

    def __init__(self, bn_shift: bool = True) -> None:
        self.bn_shift = bn_shift

    def run(self, ctx: Stage2Context) -> dict[str, Any]:
        return {"history": ctx.train(_stage2_heads(ctx.model, self.head), _ce(ctx), bn_train=self.bn_shift)}


@STAGE2.register("crt")
class CRT(_NewHeads):
    """Classifier re-training: fresh heads of the same kind (Kang et al., ICLR 2020). ``reinit: false``
    trains the stage-1 heads further instead of fresh ones — what MiSLAS's stage-2 code does to its
    classifier (``train_stage2.py`` loads it from the stage-1 checkpoint), a candidate reading of the
    cRT rows in Zhong et al.'s tables, whose code is not public."""

    def __init__(self, bn_shift: bool = True, reinit: bool = True) -> None:
        super().__init__(bn_shift)
        self.head = "crt" if reinit else "fine_tuned"


@STAGE2.register("lws")
class LWS(_NewHeads):
    """Learnable weight scaling: the stage-1 heads stay fixed, one scale per class is learnt (Kang et al.)."""

    head = "lws"


@STAGE2.register("tau_norm")
class TauNorm(Stage2Method):
    """tau-normalised classifier, no training. With a validation split, tau is the value of
    ``tau_grid`` with the best class-balanced validation accuracy (mean per-class top-1; the first
    on ties); without one (or with ``tau_grid: null``), ``tau`` is used as given.

    Class-balanced, not plain top-1: a split of the long-tailed training data is itself long-tailed,
    and its plain top-1 rewards the head bias tau-norm removes (CIFAR-10-LT IF=100, short CPU schedule:
    plain top-1 picked tau=0.5, test ECE 16.3 %; class-balanced picked 1.2, ECE 4.8 %; see
    benchmarks/RESULTS.md). On a balanced validation split (Kang et al.'s setting) the two agree."""

    post_hoc = True
    feature_modes = ("cached",)

    def __init__(self, tau: float = 1.0, tau_grid: list[float] | None = None) -> None:
        self.tau = tau
        self.tau_grid = list(DEFAULT_TAU_GRID if tau_grid is None else tau_grid)

    @torch.no_grad()
    def run(self, ctx: Stage2Context) -> dict[str, Any]:
        bases = list(ctx.model.heads)
        tau, search = self.tau, {}
        if ctx.bundle.val is not None and self.tau_grid:
            val = ctx.features("val")
            for candidate in self.tau_grid:
                _replace_heads(ctx.model, [TauNormHead(base, candidate) for base in bases])
                logits, _ = ctx.model.logits_from_features(val.features)
                per_class = per_class_accuracy(logits.argmax(1), val.targets, logits.shape[1])
                search[candidate] = float(per_class.nanmean())
            tau = max(search, key=search.__getitem__)
            LOG.info(f"tau_norm: tau={tau} (class-balanced validation top-1 {100 * search[tau]:.2f}%)")
        else:
            LOG.info(f"tau_norm: no validation split, tau={tau} as given (set data.val_fraction to search it)")
        _replace_heads(ctx.model, [TauNormHead(base, tau) for base in bases])
        return {"tau": tau, "val_balanced_top1_by_tau": {str(k): v for k, v in search.items()}}


@STAGE2.register("ncm")
class NCM(Stage2Method):
    """Nearest class mean on cached features, one classifier per expert; ``norm``: ``cl2n`` (centre on
    the training mean, then L2-normalise: Kang et al.'s code) or ``l2`` (L2 only)."""

    post_hoc = True
    feature_modes = ("cached",)

    def __init__(self, norm: str = "cl2n") -> None:
        if norm not in NCM_NORMS:
            raise ValueError(f"stage2.params.norm must be one of {NCM_NORMS}, got {norm!r}")
        self.norm = norm

    def run(self, ctx: Stage2Context) -> dict[str, Any]:
        train = ctx.features("train")
        heads = [NCMHead.fit(features, train.targets, ctx.num_classes, self.norm) for features in train.features]
        _replace_heads(ctx.model, heads)
        return {"norm": self.norm}


class LabelAwareSmoothingLoss(nn.Module):
    """Per-sample CE against MiSLAS's label-aware smoothed targets (``label_aware_smoothing``); the
    per-class epsilons are a buffer, so a step needs no host-to-device copy."""

    def __init__(self, class_counts: Sequence[int], eps_head: float = 0.4, eps_tail: float = 0.1,
                 shape: str = "concave", spread: str = "all") -> None:
        super().__init__()
        if spread not in ("all", "others"):
            raise ValueError(f"unknown spread {spread!r}; allowed: all (MiSLAS's code), others (the paper's formula)")
        self.spread = spread
        self.register_buffer("epsilons", label_aware_epsilons(class_counts, eps_head, eps_tail, shape))

    def forward(self, output: ModelOutput, targets: torch.Tensor, batch: Batch | None = None) -> torch.Tensor:
        return soft_target_cross_entropy(output.logits, smoothed_targets(targets, self.epsilons, self.spread),
                                         reduction="none")


MISLAS_HEADS = ("enhanced", "lws", "crt")


@STAGE2.register("mislas")
class MiSLAS(Stage2Method):
    """MiSLAS's stage 2 (Zhong et al., CVPR 2021; its public code in docs/FIDELITY.md, MiSLAS rows).

    - loss: label-aware smoothing (``eps_head``, ``eps_tail``, ``shape``, ``spread``), unless
      ``stage2.loss`` names another;
    - ``bn_shift``: the backbone's BatchNorm layers run in train mode under no_grad, so their running
      mean/variance follow the class-balanced stage-2 batches while their affine weights stay frozen;
      the features are therefore recomputed from the augmented training images every step (no cache;
      with ``bn_shift: false`` the backbone runs in eval mode, as MiSLAS's CIFAR-10 configs);
    - ``head``: ``enhanced`` (the code's default) fine-tunes the stage-1 head at ``lr_factor`` x lr and
      learns per-class scales at lr, ``z = diag(s)(W + dW)^T x`` (the paper's ``diag(s)(rW + dW)^T x``
      with r = 1: the code starts dW at 0 and does not learn r); ``lws`` learns the scales only;
      ``crt`` retrains a fresh head at lr.
    """

    feature_modes = ("images",)

    def __init__(self, class_counts: Sequence[int], eps_head: float = 0.4, eps_tail: float = 0.1,
                 shape: str = "concave", spread: str = "all", bn_shift: bool = True, lr_factor: float = 0.2,
                 head: str = "enhanced") -> None:
        _check_head("mislas", head, MISLAS_HEADS)
        if lr_factor < 0:
            raise ValueError(f"lr_factor must be >= 0, got {lr_factor}")
        self.smoothing = LabelAwareSmoothingLoss(class_counts, eps_head, eps_tail, shape, spread)
        self.bn_shift, self.lr_factor, self.head = bn_shift, lr_factor, head

    def run(self, ctx: Stage2Context) -> dict[str, Any]:
        groups = _stage2_heads(ctx.model, self.head, self.lr_factor)
        return {"history": ctx.train(groups, ctx.loss(self.smoothing), bn_train=self.bn_shift)}


LADC_HEADS = ("lws_plus", "lws", "crt")


@STAGE2.register("ladc")
class LADC(Stage2Method):
    """LADC's stage 2 (Wang et al., AAAI 2022, "Label-Aware Distribution Calibration" and "Sampling strategy").

    Head classes are the most frequent ones covering ``coverage`` of the training images. On the
    cached features of each expert, each head class gets a Gaussian (eq. 1-3) and each tail instance
    the calibrated Gaussian of eq. 4-12 (``m`` nearest head classes, ``weighting``, ``alpha``,
    ``beta``). Training batches come from ``stage2.sampler`` (the ``ladc`` sampler with its ``tau``
    is eq. 13): a drawn head instance contributes its real feature, a drawn tail instance a fresh
    sample of its calibrated Gaussian. The head is LWS-Plus (eq. 14) by default, or LWS / cRT.

    ``covariance``: full, lowrank (``covariance_rank``), diagonal, or auto (the most exact that fits
    ``covariance_memory_gb``, default a quarter of the free memory); see longtail.stage2.ladc.
    The draws come from the trainer's per-epoch generator, so a resumed stage 2 draws the same.
    """

    feature_modes = ("cached",)

    def __init__(self, class_counts: Sequence[int], coverage: float = 0.6, m: int = 2,
                 alpha: float = 0.1, beta: float = 1.0, weighting: str = "inverse", head: str = "lws_plus",
                 covariance: str = "auto", covariance_rank: int = 64,
                 covariance_memory_gb: float | None = None) -> None:
        _check_head("ladc", head, LADC_HEADS)
        if covariance_rank < 1:
            raise ValueError(f"covariance_rank must be >= 1, got {covariance_rank}")
        self.head_classes = ladc_head_classes(class_counts, coverage)
        if len(self.head_classes) == len(class_counts):
            raise ValueError(f"coverage {coverage} makes every class a head class; LADC needs tail classes "
                             "(lower stage2.params.coverage)")
        if m > len(self.head_classes):
            raise ValueError(f"m={m} nearest head classes asked for, but only {len(self.head_classes)} classes are "
                             "head classes; lower stage2.params.m or raise coverage")
        self.class_counts = list(class_counts)
        self.m, self.alpha, self.beta, self.weighting, self.head = m, alpha, beta, weighting, head
        self.covariance, self.rank, self.memory_gb = covariance, covariance_rank, covariance_memory_gb

    def _banks(self, ctx: Stage2Context) -> tuple[list[TailGaussians], str]:
        train = ctx.features("train")
        experts, _, dim = train.features.shape
        budget = (int(self.memory_gb * 2**30) if self.memory_gb is not None else memory_budget(ctx.device))
        kind = choose_covariance(self.covariance, experts * len(self.head_classes), dim, self.rank, budget)
        log_choice(self.covariance, kind, len(self.head_classes), dim, experts, budget)
        banks = [TailGaussians(features, train.targets, self.class_counts, self.head_classes, kind, self.m,
                               self.alpha, self.beta, self.weighting, self.rank) for features in train.features]
        return banks, kind

    def run(self, ctx: Stage2Context) -> dict[str, Any]:
        banks, kind = self._banks(ctx)

        def calibrate(features: torch.Tensor, indices: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
            tail = banks[0].is_tail[indices]
            features = features.clone()
            for expert, bank in enumerate(banks):
                features[expert, tail] = bank.sample(indices[tail], generator)
            return features

        history = ctx.train(_stage2_heads(ctx.model, self.head), _ce(ctx), transform=calibrate)
        return {"history": history, "head_classes": len(self.head_classes), "covariance": kind}
