"""Bring your own images (issue 24), each on real files: an archive too large for the memory left is
refused before decoding, images of the asked size keep the files' pixels, a set of mixed sizes says
which size it gets, and settings counted in epochs follow train.epochs."""
import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from conftest import pack
from longtail.cli import main
from longtail.commands.predict import eval_view
from longtail.commands.common import as_trained
from longtail.config import Config, DataConfig
from longtail.data import build_data, sources
from longtail.data.loaders import EvalLoader
from longtail.data.sources import decode_bytes

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"


def write_images(root: Path, sizes: dict[str, list[int]], rng: np.random.Generator, flat: bool = False) -> dict[str, np.ndarray]:
    """root/<split>/<class>/<i>.png, one image per listed side (RGB, random pixels, or one flat colour so
    large images stay small on disk); returns each file's pixels by path."""
    pixels = {}
    for split in ("train", "test"):
        for name, sides in sizes.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i, side in enumerate(sides if split == "train" else sides[:2]):
                if flat:
                    array = np.full((side, side, 3), rng.integers(0, 256, 3), dtype=np.uint8)
                else:
                    array = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
                Image.fromarray(array).save(folder / f"{i:03d}.png")
                pixels[str(folder / f"{i:03d}.png")] = array
    return pixels


# ------------------------------------------------------------------ 1. memory before decoding
def test_an_archive_that_does_not_fit_the_memory_left_is_refused_and_leaves_nothing(tmp_path):
    # 200 flat 1024x1024 PNGs (a few KB each on disk): 600 MiB of uint8 pixels at their own size, run under
    # an address-space limit 512 MiB above what the process already maps
    write_images(tmp_path / "tree", {"a": [1024] * 120, "b": [1024] * 78}, np.random.default_rng(0), flat=True)
    archive = pack(tmp_path / "tree", tmp_path / "big.tar.gz")
    out, cache = tmp_path / "runs", tmp_path / "cache"
    script = textwrap.dedent(f"""
        import resource, sys
        import longtail.cli, longtail.commands.train, longtail.data, longtail.models, torchvision  # mapped first
        from PIL import PngImagePlugin
        size = next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmSize:')) * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size + 512 * 2**20, resource.RLIM_INFINITY))
        sys.exit(longtail.cli.main(['train', 'output_dir={out}', 'data.dataset=image_folder', 'data.root={archive}',
                                    'data.imbalance_factor=1', 'model.name=small_cnn', 'train.epochs=1',
                                    'data.cache_dir={cache}', 'device=cpu']))
        """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and len(errors) == 1
    assert "decoding 202 images" in errors[0] and "3x1024x1024" in errors[0] and "RLIMIT_AS" in errors[0]
    assert "data.image_size" in errors[0] and "data.in_memory=no" in errors[0] and "data.max_count" in errors[0]
    assert not out.exists() or not list(out.iterdir())  # no run folder
    assert not list(cache.glob("*.pt")) and not list(cache.glob(".*tmp"))  # no decoded cache, no half file


def test_an_in_memory_decode_reads_only_the_long_tailed_selection_and_keeps_it(tmp_path, monkeypatch):
    """The archive decode keeps exactly the images the selection kept when it decoded everything first."""
    pixels = write_images(tmp_path / "tree", {"a": [16] * 9, "b": [16] * 7, "c": [16] * 6}, np.random.default_rng(1))
    archive = pack(tmp_path / "tree", tmp_path / "lt.tar.gz")
    cfg = dict(dataset="image_folder", imbalance_factor=5, selection_seed=3, cache_dir=str(tmp_path / "cache"))
    files = build_data(DataConfig(root=str(tmp_path / "tree"), **cfg))  # per-batch files: selection on paths
    decoded = []

    def counting(data, name, channels=3):
        decoded.append(name)
        return decode_bytes(data, name, channels)

    monkeypatch.setattr(sources, "decode_bytes", counting)
    packed = build_data(DataConfig(root=str(archive), **cfg))
    assert packed.train_counts == files.train_counts == [6, 2, 1] and len(packed.train) == 9
    assert len(decoded) == 9 + len(packed.test)  # the 13 training images left out were never decoded
    expected = torch.stack([torch.from_numpy(pixels[path]).permute(2, 0, 1) for path in files.train.paths])
    assert torch.equal(packed.train.images, expected)


# ------------------------------------------------------------------ 2. native sizes, never zoomed
def test_a_folder_of_32x32_pngs_decodes_to_exactly_the_files_pixels(tmp_path):
    pixels = write_images(tmp_path / "tree", {"a": [32] * 4, "b": [32] * 3}, np.random.default_rng(2))
    archive = pack(tmp_path / "tree", tmp_path / "tree.tar.gz")
    listed = build_data(DataConfig(dataset="image_folder", root=str(tmp_path / "tree")))
    paths = listed.train.paths + listed.test.paths
    expected = torch.stack([torch.from_numpy(pixels[path]).permute(2, 0, 1) for path in paths])
    for cfg in (dict(root=str(tmp_path / "tree"), in_memory="yes"), dict(root=str(archive)),
                dict(root=str(archive), image_size=32)):
        bundle = build_data(DataConfig(dataset="image_folder", **cfg))
        assert bundle.image_size == 32
        assert torch.equal(torch.cat([bundle.train.images, bundle.test.images]), expected)
    test = listed.test  # decoded per batch by the loader's evaluation view
    views = torch.cat([images for images, _ in EvalLoader(test, 4, lambda images: images, "cpu")])
    assert torch.equal(views, expected[len(listed.train):])
    assert torch.equal(eval_view(expected[0], 32), expected[0])  # predict/export's view of a 32x32 file


# ------------------------------------------------------------------ 3. mixed sizes: 224, said and recorded
def test_a_folder_with_two_sizes_gets_224_says_so_and_records_it(tmp_path, capsys):
    write_images(tmp_path / "tree", {"a": [20, 24, 20], "b": [24, 20]}, np.random.default_rng(3))
    bundle = build_data(DataConfig(dataset="image_folder", root=str(tmp_path / "tree")))
    assert bundle.image_size == 224 and bundle.train.image_size == 224
    assert "differ in size" in bundle.image_size_note and "224x224" in bundle.image_size_note
    code = main(["train", f"output_dir={tmp_path / 'runs'}", "data.dataset=image_folder",
                 f"data.root={tmp_path / 'tree'}", "model.name=mlp", "model.params.hidden=[8]", "train.epochs=1",
                 "data.num_workers=0", "data.batch_size=4", "device=cpu", "train.amp=none"])
    err = capsys.readouterr().err
    assert code == 0
    assert "image size: images differ in size (e.g. 20x20 and 24x24)" in err  # the run header
    (run,) = (tmp_path / "runs").iterdir()
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["image_size"] == 224  # eval/predict reuse it


# ------------------------------------------------------------------ 4. epoch settings follow train.epochs
LDAM_ON_DIGITS = ["data.dataset=digits_lt", "data.root=null", "data.imbalance_factor=10", "data.max_count=40",
                  "data.augment={}", "model.name=mlp", "model.params={hidden: [16], head: cosine, head_scale: 30.0}",
                  "train.epochs=10", "train.eval_every=0", "train.amp=none", "device=cpu"]


def test_a_shortened_recipe_is_refused_unless_scaled_and_then_trains_on_the_scaled_schedule(tmp_path, capsys):
    recipe = str(CONFIGS / "cifar10_lt/if100/ldam_drw.yaml")  # 200 epochs, milestones 160/180, DRW at 160
    assert main(["train", recipe, f"output_dir={tmp_path}", *LDAM_ON_DIGITS]) == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert "schedule.milestones=[160, 180]" in error and "loss.params.drw_epoch=160" in error
    assert "train.scale_schedule=true" in error and not list(tmp_path.iterdir())
    assert main(["train", recipe, f"output_dir={tmp_path}", *LDAM_ON_DIGITS, "train.scale_schedule=true"]) == 0
    err = capsys.readouterr().err
    assert "schedule.milestones [160, 180] -> [8, 9]" in err and "loss.params.drw_epoch 160 -> 8" in err
    (run,) = tmp_path.iterdir()
    recorded = yaml.safe_load((run / "config.yaml").read_text())
    assert recorded["schedule"]["milestones"] == [8, 9] and recorded["loss"]["params"]["drw_epoch"] == 8
    assert recorded["schedule"]["warmup_epochs"] == 0.25
    lrs = [float(row["lr"]) for row in csv.DictReader((run / "metrics.csv").open())]
    # the lr each epoch trained with: x0.01 in (0-based) epoch 8, x0.0001 in epoch 9
    assert lrs == pytest.approx([0.1] * 8 + [1e-3, 1e-5])


def test_a_run_trained_before_the_size_was_recorded_is_read_at_224_as_it_was_trained():
    # since issue 24 a file dataset's run records the size its data chose; a run without it predates that
    # and was trained at 224, whatever its images' own size
    old = as_trained(Config(data=DataConfig(dataset="image_folder", root="photos")))
    assert old.data.image_size == 224
    assert as_trained(Config(data=DataConfig(dataset="image_folder", root="p", image_size=28))).data.image_size == 28
    assert as_trained(Config()).data.image_size is None  # Digits-LT is never resized
