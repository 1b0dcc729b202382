"""Where a trained BBN's test accuracy comes from: each branch alone, the test-time mix of the two, and
how large each branch's share of the logits has grown.

    python benchmarks/bbn_diagnosis.py RUN [RUN ...] [--json benchmarks/results/bbn_diagnosis_cifar100_lt_if100.json]

BBN (Zhou et al., CVPR 2020) trains one linear classifier on ``2 [a f_c ; (1 - a) f_r]`` with the
cumulative a = 1 - (T / T_max)^2 falling from 1 to 0, and tests with the equal mix ``[f_c ; f_r]``
(a = 1/2; the authors' ``valid_model``). A branch that trained under a small weight has to produce large
logits to matter, and the equal mix at test time then lets it dominate. For every run (its last
checkpoint) this prints:

- **the test-time mix**: test top-1 and many/medium/few of ``W [2 a f_c ; 2 (1 - a) f_r] + b`` for a in
  0 (the re-balancing branch alone), 0.25, 0.5 (BBN's test), 0.75 and 1 (the conventional branch alone).
  A diagnostic on the test set, not a selection: every a is printed, and the run's number stays a = 1/2.
- **the mix it trained under**: the same at a = alpha of the checkpoint's last epoch, the weights the
  classifier saw in training. Before alpha reaches 1/2 (epoch 141 of 200), the equal test mix weighs the
  re-balancing branch more than training did; this says how much of a checkpoint's test top-1 that costs.
- **logit scale and offset per branch**: the mean standard deviation over classes of ``W_c f_c`` and
  ``W_r f_r`` per test image, the mean feature norms, the classifier's row norms per shot group for each
  half, and each branch's mean logit (and the bias) per shot group: the class offset each branch learnt.
- **precision**: test top-1 of the same checkpoint evaluated in bfloat16 (as trained on this CPU) and in
  float32 (``train.amp=none``).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from longtail.functional import bbn_alpha, bbn_mixed_features, shot_groups  # noqa: E402
from longtail.metrics import shift_scores  # noqa: E402
from longtail.runs import load_run  # noqa: E402

from benchmarks.diagnosis_cli import run_diagnosis  # noqa: E402

MIXES = (0.0, 0.25, 0.5, 0.75, 1.0)


def scores(logits: torch.Tensor, targets: torch.Tensor, groups: dict[str, list[int]]) -> dict[str, float]:
    result = shift_scores(logits, targets, groups)
    return {"top1": round(100 * result["top1"], 2),
            **{group: round(100 * result[f"{group}_top1"], 2) for group in groups}}


def mixed_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mix: float) -> torch.Tensor:
    """BBN's logits ``W [2 a f_c ; 2 (1 - a) f_r] + b`` for the features ``[f_c ; f_r]`` of the equal mix
    (N, 2D) and the head's weight (C, 2D) and bias (C,): a = 1/2 is BBN's test, 1 and 0 a branch alone."""
    conventional, rebalancing = features.chunk(2, dim=1)
    return F.linear(bbn_mixed_features(conventional, rebalancing, mix), weight, bias)


def trained_alpha(checkpoint: dict, total_epochs: int) -> float:
    """The alpha the checkpoint's last epoch trained with: its ``"epoch"`` is that epoch's 0-based index,
    the number ``BBN.on_epoch_start`` was given for it."""
    return bbn_alpha(int(checkpoint["epoch"]), total_epochs)


def diagnose(run_path: Path) -> dict:
    run = load_run(run_path)
    if run.config.model.name != "bbn_resnet32" or run.config.model.params.get("head", "linear") != "linear":
        raise SystemExit(f"{run_path}: not a BBN run with a linear head")
    test = run.evaluate(run.bundle.test, keep_features=True, test_time_augment=False)
    features, targets = test.outputs["features"].float(), test.outputs["targets"]
    width = features.shape[1] // 2
    f_c, f_r = features[:, :width], features[:, width:]  # the equal mix: features = [f_c ; f_r]
    head = run.model.heads[0]
    weight, bias = head.weight.detach().float().cpu(), head.bias.detach().float().cpu()
    w_c, w_r = weight[:, :width], weight[:, width:]
    groups = {group: classes for group, classes in shot_groups(run.bundle.train_counts).items() if classes}
    mixes = {f"{a:g}": scores(mixed_logits(features, weight, bias, a), targets, groups) for a in MIXES}
    trained = trained_alpha(run.state, run.config.train.epochs)
    logit_c, logit_r = f_c @ w_c.T, f_r @ w_r.T
    row_norms = {group: {"conventional": w_c[classes].norm(dim=1).mean().item(),
                         "rebalancing": w_r[classes].norm(dim=1).mean().item()}
                 for group, classes in groups.items()}
    float32 = load_run(run_path, overrides=["train.amp=none"])
    return {
        "run": str(run_path),
        "epoch": int(run.state["epoch"]) + 1,
        "test_top1_by_mix": mixes,
        "test_top1_at_trained_mix": {"alpha": round(trained, 4),
                                     **scores(mixed_logits(features, weight, bias, trained), targets, groups)},
        "logit_std_per_image": {"conventional": logit_c.std(dim=1).mean().item(),
                                "rebalancing": logit_r.std(dim=1).mean().item()},
        "feature_norm": {"conventional": f_c.norm(dim=1).mean().item(), "rebalancing": f_r.norm(dim=1).mean().item()},
        "classifier_row_norm": row_norms,
        # each branch's logits averaged over the test images and the group's classes: a class offset
        "mean_logit_by_group": {group: {"conventional": logit_c[:, classes].mean().item(),
                                        "rebalancing": logit_r[:, classes].mean().item(),
                                        "bias": bias[classes].mean().item()} for group, classes in groups.items()},
        "test_top1_bfloat16": round(100 * test.metrics["top1"], 2),
        "test_top1_float32": round(100 * float32.evaluate(float32.bundle.test).metrics["top1"], 2),
    }


def main() -> None:
    run_diagnosis("bbn_diagnosis.py", __doc__, diagnose)


if __name__ == "__main__":
    main()
