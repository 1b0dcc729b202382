"""Training options checked by what they do to the run, on Digits-LT through the real trainer:
gradient clipping, mixed precision, torch.compile, per-epoch schedules, deterministic mode,
checkpoint frequency, and the stage-1 checkpoint stage 2 starts from."""
import math
from pathlib import Path
from typing import Callable

import pytest
import torch

from longtail.commands.train import train_stage1, train_stage2
from longtail.config import Stage2Config, load_config
from longtail.engine import builders
from longtail.engine.checkpoint import load_checkpoint, save_checkpoint
from longtail.engine.distributed import init_distributed
from longtail.engine.trainer import Trainer, TrainingJob, seed_everything

BASE = ["device=cpu", "train.epochs=2", "model.params.hidden=[32]", "train.eval_every=0"]


@pytest.fixture(autouse=True, scope="module")
def _single_threaded(one_thread):
    yield


def fit(run_dir: Path, *overrides: str, prepare: Callable[[TrainingJob], None] = lambda job: None) -> Trainer:
    """Stage 1 of the Digits-LT default with ``overrides``; ``prepare`` may attach observers to the job."""
    config = load_config(None, [*BASE, *overrides])
    seed_everything(config.seed)
    bundle = builders.build_bundle(config)
    dist_info = init_distributed("cpu")
    job = builders.stage1_job(config, bundle, dist_info)
    prepare(job)
    trainer = Trainer(config, job, bundle, run_dir, dist_info)
    trainer.fit()
    return trainer


def grad_norm(parameters) -> float:
    return math.sqrt(sum(float(p.grad.double().pow(2).sum()) for p in parameters if p.grad is not None))


def record_before_each_step(job: TrainingJob, read: Callable[[torch.optim.Optimizer], object], into: list) -> None:
    job.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: into.append(read(optimizer)))


def test_grad_clip_bounds_the_gradient_norm_of_every_step(tmp_path):
    limit = 0.05
    clipped, free = [], []
    fit(tmp_path / "clip", f"train.grad_clip={limit}",
        prepare=lambda job: record_before_each_step(job, lambda o: grad_norm(job.model.parameters()), clipped))
    fit(tmp_path / "free", prepare=lambda job: record_before_each_step(
        job, lambda o: grad_norm(job.model.parameters()), free))
    assert len(clipped) == len(free) > 10
    assert min(free) > limit  # the limit binds: without it every step's gradient is larger
    assert max(clipped) <= limit * (1 + 1e-5)
    assert min(clipped) == pytest.approx(limit, rel=1e-4)  # scaled down to the limit, not zeroed


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("none", torch.float32)])
def test_amp_runs_the_forward_in_its_dtype_and_scales_fp16_losses(tmp_path, amp, dtype):
    seen: list[torch.dtype] = []

    def observe(job: TrainingJob) -> None:
        job.net.register_forward_hook(lambda module, inputs, output: seen.append(output.logits.dtype))

    trainer = fit(tmp_path, f"train.amp={amp}", prepare=observe)
    assert set(seen) == {dtype}
    assert trainer.scaler.is_enabled() == (amp == "fp16")  # only fp16 needs the loss scaled
    weights = trainer.job.model.state_dict().values()
    assert all(torch.isfinite(w).all() for w in weights if w.is_floating_point())
    assert trainer.history[-1]["train_loss"] < trainer.history[0]["train_loss"]


@pytest.mark.slow
def test_compile_trains_the_same_weights_as_eager(tmp_path):
    # float32: a compiled graph fuses bfloat16 casts differently, so bf16 autocast (the CPU default where
    # the hardware has it) rounds differently from eager and two epochs drift past any tight tolerance
    compiled = fit(tmp_path / "compiled", "train.compile=true", "train.amp=none")
    eager = fit(tmp_path / "eager", "train.amp=none")
    assert isinstance(compiled.net, torch._dynamo.eval_frame.OptimizedModule)
    for key, tensor in eager.job.model.state_dict().items():
        torch.testing.assert_close(compiled.job.model.state_dict()[key], tensor, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("per_step", [False, True])
def test_per_step_false_changes_the_lr_only_at_epoch_boundaries(tmp_path, per_step):
    lrs: list[float] = []
    steps: list[int] = []

    def observe(job: TrainingJob) -> None:
        steps.append(len(job.loader))
        record_before_each_step(job, lambda o: o.param_groups[0]["lr"], lrs)

    fit(tmp_path, "train.epochs=3", "schedule.name=cosine", f"schedule.per_step={str(per_step).lower()}",
        prepare=observe)
    per_epoch = [lrs[e * steps[0]:(e + 1) * steps[0]] for e in range(3)]
    assert len(lrs) == 3 * steps[0] > 3
    if per_step:
        assert all(len(set(epoch)) == len(epoch) for epoch in per_epoch)
    else:  # one value per epoch: cosine over 3 epochs at epochs 0, 1, 2
        assert [sorted(set(epoch)) for epoch in per_epoch] == [
            [pytest.approx(0.05 * (1 + math.cos(math.pi * e / 3)))] for e in range(3)]


def test_deterministic_turns_on_deterministic_algorithms(tmp_path):
    assert not torch.are_deterministic_algorithms_enabled()
    try:
        train_stage1(load_config(None, [*BASE, "train.epochs=1", "train.deterministic=true"]), tmp_path,
                     init_distributed("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)


@pytest.mark.parametrize("every, expected", [(1, [None, 0, 1, 2, 3]), (2, [None, None, 1, 1, 3])])
def test_checkpoint_every_saves_on_its_epochs_and_at_the_end(tmp_path, every, expected):
    last = tmp_path / "checkpoints" / "last.pt"
    seen: list[int | None] = []

    class LastCheckpointAtEpochStart:
        def on_epoch_start(self, epoch: int, total_epochs: int) -> None:
            seen.append(load_checkpoint(last)["epoch"] if last.exists() else None)

    fit(tmp_path, "train.epochs=5", f"train.checkpoint_every={every}",
        prepare=lambda job: job.hooked.append(LastCheckpointAtEpochStart()))
    assert seen == expected
    assert load_checkpoint(last)["epoch"] == 4  # the last epoch is always saved


def backbone(state: dict) -> dict:
    return {k: v for k, v in state.items() if not k.startswith("heads.")}


@pytest.mark.parametrize("choice", ["best", "file"])
def test_stage2_from_checkpoint_starts_from_the_named_checkpoint(tmp_path, choice):
    config = load_config(None, BASE)
    train_stage1(config, tmp_path, init_distributed("cpu"))
    last = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    other = {**last, "model": {k: v * 0.5 if k.endswith("weight") else v for k, v in last["model"].items()}}
    path = tmp_path / "checkpoints" / "best.pt" if choice == "best" else tmp_path / "elsewhere.pt"
    save_checkpoint(other, path)
    stage2 = Stage2Config(method="crt", epochs=1, features="cached",
                          from_checkpoint="best" if choice == "best" else str(path))
    results = train_stage2(config.model_copy(update={"stage2": stage2}), tmp_path, init_distributed("cpu"),
                           tmp_path / "stage2")
    assert results["from_checkpoint"] == str(path)
    trained = backbone(load_checkpoint(tmp_path / "stage2" / "checkpoints" / "last.pt")["model"])
    for key, tensor in backbone(other["model"]).items():  # cached features: the backbone is not touched
        assert torch.equal(trained[key], tensor), key
    assert any(not torch.equal(trained[k], v) for k, v in backbone(last["model"]).items())


def test_stage2_job_settings_default_to_stage_1s_and_can_be_set_apart(tmp_path):
    """What stage 2's TrainingJob runs with: stage2.* when set, else stage 1's data.batch_size/train.*."""
    from longtail.stage2.training import Stage2Context

    def context(*overrides: str) -> Stage2Context:
        config = load_config(None, ["device=cpu", "train.grad_clip=2.0", "train.log_interval=7", "train.amp=bf16",
                                    "data.batch_size=16", "stage2.method=crt", *overrides])
        return Stage2Context(config, torch.nn.Linear(1, 1), None, init_distributed("cpu"), None, "cached", tmp_path)

    inherited = context()
    assert (inherited.batch_size, inherited.grad_clip, inherited.compile, inherited.log_interval) == (16, 2.0, False, 7)
    assert inherited.precision.amp_dtype == torch.bfloat16
    own = context("stage2.batch_size=64", "stage2.grad_clip=0", "stage2.log_interval=3", "stage2.amp=none",
                  "stage2.compile=true")
    assert (own.batch_size, own.grad_clip, own.compile, own.log_interval) == (64, 0, True, 3)
    assert own.precision.amp_dtype is None
