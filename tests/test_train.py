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


CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# every random draw of the loader at once: crop, flip, AutoAugment (per image), mixup (per batch)
AUGMENTED = ["data.augment.crop_padding=1", "data.augment.flip=true", "data.augment.autoaugment=cifar10",
             "data.augment.mixup_alpha=1.0"]
# BBN's recipe on the digits: two loaders (uniform and reversed sampler) paired in each batch
BBN = [str(CONFIGS / "cifar10_lt/if100/bbn.yaml"), "data.dataset=digits_lt", "data.root=null",
       "data.imbalance_factor=10", "data.max_count=40", "data.batch_size=32", "data.augment={}",
       "train.eval_every=0", "stage2=null", "train.scale_schedule=true"]


def assert_same_weights(run_a: Path, run_b: Path) -> None:
    a, b = load_checkpoint(run_a)["model"], load_checkpoint(run_b)["model"]
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# 503 training digits: batches of 64 keep a last batch of 55 (data.drop_last: false, the default);
# batches of 251 leave one sample, which joins the batch before it (BatchNorm1d cannot take it alone)
LAST_BATCH_OF_ONE = ["data.batch_size=251"]
DROP_LAST = ["data.drop_last=true"]


@pytest.mark.parametrize("extra", [[], AUGMENTED, BBN, LAST_BATCH_OF_ONE, DROP_LAST],
                         ids=["plain", "augmented", "bbn_paired", "last_batch_of_one", "drop_last"])
def test_resume_reproduces_uninterrupted_run(tmp_path, extra):
    # Exact: a loader whose random stream is not re-derived from (seed, epoch) at the resumed epoch (a
    # generator carried over from earlier epochs, or the global RNG) gives other weights.
    common = [*FAST, "optim.lr=0.05", "schedule.name=cosine", "schedule.warmup_epochs=1"]
    config, overrides = (extra[:1], [*common, *extra[1:]]) if extra is BBN else ([], [*common, *extra])
    assert main(["train", *config, f"output_dir={tmp_path / 'full'}", *overrides]) == 0
    assert main(["train", *config, f"output_dir={tmp_path / 'split'}", *overrides, "train.stop_at_epoch=2"]) == 0
    (split,) = run_dirs(tmp_path / "split")
    assert not (split / "metrics.json").exists()
    assert load_checkpoint(split)["epoch"] == 1  # zero-based: two epochs done
    assert main(["train", "--resume", str(split)]) == 0
    (full,) = run_dirs(tmp_path / "full")
    full_metrics = json.loads((full / "metrics.json").read_text())["last"]["test"]
    split_metrics = json.loads((split / "metrics.json").read_text())["last"]["test"]
    assert split_metrics["top1"] == full_metrics["top1"]
    assert split_metrics["nll"] == full_metrics["nll"]
    assert_same_weights(full, split)


def test_resume_from_the_best_checkpoint_replays_the_epochs_after_it(tmp_path):
    common = [*FAST, *AUGMENTED, "data.val_fraction=0.2", "train.select=val"]
    assert main(["train", f"output_dir={tmp_path / 'full'}", *common]) == 0
    assert main(["train", f"output_dir={tmp_path / 'split'}", *common, "train.stop_at_epoch=3"]) == 0
    (full,), (split,) = run_dirs(tmp_path / "full"), run_dirs(tmp_path / "split")
    best_epoch = load_checkpoint(split / "checkpoints" / "best.pt")["epoch"]
    assert main(["train", "--resume", str(split / "checkpoints" / "best.pt")]) == 0
    assert_same_weights(full, split)
    # the history continues from the best epoch's (the epochs after it were run again)
    assert [row["epoch"] for row in load_checkpoint(split)["history"]] == [1, 2, 3, 4]
    assert best_epoch <= 2
    best = [json.loads((run / "metrics.json").read_text())["best"] for run in (full, split)]
    assert best[0]["epoch"] == best[1]["epoch"] and best[0]["test"]["top1"] == best[1]["test"]["top1"]


# a step decay at epoch 3 (0-based) of 4 and mixup until epoch 3: both act after the first two epochs
DECAY = [*FAST, *AUGMENTED, "optim.lr=0.05", "schedule.name=step", "schedule.milestones=[3]"]


def test_a_run_started_from_a_kept_checkpoint_equals_the_run_trained_whole(tmp_path):
    # Exact: a start that loses the optimiser's momentum, or whose loader draws are not those of (seed,
    # epoch), gives other weights; the first two epochs' rows come from the checkpoint's history.
    assert main(["train", f"output_dir={tmp_path / 'source'}", *DECAY, "data.augment.mix_until_epoch=3",
                 "train.keep_epochs=[2]"]) == 0
    (source,) = run_dirs(tmp_path / "source")
    kept = source / "checkpoints" / "epoch2.pt"
    assert load_checkpoint(kept)["epoch"] == 1
    reading = [*DECAY, "schedule.gamma=0.01", "data.augment.mix_until_epoch=2"]  # differs from epoch 2 on only
    assert main(["train", f"output_dir={tmp_path / 'started'}", *reading, "--start-from", str(kept)]) == 0
    assert main(["train", f"output_dir={tmp_path / 'whole'}", *reading]) == 0
    (started,), (whole,) = run_dirs(tmp_path / "started"), run_dirs(tmp_path / "whole")
    assert_same_weights(whole, started)
    whole_weights, source_weights = load_checkpoint(whole)["model"], load_checkpoint(source)["model"]
    assert any(not torch.equal(whole_weights[k], source_weights[k]) for k in whole_weights)  # the reading matters
    rows = [line.split(",")[:2] for line in (started / "metrics.csv").read_text().splitlines()[1:]]
    source_rows = [line.split(",")[:2] for line in (source / "metrics.csv").read_text().splitlines()[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and rows[:2] == source_rows[:2]
    record = json.loads((started / "started_from.json").read_text())
    assert record["epochs_done"] == 2 and record["checkpoint"] == str(kept)
    assert set(record["changed"]) == {"schedule.gamma", "data.augment.mix_until_epoch", "train.keep_epochs"}
    log = (started / "train.log").read_text()
    assert f"started from {kept}, epoch 2; continuing at epoch 3" in log and "stage 1 epoch 1/4" not in log


def test_a_start_refuses_a_difference_that_acted_before_it(tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path / 'source'}", *DECAY, "data.augment.mix_until_epoch=3",
                 "train.keep_epochs=[2]"]) == 0
    (source,) = run_dirs(tmp_path / "source")
    start = ["--start-from", str(source / "checkpoints" / "epoch2.pt")]
    out = f"output_dir={tmp_path / 'refused'}"
    assert main(["train", out, *DECAY, "data.augment.mix_until_epoch=3", "schedule.milestones=[1]", *start]) == 2
    assert "the lr schedules differ inside the 2 epochs the checkpoint holds, at step 8 (epoch 2)" in capsys.readouterr().err
    assert main(["train", out, *DECAY, "data.augment.mix_until_epoch=1", "seed=1", *start]) == 2
    err = capsys.readouterr().err
    assert "data.augment.mix_until_epoch (3 there, 1 here), seed (0 there, 1 here), which acted" in err
    assert main(["train", out, *DECAY, *start[:1], str(source)]) == 2
    assert "takes a checkpoint file" in capsys.readouterr().err
    assert main(["train", out, *DECAY, "data.augment.mix_until_epoch=3", "train.select=test", *start]) == 2
    assert "the best epoch may lie among the 2 taken over" in capsys.readouterr().err
    assert not (tmp_path / "refused").exists() or not any((tmp_path / "refused").iterdir())


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
