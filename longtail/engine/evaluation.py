"""The one evaluation of longtail: a split through a model, loader -> predict -> metrics.

The trainer (every epoch and at the end of both stages), stage 2 (its cached features and its final
scores), ``longtail eval`` (and ``--shifts``), ``longtail calibrate`` and ``longtail predict`` all call
:func:`evaluate`; what they differ in are its options (a calibrator, a logit transform such as a prior
correction, features kept, metrics or only the outputs). How a run is evaluated (loader settings,
normalisation, precision, test-time ensembling) is an :class:`EvalSettings` built from the config by
``builders.eval_settings``, so nothing here reads a config.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import torch
from torch import nn

from longtail.data.datasets import DataBundle, ImageSet
from longtail.data.loaders import DecodeSetting, EvalLoader
from longtail.engine.distributed import DistInfo
from longtail.engine.predict import predict
from longtail.metrics import compute_metrics
from longtail.models.tta import TestTimeEnsemble

__all__ = ["EvalSettings", "Evaluation", "LogitCalibrator", "evaluate", "final_scores"]


class LogitCalibrator(Protocol):
    """What evaluation needs of a fitted calibrator (any ``Calibrator`` of the calibration package)."""

    def transform(self, logits: torch.Tensor) -> torch.Tensor: ...

    def predict_proba(self, logits: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class EvalSettings:
    """How a run's model is scored: ``normalize`` (the run's evaluation view of uint8 images), the loader's
    ``batch_size``, ``num_workers`` and ``decode_on_device``, the autocast dtype (None: float32) and the
    test-time ensembling (``eval.tta``, ``eval.tta_resize``)."""

    normalize: Callable[[torch.Tensor], torch.Tensor]
    batch_size: int
    num_workers: int = 0
    decode_on_device: DecodeSetting = "auto"
    amp_dtype: torch.dtype | None = None
    tta: str = "none"
    tta_resize: float = 248 / 224

    def loader(self, imageset: ImageSet, dist_info: DistInfo) -> EvalLoader:
        """This rank's shard (``rank::world_size``, padded) of an evaluation split."""
        return EvalLoader(imageset, self.batch_size, self.normalize, dist_info.device, rank=dist_info.rank,
                          world_size=dist_info.world_size, num_workers=self.num_workers,
                          decode_on_device=self.decode_on_device)

    def view(self, model: nn.Module) -> nn.Module:
        """``model`` as evaluation scores it: wrapped in test-time ensembling when ``tta`` asks."""
        if self.tta == "none":
            return model
        # the wrapper starts in the model's mode, so predict() restores the model to the mode it found it in
        return TestTimeEnsemble(model, self.tta, self.tta_resize).train(model.training)


@dataclass
class Evaluation:
    """``metrics`` (``longtail.metrics.compute_metrics``; None when not asked) and ``outputs``: float32
    CPU tensors ``logits`` (N, C) — after the calibrator and the logit transform when given —,
    ``targets`` (N,), and when present ``expert_logits`` (M, N, C), ``features`` (N, D),
    ``expert_features`` (M, N, D), ``raw_logits`` (the model's own, when a calibrator or transform
    changed them) and ``probabilities`` (N, C; asked with ``probabilities=True``: the calibrator's
    ``predict_proba``, else the softmax)."""

    metrics: dict[str, Any] | None
    outputs: dict[str, torch.Tensor]


def evaluate(model: nn.Module, imageset: ImageSet, settings: EvalSettings, dist_info: DistInfo,
             train_counts: Sequence[int] | None = None, *, calibrator: LogitCalibrator | None = None,
             logit_transform: Callable[[torch.Tensor], torch.Tensor] | None = None, keep_features: bool = False,
             expert_features: bool = False, probabilities: bool = False, test_time_augment: bool = True,
             metrics: bool = True) -> Evaluation:
    """Score ``model`` on ``imageset`` (every rank gets every row): the loader of ``settings``, the
    model's predictions (``test_time_augment``: through ``settings.view``), then ``calibrator.transform``
    and ``logit_transform`` (e.g. a prior correction) on the logits, then the metrics against the
    training class counts ``train_counts`` (``metrics=False``: the outputs only)."""
    loader = settings.loader(imageset, dist_info)
    scored = settings.view(model) if test_time_augment else model
    outputs = predict(scored, loader, dist_info, len(imageset), settings.amp_dtype, keep_features,
                      expert_features=expert_features)
    logits = outputs["logits"]
    if probabilities:
        outputs["probabilities"] = calibrator.predict_proba(logits) if calibrator is not None else logits.softmax(1)
    if calibrator is not None or logit_transform is not None:
        outputs["raw_logits"] = logits
        if calibrator is not None:
            logits = calibrator.transform(logits)
        if logit_transform is not None:
            logits = logit_transform(logits)
        outputs["logits"] = logits
    scores = None
    if metrics:
        if train_counts is None:
            raise ValueError("evaluate(metrics=True) needs the training class counts (the shot groups)")
        scores = compute_metrics(outputs["logits"], outputs["targets"], train_counts, outputs.get("expert_logits"))
    return Evaluation(scores, outputs)


def final_scores(model: nn.Module, bundle: DataBundle, settings: EvalSettings, dist_info: DistInfo, epoch: int,
                 test_time_augment: bool = True) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """What a finished stage reports under ``"last"`` in its metrics.json — ``{"epoch": epoch, "test":
    metrics, "val": metrics}`` (``val`` when the run has a validation split) — and the test outputs (for
    the plots). Stage 1 (``Trainer.finish``) and stage 2 (``run_stage2``) both write it."""
    test = evaluate(model, bundle.test, settings, dist_info, bundle.train_counts, test_time_augment=test_time_augment)
    scores: dict[str, Any] = {"epoch": epoch, "test": test.metrics}
    if bundle.val is not None:
        scores["val"] = evaluate(model, bundle.val, settings, dist_info, bundle.train_counts,
                                 test_time_augment=test_time_augment).metrics
    return scores, test.outputs
