"""First contact and faults (issue 12): every row is a real fault on real (tiny) data — exit code,
message, and what is left on disk."""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.cli import main
from longtail.config import DataConfig, load_config
from longtail.data import DataError, build_data
from longtail.data.sources import read_image_file
from longtail.engine.checkpoint import load_checkpoint
from longtail.engine.rundir import new_run_dir, run_lock
from longtail.metrics import summary

REPO = Path(__file__).resolve().parents[1]
FAST = ["train.epochs=1", "model.params.hidden=[32]"]


def write_tree(root: Path, counts: dict[str, int], test_per_class: int = 2, size: int = 12) -> Path:
    """root/train/<class>/<class>_<i>.png and root/test/<class>/..., random RGB pixels."""
    rng = np.random.default_rng(0)
    for split, per_class in (("train", counts), ("test", {name: test_per_class for name in counts})):
        for name, count in per_class.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{name}_{i}.png")
    return root


def run_cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def run_dirs(output_dir: Path) -> list[str]:
    return sorted(p.name for p in output_dir.iterdir()) if output_dir.exists() else []


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A finished 1-epoch Digits-LT run without a validation split."""
    out = tmp_path_factory.mktemp("trained")
    assert main(["train", f"output_dir={out}", *FAST]) == 0
    return out / "digits_lt_ce"


# ------------------------------------------------------------------ 1. cache key
def test_cache_notices_images_moved_between_classes_and_renamed_classes(tmp_path):
    root = write_tree(tmp_path / "tree", {"a": 4, "b": 2})
    cfg = DataConfig(dataset="image_folder", root=str(root), in_memory="yes", image_size=8,
                     cache_dir=str(tmp_path / "cache"))
    assert build_data(cfg).train_counts == [4, 2]
    os.rename(root / "train" / "a" / "a_0.png", root / "train" / "b" / "a_0.png")  # same size and mtime
    assert build_data(cfg).train_counts == [3, 3]
    os.rename(root / "train" / "b", root / "train" / "c")
    os.rename(root / "test" / "b", root / "test" / "c")
    assert build_data(cfg).class_names == ["a", "c"]


# ------------------------------------------------------------------ 2. image_folder as it is, one size rule
def test_image_folder_takes_the_tree_as_it_is_and_one_size_for_folder_and_archive(tmp_path):
    root = write_tree(tmp_path / "tree", {"a": 12, "b": 5, "c": 1})
    folder = build_data(DataConfig(dataset="image_folder", root=str(root)))
    assert folder.train_counts == [12, 5, 1] and folder.image_size == 12  # every image is 12x12: kept
    in_memory = build_data(DataConfig(dataset="image_folder", root=str(root), in_memory="yes"))
    archive = tmp_path / "tree.tar.gz"
    with tarfile.open(archive, "w:gz") as handle:
        for split in ("train", "test"):
            handle.add(root / split, arcname=split)
    packed = build_data(DataConfig(dataset="image_folder", root=str(archive)))
    for bundle in (in_memory, packed):
        assert bundle.train_counts == [12, 5, 1] and bundle.image_size == 12
        assert tuple(bundle.train.images.shape[1:]) == (3, 12, 12)
    long_tailed = build_data(DataConfig(dataset="image_folder", root=str(root), imbalance_factor=5, max_count=5))
    assert long_tailed.train_counts == [5, 2, 1]


# ------------------------------------------------------------------ 3. eval keeps the run's data
def test_eval_refuses_a_val_split_of_training_images_and_changed_data(trained, capsys):
    code, text = run_cli(capsys, "eval", trained, "data.val_fraction=0.2", "--split", "val")
    assert code == 2 and "data.val_fraction would change which images the run was trained on" in text
    code, text = run_cli(capsys, "eval", trained, "data.imbalance_factor=100")
    assert code == 2 and "data.imbalance_factor" in text and "Traceback" not in text
    code, text = run_cli(capsys, "eval", trained, "--split", "val")
    assert code == 2 and "would score training images. Use --split test" in text
    assert not (trained / "evals").exists()
    code, _ = run_cli(capsys, "eval", trained, "data.num_workers=0", "data.eval_batch_size=64")
    assert code == 0 and len(list((trained / "evals").iterdir())) == 1


# ------------------------------------------------------------------ 4. resume and stage 2 on an unfinished run
def test_resume_refuses_what_it_cannot_apply_and_records_what_it_applies(tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path}", *FAST, "train.epochs=2", "train.stop_at_epoch=1"]) == 0
    run = tmp_path / "digits_lt_ce"
    code, text = run_cli(capsys, "stage2", run, "stage2.epochs=1")
    assert code == 2 and "not finished" in text and "--allow-incomplete" in text
    assert not list(run.glob("stage2_*"))
    code, text = run_cli(capsys, "train", "--resume", run, "train.epochs=3", "optim.lr=0.5")
    assert code == 2 and "cannot change optim.lr" in text
    assert load_config(run / "config.yaml").optim.lr == 0.1
    code, text = run_cli(capsys, "train", "--resume", run, "train.epochs=3")
    assert code == 0 and "train.epochs=3 (was 2)" in text
    assert load_config(run / "config.yaml").train.epochs == 3
    history = [json.loads(line) for line in (run / "config_history.jsonl").read_text().splitlines()]
    assert history[-1]["changed"] == {"train.epochs": {"from": 2, "to": 3}}
    assert json.loads((run / "metrics.json").read_text())["last"]["epoch"] == 3


def test_stage2_on_an_unfinished_stage1_runs_only_when_allowed(tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path}", *FAST, "train.epochs=2", "train.stop_at_epoch=1"]) == 0
    run = tmp_path / "digits_lt_ce"
    code, _ = run_cli(capsys, "stage2", "--allow-incomplete", run, "stage2.epochs=1")
    assert code == 0 and (next(run.glob("stage2_*")) / "metrics.json").is_file()


# ------------------------------------------------------------------ 5. 16-bit PNG
def test_16_bit_png_is_scaled_not_saturated(tmp_path):
    levels = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(levels).save(path)
    expected = torch.from_numpy(np.rint(levels / 257.0).astype(np.uint8))
    for channels in (1, 3):
        image = read_image_file(path, channels)
        assert image.shape == (channels, 64, 64)
        assert (image == 255).float().mean() < 0.01
        assert (image.int() - expected.int()).abs().max() <= 1


# ------------------------------------------------------------------ 6. header check before training
def test_unreadable_files_are_all_named_before_training_or_skipped(tmp_path, capsys):
    root = write_tree(tmp_path / "tree", {"a": 6, "b": 6})
    (root / "train" / "a" / "a_1.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00")  # header cut short
    (root / "test" / "b" / "b_0.png").write_bytes(os.urandom(300))
    out, cache = tmp_path / "runs", tmp_path / "cache"
    common = [f"output_dir={out}", "data.dataset=image_folder", f"data.root={root}", "data.image_size=8",
              "data.batch_size=4", f"data.cache_dir={cache}", *FAST]
    code, text = run_cli(capsys, "train", *common)
    assert code == 2 and "2 image files" in text and "a_1.png" in text and "b_0.png" in text
    assert "data.bad_files=skip" in text and run_dirs(out) == []
    assert len(list(cache.glob("headers-*.json"))) == 1  # remembered with the listing
    code, text = run_cli(capsys, "train", *common, "data.bad_files=skip")
    assert code == 0 and "skipping 2 unreadable image files" in text and "images 3x8x8" in text
    assert (out / "digits_lt_ce" / "metrics.json").is_file()


# ------------------------------------------------------------------ 7. one error path
def _tab_recipe(tmp_path: Path) -> list[str]:
    recipe = tmp_path / "tabbed.yaml"
    recipe.write_text("data:\n\tbatch_size: 4\n")
    return [str(recipe)]


def _empty_class(tmp_path: Path) -> list[str]:
    root = write_tree(tmp_path / "tree", {"a": 5, "b": 3})
    (root / "train" / "ghost").mkdir()
    write_tree(tmp_path / "tree", {"ghost": 0}, test_per_class=2)
    return ["data.dataset=image_folder", f"data.root={root}", "data.imbalance_factor=10"]


@pytest.mark.parametrize("make_args, message", [
    (_tab_recipe, r"tabbed.yaml line 2, column 1 is not valid YAML.*never tabs"),
    (lambda _: ["data.imbalance_factor=.nan"], "must be a finite number"),
    (lambda _: ["data.batch_size=100000"], "lower data.batch_size"),
    (lambda _: ["data.val_fraction=0.99"], "or data.val_fraction"),
    (lambda _: ["loss.name=focal", "loss.params.gamma=abc"], "loss.params.gamma='abc' for loss 'focal'"),
    (lambda _: ["data.image_size=0"], "data.image_size: Input should be greater than or equal to 1"),
    (_empty_class, "class 'ghost' has no training images"),
])
def test_user_errors_exit_2_with_one_message_and_leave_no_run_folder(tmp_path, capsys, make_args, message):
    out = tmp_path / "runs"
    code, text = run_cli(capsys, "train", *make_args(tmp_path), f"output_dir={out}", *FAST)
    assert code == 2 and "Traceback" not in text
    assert text.count("error:") == 1
    assert re.search(message, text), text
    assert run_dirs(out) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_user_error(tmp_path, capsys):
    code, text = run_cli(capsys, "train", f"output_dir={tmp_path}", "device=cuda", *FAST)
    assert code == 2 and "no GPU is visible; use device=cpu or auto" in text and run_dirs(tmp_path) == []


def test_bad_calibrator_param_is_a_user_error(trained, capsys):
    code, text = run_cli(capsys, "calibrate", trained, "--method", "hist", "--param", "n_bins=0")
    assert code == 2 and "calibrate.params of hist: n_bins must be >= 1" in text and "Traceback" not in text


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="finite number"):
        main(["--debug", "train", "data.imbalance_factor=.nan"])


@pytest.fixture
def read_only_dir(tmp_path):
    """A folder nobody can write to: a read-only tmpfs as root (chmod does not stop root), else chmod."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("running as root and cannot mount a read-only tmpfs")
        yield folder
        subprocess.run(["umount", str(folder)], check=False)
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_read_only_output_dir_is_a_user_error(read_only_dir, capsys):
    code, text = run_cli(capsys, "train", f"output_dir={read_only_dir / 'runs'}", *FAST)
    assert code == 2 and "Traceback" not in text
    assert "Read-only file system" in text or "Permission denied" in text
    assert "writable" in text


def _limited_python(code: str, max_file_bytes: int) -> list[str]:
    """A Python child that may not write files larger than ``max_file_bytes`` (a real EFBIG from the
    kernel, as a full disk gives ENOSPC), with SIGXFSZ ignored so the write fails instead of killing it."""
    prelude = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({max_file_bytes}, {max_file_bytes})); ")
    return [sys.executable, "-c", prelude + code]


def _child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}


@pytest.mark.slow
def test_disk_full_while_saving_keeps_the_last_good_checkpoint_and_no_tmp(tmp_path):
    assert main(["train", f"output_dir={tmp_path}", *FAST, "train.epochs=3", "train.stop_at_epoch=1"]) == 0
    run = tmp_path / "digits_lt_ce"
    last = run / "checkpoints" / "last.pt"
    before = last.read_bytes()
    child = subprocess.run(_limited_python(
        f"from longtail.cli import main; raise SystemExit(main(['train', '--resume', {str(run)!r}]))",
        len(before) // 2), capture_output=True, text=True, env=_child_env(), cwd=tmp_path, timeout=300)
    assert child.returncode == 2, child.stderr
    assert "cannot write checkpoint" in child.stderr and "the previous last.pt is kept" in child.stderr
    assert "Traceback" not in child.stderr
    assert last.read_bytes() == before and load_checkpoint(last)["epoch"] == 0
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt"]


@pytest.mark.slow
def test_ctrl_c_prints_the_resume_command_and_leaves_nothing_half_written(tmp_path):
    child = subprocess.Popen([sys.executable, "-m", "longtail", "train", f"output_dir={tmp_path}",
                              "train.epochs=500", "model.params.hidden=[32]"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())
    last = tmp_path / "digits_lt_ce" / "checkpoints" / "last.pt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 130, err
    assert f"longtail train --resume {tmp_path / 'digits_lt_ce'}" in err and "Traceback" not in err
    assert [p.name for p in last.parent.iterdir()] == ["last.pt"]
    assert load_checkpoint(last)["epoch"] >= 0


# ------------------------------------------------------------------ 8. damaged checkpoints
def test_damaged_checkpoints_give_a_clear_message_never_weights_only_false(trained, tmp_path, capsys):
    good = (trained / "checkpoints" / "last.pt").read_bytes()
    truncated, noise, foreign = tmp_path / "truncated.pt", tmp_path / "noise.pt", tmp_path / "foreign.pt"
    truncated.write_bytes(good[: len(good) // 2])
    noise.write_bytes(os.urandom(4096))
    torch.save(argparse.Namespace(model=1), foreign)  # pickles a class: refused by weights_only loading
    for file in (truncated, noise, foreign):
        code, text = run_cli(capsys, "eval", file)
        assert code == 2 and f"cannot read checkpoint {file}" in text and "truncated, corrupt" in text
        assert "weights_only" not in text and "Traceback" not in text


# ------------------------------------------------------------------ 9. yes/no spellings
def test_yes_no_on_off_are_accepted_for_auto_yes_no_options(tmp_path):
    config = load_config(None, ["data.in_memory=no", "data.decode_on_device=off", "train.channels_last=on"])
    assert (config.data.in_memory, config.data.decode_on_device, config.train.channels_last) == ("no", "no", "yes")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  in_memory: no\n  decode_on_device: yes\ntrain:\n  channels_last: off\n")
    config = load_config(recipe)
    assert (config.data.in_memory, config.data.decode_on_device, config.train.channels_last) == ("no", "yes", "no")


# ------------------------------------------------------------------ 10. smaller rows
def test_nan_in_the_first_epoch_names_no_checkpoint(tmp_path, capsys):
    code, text = run_cli(capsys, "train", f"output_dir={tmp_path}", *FAST, "optim.lr=1e30", "train.log_interval=1")
    assert code == 3 and "No checkpoint was written yet" in text and "last.pt" not in text


def test_one_run_directory_is_locked_against_a_second_process(trained, capsys):
    with run_lock(trained):
        code, text = run_cli(capsys, "train", "--resume", trained)
    assert code == 2 and f"{trained} is in use by pid {os.getpid()}" in text


def test_runs_created_at_the_same_instant_never_collide(tmp_path):
    """30 times, 16 threads released at once create the same run name, with the interpreter switching
    threads every microsecond (before the fix about 1 trial in 4 raised FileExistsError)."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        for trial in range(30):
            start, made, errors = threading.Barrier(16), [], []

            def create() -> None:
                start.wait()
                try:
                    made.append(new_run_dir(tmp_path / str(trial), "same"))
                except OSError as error:
                    errors.append(error)

            threads = [threading.Thread(target=create) for _ in range(16)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            assert errors == [] and len(set(made)) == 16
    finally:
        sys.setswitchinterval(interval)


def test_an_empty_shot_group_is_explained():
    line = summary({"top1": 0.5, "many_top1": 0.9, "medium_top1": 0.4, "few_top1": None, "ece": 0.1, "nll": 1.0})
    assert "few: no class of that size" in line and "few < 20 training images" in line


def test_missing_cifar_root_offers_the_download_not_a_repository_path():
    with pytest.raises(DataError, match="data.download=true") as error:
        build_data(DataConfig(dataset="cifar10_lt", root="/nowhere/cifar"))
    assert "shared" not in str(error.value)


# ------------------------------------------------------------------ issue 27: outputs, names, the newer commands
def _pngs(folder: Path, count: int, size: int = 8) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = [folder / f"img{i}.png" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8), mode="L").save(path)
    return paths


def _stray(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A 1-epoch run with a validation split, best.pt (train.select=val) and a ts calibrator fitted on last.pt."""
    out = tmp_path_factory.mktemp("calibrated")
    assert main(["train", f"output_dir={out}", *FAST, "data.val_fraction=0.2", "train.select=val"]) == 0
    assert main(["calibrate", str(out / "digits_lt_ce"), "--method", "ts"]) == 0
    return out / "digits_lt_ce"


def test_write_output_refuses_numbers_or_replaces_and_leaves_no_tmp(tmp_path, read_only_dir):
    from longtail.engine.rundir import OutputError, write_output
    target = tmp_path / "out" / "a.txt"
    assert write_output(target, "one") == target and target.read_text() == "one"
    with pytest.raises(OutputError, match="a.txt exists and is never replaced silently; pass --force"):
        write_output(target, "two", hint="pass --force")
    assert write_output(target, "two", exist="number") == tmp_path / "out" / "a-1.txt"
    assert write_output(target, "three", exist="replace") == target and target.read_text() == "three"
    with pytest.raises(OutputError, match="is a folder"):
        write_output(tmp_path / "out", "x")
    with pytest.raises(OutputError, match=f"cannot write {read_only_dir / 'sub' / 'b.txt'}: "):
        write_output(read_only_dir / "sub" / "b.txt", "x")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-1.txt", "a.txt"] and _stray(tmp_path) == []


def test_predict_never_replaces_a_file_and_fails_when_nothing_was_predicted(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    keep = tmp_path / "keep.csv"
    keep.write_text("path,class_1\n" + "".join(f"x{i}.png,3\n" for i in range(8)))
    before = keep.read_bytes()
    bad = tmp_path / "bad.png"
    bad.write_bytes(os.urandom(200))
    code, text = run_cli(capsys, "predict", trained, bad, "--out", keep, "--force", "--workers", "0")
    assert code == 2 and "none of the 1 images could be read" in text and keep.read_bytes() == before
    good = _pngs(tmp_path / "imgs", 2)
    code, text = run_cli(capsys, "predict", trained, *good, "--out", keep, "--workers", "0")
    assert code == 2 and "keep.csv exists and is never replaced silently; pass --force" in text
    assert keep.read_bytes() == before
    code, _ = run_cli(capsys, "predict", trained, *good, "--out", keep, "--force", "--workers", "0")
    assert code == 0 and len(keep.read_text().splitlines()) == 3
    for expected in ("predictions.csv", "predictions-1.csv"):  # the default name is numbered, never replaced
        code, text = run_cli(capsys, "predict", trained, *good, "--workers", "0")
        assert code == 0 and f"written to {expected}" in text
    code, text = run_cli(capsys, "predict", trained, *good, "--workers", "-1")
    assert code == 2 and "--workers must be >= 0" in text
    assert _stray(tmp_path) == []


def test_export_numbers_its_default_refuses_a_named_file_and_checks_out(trained, tmp_path, capsys, read_only_dir,
                                                                         monkeypatch):
    export = trained / "export"
    for expected in ("model.pt", "model-1.pt"):
        code, text = run_cli(capsys, "export", trained, "--format", "torchscript")
        assert code == 0 and f"exported torchscript to {export / expected}" in text
    named = tmp_path / "m.pt"
    named.write_bytes(b"mine")
    code, text = run_cli(capsys, "export", trained, "--format", "torchscript", "--out", named)
    assert code == 2 and "m.pt exists and is never replaced silently" in text and named.read_bytes() == b"mine"
    code, text = run_cli(capsys, "export", trained, "--format", "torchscript", "--out", tmp_path / "m.onnx")
    assert code == 2 and "does not end in .pt or .pth, the suffix of --format torchscript" in text
    code, text = run_cli(capsys, "export", trained, "--format", "torchscript", "--out", tmp_path)
    assert code == 2 and f"{tmp_path} is a folder" in text
    code, text = run_cli(capsys, "export", trained, "--format", "torchscript", "--out", read_only_dir / "m.pt")
    assert code == 2 and f"cannot write {read_only_dir / 'm.pt'}" in text and "Traceback" not in text
    assert _stray(tmp_path) == [] and _stray(trained) == []
    # an ONNX export that fails half-way leaves neither a temporary file nor an empty RUN/export/
    pytest.importorskip("onnx")
    for folder in (export,):
        for file in folder.iterdir():
            file.unlink()
        folder.rmdir()

    def broken(*args, **kwargs):
        raise RuntimeError("unsupported operator")
    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="unsupported operator"):
        main(["export", str(trained), "--format", "onnx"])
    assert not export.exists()


@pytest.mark.parametrize("name", ["../../x", "ABSOLUTE", "", "''", "a b/c", ".hidden", "'  '"])  # '' as in YAML
def test_run_names_are_one_folder_inside_output_dir(tmp_path, capsys, name):
    out = tmp_path / "a" / "b"
    name = str(tmp_path / "outside" / "x") if name == "ABSOLUTE" else name
    code, text = run_cli(capsys, "train", f"output_dir={out}", f"name={name}", *FAST)
    assert code == 2 and "Traceback" not in text and text.count("error:") == 1
    assert "must be one folder name" in text or "valid string" in text
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == []


def test_study_and_stage2_names_are_one_folder(trained, tmp_path, capsys):
    study = tmp_path / "s.yaml"
    study.write_text(f"name: ../escaped\noutput_dir: {tmp_path / 'studies'}\n"
                     f"recipes: [{{name: ce, config: {REPO / 'configs' / 'digits_lt' / 'ce.yaml'}}}]\n")
    code, text = run_cli(capsys, "study", study)
    assert code == 2 and "the study name (its folder in output_dir) '../escaped' contains a path separator; it must be one folder name" in text
    code, text = run_cli(capsys, "stage2", trained, "stage2.method=crt", "--name", "a/../../b")
    assert code == 2 and "--name 'a/../../b' contains a path separator" in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.yaml"] and not list(trained.glob("stage2*"))


def test_report_counts_a_run_given_twice_once_and_names_a_bad_metrics_file(trained, tmp_path, capsys):
    code, _ = run_cli(capsys, "report", trained, f"{trained}/", trained.parent / ".." / trained.parent.name / trained.name,
                      "--out", tmp_path / "r")
    assert code == 0 and "1 runs in 1 groups" in (tmp_path / "r" / "report.md").read_text()
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard", "export", "evals"))
    for content, message in (('{"last": [1, 2]}', "is valid JSON but not a longtail metrics.json"),
                             ('{"last": {"test": ', "is not valid JSON")):
        (copy / "metrics.json").write_text(content)
        code, text = run_cli(capsys, "report", copy, "--out", tmp_path / "bad")
        assert code == 2 and f"{copy / 'metrics.json'} {message}" in text and "Traceback" not in text
        assert not (tmp_path / "bad").exists()


def test_a_calibrator_fitted_on_another_checkpoint_is_refused(calibrated, tmp_path, capsys):
    image = _pngs(tmp_path / "imgs", 1)[0]
    code, text = run_cli(capsys, "predict", calibrated, image, "--checkpoint", "best", "--calibrated",
                         "--out", tmp_path / "p.csv", "--workers", "0")
    assert code == 2 and "calibrator 'ts' was fitted on" in text and "last.pt, not on" in text
    code, text = run_cli(capsys, "export", calibrated, "--format", "torchscript", "--checkpoint", "best",
                         "--calibrated")
    assert code == 2 and "calibrator 'ts' was fitted on" in text
    code, text = run_cli(capsys, "predict", calibrated, image, "--calibrator", "../ts", "--out", tmp_path / "p.csv")
    assert code == 2 and "--calibrator '../ts' contains a path separator; it must be one folder name" in text
    assert not (tmp_path / "p.csv").exists() and not (calibrated / "export").exists()
    code, _ = run_cli(capsys, "predict", calibrated, image, "--calibrated", "--out", tmp_path / "p.csv",
                      "--workers", "0")
    assert code == 0 and (tmp_path / "p.csv").is_file()


@pytest.mark.parametrize("factors, message", [("[1]", "finite numbers > 1"), ("[2,.inf]", "finite numbers > 1"),
                                              ("[.nan]", "finite numbers > 1")])
def test_shift_factors_must_be_finite_and_above_one(trained, capsys, factors, message):
    code, text = run_cli(capsys, "eval", trained, f"shifts.imbalance_factors={factors}", "--shifts")
    assert code == 2 and message in text and "Traceback" not in text


def test_eval_shifts_on_a_split_the_run_does_not_have(trained, capsys):
    evals = sorted(p.name for p in (trained / "evals").iterdir()) if (trained / "evals").exists() else []
    code, text = run_cli(capsys, "eval", trained, "--shifts", "--split", "val")
    assert code == 2 and "the run has no val split" in text and "Traceback" not in text
    assert (sorted(p.name for p in (trained / "evals").iterdir()) if (trained / "evals").exists() else []) == evals


def test_predict_inputs_linked_folders_bombs_and_binary_lists(trained, tmp_path, capsys, monkeypatch):
    from PIL import Image as PILImage
    folder = tmp_path / "in"
    _pngs(folder, 2)
    _pngs(tmp_path / "elsewhere", 1)
    (folder / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (folder / "loop").symlink_to(folder, target_is_directory=True)
    big = folder / "zbig.png"
    PILImage.fromarray(np.zeros((64, 64), dtype=np.uint8), mode="L").save(big)
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is then over twice the limit: a "bomb"
    out = tmp_path / "p.csv"
    code, text = run_cli(capsys, "predict", trained, folder, "--out", out, "--workers", "0")
    assert code == 0 and "Traceback" not in text
    assert f"skipped {big}: cannot decode image {big}: Image size (4096 pixels) exceeds limit" in text
    predicted = [line.split(",")[0] for line in out.read_text().splitlines()[1:]]
    assert predicted == [str(folder / "img0.png"), str(folder / "img1.png"), str(folder / "linked" / "img0.png")]
    listing = tmp_path / "list.txt"
    listing.write_bytes(b"\xff\xfe\x00\x81" + os.urandom(64))
    code, text = run_cli(capsys, "predict", trained, listing, "--out", tmp_path / "q.csv")
    assert code == 2 and f"list file {listing} is not text" in text and "Traceback" not in text


def test_a_pt_file_that_is_not_a_run_checkpoint_is_named(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, weights)
    for command in (["eval", weights], ["predict", weights, weights, "--out", tmp_path / "p.csv"],
                    ["export", weights, "--format", "torchscript", "--out", tmp_path / "m.pt"]):
        code, text = run_cli(capsys, *command)
        assert code == 2 and f"{weights} is a PyTorch file but not a checkpoint of a longtail run" in text
        assert "'config'" in text and "Traceback" not in text
