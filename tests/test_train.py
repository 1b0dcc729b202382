"""End to end through the CLI on the offline Digits-LT default: train, resume, NaN stop, eval, errors."""
import json
from pathlib import Path

import pytest
import torch

from longtail.cli import main
from longtail.engine.checkpoint import load_checkpoint

FAST = ["train.epochs=4", "data.batch_size=64", "train.log_interval=5"]


def run_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir())


def test_default_train_writes_metrics_logs_plots(tmp_path):
    assert main(["train", f"output_dir={tmp_path}", *FAST]) == 0
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    test = metrics["last"]["test"]
    assert metrics["selection"] == "last" and "best" not in metrics
    assert 0.5 < test["top1"] <= 1.0  # digits are easy even long-tailed
    for key in ("top5", "many_top1", "medium_top1", "few_top1", "ece", "mce", "nll", "brier", "per_class_top1"):
        assert key in test
    for name in ("config.yaml", "env.json", "metrics.csv", "train.log", "checkpoints/last.pt",
                 "plots/per_class_accuracy.png", "plots/reliability.png", "plots/reliability_by_group.png"):
        assert (run / name).is_file(), name
    assert any((run / "tensorboard").iterdir())
    assert len((run / "metrics.csv").read_text().strip().splitlines()) == 1 + 4
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "commit" in env["git"]


def test_second_run_never_overwrites_the_first(tmp_path):
    assert main(["train", f"output_dir={tmp_path}", "train.epochs=1"]) == 0
    assert main(["train", f"output_dir={tmp_path}", "train.epochs=1"]) == 0
    assert [p.name for p in run_dirs(tmp_path)] == ["digits_lt_ce", "digits_lt_ce-1"]


def test_resume_reproduces_uninterrupted_run(tmp_path):
    common = [*FAST, "optim.lr=0.05", "schedule.name=cosine", "schedule.warmup_epochs=1"]
    assert main(["train", f"output_dir={tmp_path / 'full'}", *common]) == 0
    assert main(["train", f"output_dir={tmp_path / 'split'}", *common, "train.stop_at_epoch=2"]) == 0
    (split,) = run_dirs(tmp_path / "split")
    assert not (split / "metrics.json").exists()
    assert load_checkpoint(split)["epoch"] == 1  # zero-based: two epochs done
    assert main(["train", "--resume", str(split)]) == 0
    (full,) = run_dirs(tmp_path / "full")
    full_metrics = json.loads((full / "metrics.json").read_text())["last"]["test"]
    split_metrics = json.loads((split / "metrics.json").read_text())["last"]["test"]
    assert split_metrics["top1"] == full_metrics["top1"]
    assert split_metrics["nll"] == pytest.approx(full_metrics["nll"], abs=1e-6)
    full_weights = load_checkpoint(full)["model"]
    split_weights = load_checkpoint(split)["model"]
    for key in full_weights:
        torch.testing.assert_close(split_weights[key], full_weights[key], rtol=0, atol=1e-6)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    # epoch 1 trains normally at lr 0.05, then the lr jumps to 5e8 and the loss blows up
    code = main(["train", f"output_dir={tmp_path}", *FAST, "optim.lr=0.05", "schedule.name=step",
                 "schedule.milestones=[1]", "schedule.gamma=1e10"])
    assert code == 3
    message = capsys.readouterr().err
    assert "loss became" in message and "last good checkpoint" in message
    (run,) = run_dirs(tmp_path)
    state = load_checkpoint(run)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_select_on_validation_writes_best(tmp_path):
    assert main(["train", f"output_dir={tmp_path}", *FAST, "data.val_fraction=0.2", "train.select=val"]) == 0
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["selected_on"] == "val" and (run / "checkpoints/best.pt").is_file()
    assert "val" in metrics["last"]


def test_select_on_test_is_marked(tmp_path):
    assert main(["train", f"output_dir={tmp_path}", "train.epochs=2", "train.select=test"]) == 0
    (run,) = run_dirs(tmp_path)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["selected_on"] == "test" and "optimistic" in metrics["warning"]


def test_eval_command_writes_a_new_folder(tmp_path):
    assert main(["train", f"output_dir={tmp_path}", "train.epochs=2"]) == 0
    (run,) = run_dirs(tmp_path)
    trained = json.loads((run / "metrics.json").read_text())["last"]["test"]
    assert main(["eval", str(run)]) == 0
    assert main(["eval", str(run / "checkpoints" / "last.pt")]) == 0
    evals = sorted((run / "evals").iterdir())
    assert [p.name for p in evals] == ["last_test", "last_test-1"]
    evaluated = json.loads((evals[0] / "metrics.json").read_text())["last"]["test"]
    assert evaluated["top1"] == trained["top1"]


@pytest.mark.parametrize("args, message", [
    (["optim.learning_rate=0.1"], "unknown key 'optim.learning_rate'"),
    (["data.imbalance_factor=0.5"], "imbalance factor"),
    (["data.dataset=cifar10_lt", "data.root=/nonexistent/cifar"], "/nonexistent/cifar"),
    (["model.name=resnet33"], "unknown model 'resnet33'"),
    (["loss.params.gama=2", "loss.name=focal"], "gama"),
])
def test_bad_input_gives_one_clear_error(tmp_path, capsys, args, message):
    assert main(["train", f"output_dir={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_list_and_data_commands(tmp_path, capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in ("digits_lt", "cifar10_lt", "resnet32", "ldam_drw", "class_balanced"):
        assert name in out
    assert main(["data", f"output_dir={tmp_path}"]) == 0
    out = capsys.readouterr().out
    # the realised factor: lt_counts(10, 124, 10) truncates the smallest class to 12 images, 124/12 = 10.3
    assert "503 training images, imbalance factor 10.3" in out
    assert "many 1 classes, medium 7 classes, few 2 classes" in out
    (folder,) = run_dirs(tmp_path)
    assert (folder / "class_histogram.png").stat().st_size > 1000
