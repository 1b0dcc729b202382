import math

import pytest
import torch

from longtail.config import OptimConfig, ScheduleConfig
from longtail.engine.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from longtail.engine.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_step_schedule_of_the_seeds():
    cfg = ScheduleConfig(name="step", warmup_epochs=5, milestones=[160, 180], gamma=0.1)
    assert lr_factor(0, 200, cfg) == 0.0
    assert lr_factor(2.5, 200, cfg) == pytest.approx(0.5)
    assert lr_factor(5, 200, cfg) == 1.0
    assert lr_factor(159.9, 200, cfg) == 1.0
    assert lr_factor(160, 200, cfg) == pytest.approx(0.1)
    assert lr_factor(199, 200, cfg) == pytest.approx(0.01)


def test_cosine_and_linear_reach_final_factor():
    cosine = ScheduleConfig(name="cosine", warmup_epochs=0, final_lr_factor=0.0)
    assert lr_factor(0, 10, cosine) == 1.0
    assert lr_factor(5, 10, cosine) == pytest.approx(0.5)
    assert lr_factor(10, 10, cosine) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(2.5, 10, cosine) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    linear = ScheduleConfig(name="linear", warmup_epochs=2, warmup_start_factor=0.1)
    assert lr_factor(0, 12, linear) == pytest.approx(0.1)
    assert lr_factor(7, 12, linear) == pytest.approx(0.5)


def test_scheduler_steps_per_batch():
    model = torch.nn.Linear(2, 2)
    optimizer = build_optimizer(model.parameters(), OptimConfig(lr=0.2), torch.device("cpu"))
    scheduler = build_scheduler(optimizer, ScheduleConfig(name="cosine", warmup_epochs=1), steps_per_epoch=4,
                                total_epochs=3)
    lrs = []
    for _ in range(8):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([0.0, 0.05, 0.1, 0.15])
    assert lrs[4] == pytest.approx(0.2)
    assert lrs[6] == pytest.approx(0.2 * 0.5 * (1 + math.cos(math.pi * 0.25)))


def test_frozen_model_is_an_error():
    model = torch.nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        build_optimizer(model.parameters(), OptimConfig(), torch.device("cpu"))


def test_checkpoint_round_trip_is_atomic_and_weights_only(tmp_path):
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "history": [{"epoch": 1, "loss": 0.5}]}
    path = save_checkpoint(state, tmp_path / "checkpoints" / "last.pt")
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
    loaded = load_checkpoint(tmp_path)  # a run directory resolves to checkpoints/last.pt
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))


def test_checkpoint_errors_are_clear(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(bad)


def test_explicit_step_factors_replace_gamma():
    """LDAM-DRW's code: x0.01 from epoch 160, x0.0001 from 180 (not gamma^k with one gamma)."""
    cfg = ScheduleConfig(name="step", warmup_epochs=5, milestones=[160, 180], factors=[0.01, 0.0001])
    assert [lr_factor(e, 200, cfg) for e in (100, 159.9, 160, 179, 180, 199)] == pytest.approx(
        [1.0, 1.0, 0.01, 0.01, 0.0001, 0.0001])


def test_step_factors_must_match_milestones():
    with pytest.raises(ValueError, match="one lr multiplier per milestone"):
        ScheduleConfig(name="step", milestones=[160, 180], factors=[0.1])
    with pytest.raises(ValueError, match="ascending"):
        ScheduleConfig(name="step", milestones=[180, 160], factors=[0.1, 0.01])
