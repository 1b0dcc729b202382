"""Why balanced softmax + IKL lands far below its paper on the full CIFAR-100-LT schedule: what ICL's soft
labels hold, and whether the trained model's error is only a prior shift.

    python benchmarks/ikl_diagnosis.py RUN [RUN ...] [--json benchmarks/results/ikl_diagnosis_cifar100_lt_if100.json]

For every run (its last checkpoint):
- **prior shift**: test top-1 and many/medium/few of ``logits - t * log(train prior)`` for t in 0, 0.5, 1,
  1.5, 2 (post-hoc logit adjustment, Menon et al. 2021). A diagnostic, not a selection: every t is
  printed and none is reported as the run's number. A model whose only fault is a learnt training prior
  recovers at t = 1; a model whose logits were squeezed (heavy label smoothing) does not.
- **ICL's soft labels** (IKL runs): the saved last-epoch rows of eq. 7 of "IKL: Boosting Long-Tail
  Recognition with Implicit Knowledge Learning" (anonymous, 2023) as longtail normalises them, recomputed
  from the class medians of the training images (eq. 6, evaluation view), and — for comparison, not in the paper — from medians centred on the mean feature. For each: the mean target
  mass, the share of the off-target mass that lands on the four classes of the same CIFAR-100 superclass
  (4/99 = 4.0 % if spread evenly) and the entropy of the off-target part (uniform: ln 99 = 4.60 nats).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from longtail.functional import (ikl_class_medians, ikl_correlation_labels, logit_adjusted_logits,  # noqa: E402
                                 shot_groups)
from longtail.metrics import shift_scores  # noqa: E402
from longtail.runs import load_run  # noqa: E402

from benchmarks.diagnosis_cli import run_diagnosis  # noqa: E402

PRIOR_STRENGTHS = (0.0, 0.5, 1.0, 1.5, 2.0)
# CIFAR-100's 20 superclasses (Krizhevsky 2009), by fine-class folder name
SUPERCLASSES = {
    "aquatic_mammals": "beaver dolphin otter seal whale",
    "fish": "aquarium_fish flatfish ray shark trout",
    "flowers": "orchid poppy rose sunflower tulip",
    "food_containers": "bottle bowl can cup plate",
    "fruit_and_vegetables": "apple mushroom orange pear sweet_pepper",
    "household_electrical_devices": "clock keyboard lamp telephone television",
    "household_furniture": "bed chair couch table wardrobe",
    "insects": "bee beetle butterfly caterpillar cockroach",
    "large_carnivores": "bear leopard lion tiger wolf",
    "large_man-made_outdoor_things": "bridge castle house road skyscraper",
    "large_natural_outdoor_scenes": "cloud forest mountain plain sea",
    "large_omnivores_and_herbivores": "camel cattle chimpanzee elephant kangaroo",
    "medium_mammals": "fox porcupine possum raccoon skunk",
    "non-insect_invertebrates": "crab lobster snail spider worm",
    "people": "baby boy girl man woman",
    "reptiles": "crocodile dinosaur lizard snake turtle",
    "small_mammals": "hamster mouse rabbit shrew squirrel",
    "trees": "maple_tree oak_tree palm_tree pine_tree willow_tree",
    "vehicles_1": "bicycle bus motorcycle pickup_truck train",
    "vehicles_2": "lawn_mower rocket streetcar tank tractor",
}


def same_superclass(class_names: list[str]) -> torch.Tensor | None:
    """(C, C) bool: two different classes of one CIFAR-100 superclass; None for another class list."""
    superclass = {fine: coarse for coarse, fines in SUPERCLASSES.items() for fine in fines.split()}
    if sorted(class_names) != sorted(superclass):
        return None
    index = torch.tensor([list(SUPERCLASSES).index(superclass[name]) for name in class_names])
    return (index[:, None] == index[None, :]) & ~torch.eye(len(class_names), dtype=torch.bool)


def label_structure(labels: torch.Tensor, same: torch.Tensor | None) -> dict[str, float]:
    """Target mass, same-superclass share of the off-target mass, off-target entropy (nats)."""
    off = labels.clone().fill_diagonal_(0)
    spread = off / off.sum(1, keepdim=True)
    row = {"target_mass": labels.diagonal().mean().item(),
           "off_target_entropy_nats": -(spread * spread.clamp_min(1e-12).log()).sum(1).mean().item(),
           "uniform_entropy_nats": math.log(labels.shape[0] - 1)}
    if same is not None:
        row["same_superclass_share"] = (spread * same).sum(1).mean().item()
        row["same_superclass_share_if_uniform"] = same.sum(1).float().mean().item() / (labels.shape[0] - 1)
    return row


def prior_shift(logits: torch.Tensor, targets: torch.Tensor, train_counts: list[int]) -> dict[str, dict]:
    """Test top-1 and shot-group top-1 (%) of ``logits - t * log(train prior)`` for each t."""
    groups = {group: classes for group, classes in shot_groups(train_counts).items() if classes}
    rows = {}
    for strength in PRIOR_STRENGTHS:
        scores = shift_scores(logit_adjusted_logits(logits, train_counts, -strength), targets, groups)
        rows[f"{strength:g}"] = {"top1": round(100 * scores["top1"], 2),
                                 **{group: round(100 * scores[f"{group}_top1"], 2) for group in groups}}
    return rows


def diagnose(run_path: Path) -> dict:
    run = load_run(run_path)
    test = run.evaluate(run.bundle.test, metrics=False)
    logits, targets = test.outputs["logits"].float(), test.outputs["targets"]
    result = {"run": str(run_path), "loss": run.config.loss.name,
              "prior_shift_test_top1": prior_shift(logits, targets, run.bundle.train_counts)}
    saved = run.state.get("loss", {}).get("soft_labels")
    if saved is None:
        return result
    names = list(run.bundle.test.class_names)
    same = same_superclass(names)
    train = run.evaluate(run.bundle.train, keep_features=True, metrics=False, test_time_augment=False)
    features, train_targets = train.outputs["features"].float(), train.outputs["targets"]
    centres = ikl_class_medians(features, train_targets, len(names))
    unit = F.normalize(centres, dim=1)
    cosine = (unit @ unit.T)[~torch.eye(len(names), dtype=torch.bool)]
    result["median_cosine_off_diagonal"] = {"mean": cosine.mean().item(), "min": cosine.min().item(),
                                            "max": cosine.max().item()}
    result["soft_labels"] = {
        "saved (last epoch, training view)": label_structure(saved.float(), same),
        "recomputed (evaluation view)": label_structure(ikl_correlation_labels(centres), same),
        "centred medians (not in the paper)": label_structure(ikl_correlation_labels(centres - features.mean(0)), same),
    }
    return result


def main() -> None:
    run_diagnosis("ikl_diagnosis.py", __doc__, diagnose)


if __name__ == "__main__":
    main()
