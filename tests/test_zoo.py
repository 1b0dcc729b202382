"""The model zoo (benchmarks/zoo.py): a slimmed run is a run folder every command takes and gives the
run's own numbers; a changed checkpoint is caught by its sha256; and each entry kept in the
repository re-scores its recorded test top-1 (the golden-number test)."""
import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from longtail.cli import main
from longtail.config import load_config
from longtail.engine.builders import build_bundle

REPO = Path(__file__).resolve().parents[1]


def _zoo_tool():
    spec = importlib.util.spec_from_file_location("zoo", REPO / "benchmarks" / "zoo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


zoo_tool = _zoo_tool()


def _eval_top1(path: Path, *overrides: str) -> float:
    before = set(path.glob("evals/*"))
    assert main(["eval", str(path), *overrides]) == 0
    (folder,) = set(path.glob("evals/*")) - before
    return json.loads((folder / "metrics.json").read_text())["last"]["test"]["top1"]


@pytest.fixture(scope="module")
def entries(tmp_path_factory, one_thread):
    """A tiny Digits-LT run and its LWS stage 2 (a head of another kind than stage 1's: the slim
    checkpoint must keep its spec), both added to a zoo of their own."""
    root = tmp_path_factory.mktemp("zoo")
    assert main(["train", f"output_dir={root / 'runs'}", "name=r", "train.epochs=2", "data.val_fraction=0.2"]) == 0
    run = root / "runs" / "r"
    assert main(["stage2", str(run), "stage2.method=lws", "stage2.epochs=1"]) == 0
    zoo = root / "zoo"
    zoo_tool.add(run, "digits/ce", "longtail train train.epochs=2", zoo)
    zoo_tool.add(run / "stage2_lws", "digits/ce_lws", "longtail stage2 ... stage2.method=lws", zoo)
    return run, zoo


def test_an_entry_is_slim_and_scores_what_its_run_recorded(entries, tmp_path):
    run, zoo = entries
    manifest = zoo_tool.read_manifest(zoo)
    assert [e["name"] for e in manifest["entries"]] == ["digits/ce", "digits/ce_lws"]
    state = torch.load(zoo / "digits/ce/checkpoints/last.pt", weights_only=True)
    assert set(state) == {"epoch", "model", "config"}  # no optimizer, scheduler, scaler, loss or history
    original = torch.load(run / "checkpoints/last.pt", weights_only=True)
    for key, tensor in original["model"].items():
        assert torch.equal(state["model"][key], tensor), key
    assert (zoo / "digits/ce/checkpoints/last.pt").stat().st_size < (run / "checkpoints/last.pt").stat().st_size
    for entry, folder in zip(manifest["entries"], (run, run / "stage2_lws")):
        recorded = json.loads((folder / "metrics.json").read_text())["last"]["test"]["top1"]
        assert entry["test"]["top1"] == recorded
        assert _eval_top1(zoo / entry["name"]) == recorded  # re-scored exactly, on this machine
    assert zoo_tool.verify(zoo) == []
    assert "| `zoo/digits/ce_lws` | digits_lt IF" in zoo_tool.table(zoo)
    readme = tmp_path / "README.md"  # the README's table is generated between its markers, the rest kept
    readme.write_text(f"# Title\n\n{zoo_tool.TABLE_START}\n| old |\n{zoo_tool.TABLE_END}\n\nAfter.\n")
    zoo_tool.write_readme_table(readme, zoo)
    text = readme.read_text()
    assert "| old |" not in text and text.startswith("# Title\n\n") and text.endswith("\n\nAfter.\n")
    for entry in manifest["entries"]:
        assert f"`zoo/{entry['name']}`" in text and f"`{entry['command']}`" in text  # what trained it


def test_a_recipes_own_stage_2_is_added_with_its_runs_config(tmp_path, one_thread):
    """`longtail train` with a stage2 section trains it in RUN/stage2, which has no config.yaml of its own."""
    assert main(["train", f"output_dir={tmp_path / 'runs'}", "name=r", "train.epochs=1", "stage2.method=lws",
                 "stage2.epochs=1"]) == 0
    run = tmp_path / "runs" / "r"
    assert not (run / "stage2" / "config.yaml").exists()
    entry = zoo_tool.add(run / "stage2", "digits/lws", "longtail train stage2.method=lws", tmp_path / "zoo")
    assert (tmp_path / "zoo/digits/lws/config.yaml").read_text() == (run / "config.yaml").read_text()
    recorded = json.loads((run / "stage2" / "metrics.json").read_text())["last"]["test"]["top1"]
    assert entry["test"]["top1"] == recorded != json.loads((run / "metrics.json").read_text())["last"]["test"]["top1"]
    assert _eval_top1(tmp_path / "zoo/digits/lws") == recorded


def test_predict_export_and_stage2_take_an_entry_as_they_take_the_run(entries, tmp_path):
    run, zoo = entries
    config = load_config(run / "config.yaml")
    test = build_bundle(config).test
    files = []
    for index in range(0, len(test.targets), 40):
        files.append(tmp_path / f"{index:04d}.png")
        Image.fromarray(test.images[index][0].numpy(), mode="L").save(files[-1])
    rows = {}
    for name, folder in (("run", run), ("zoo", zoo / "digits/ce")):
        out = tmp_path / f"{name}.csv"
        assert main(["predict", str(folder), *map(str, files), "--out", str(out), "--workers", "0"]) == 0
        with out.open() as handle:
            rows[name] = [{k: v for k, v in row.items() if k != "path"} for row in csv.DictReader(handle)]
    assert rows["zoo"] == rows["run"] and len(rows["run"]) == len(files)

    from longtail.commands.export import load_export
    images = test.images[:16].float()
    logits = {}
    for name, folder in (("run", run), ("zoo", zoo / "digits/ce")):
        assert main(["export", str(folder), "--format", "torchscript", "--out", str(tmp_path / f"{name}.pt")]) == 0
        logits[name] = load_export(tmp_path / f"{name}.pt")[0](images)
    torch.testing.assert_close(logits["zoo"], logits["run"], atol=0, rtol=0)

    assert main(["stage2", str(zoo / "digits/ce"), "stage2.method=crt", "stage2.epochs=1"]) == 0
    assert (zoo / "digits/ce/stage2_crt/metrics.json").is_file()


def test_a_changed_or_missing_checkpoint_is_reported(entries, tmp_path):
    _, zoo = entries
    copy = tmp_path / "zoo"
    import shutil
    shutil.copytree(zoo, copy)
    path = copy / "digits/ce/checkpoints/last.pt"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    (copy / "digits/ce_lws/checkpoints/last.pt").unlink()
    problems = zoo_tool.verify(copy)
    assert len(problems) == 2
    assert "digits/ce:" in problems[0] and "sha256" in problems[0]
    assert "digits/ce_lws:" in problems[1] and "missing" in problems[1]
    with pytest.raises(FileExistsError, match="remove it"):
        zoo_tool.add(entries[0], "digits/ce", "again", zoo)


# ------------------------------------------------------------------ the golden numbers
REPO_ENTRIES = zoo_tool.read_manifest(zoo_tool.ZOO)["entries"]


def test_the_repositorys_zoo_is_intact():
    assert zoo_tool.verify() == []


# The first entry is re-scored in every CI run (about 30 s on 2 cores: the golden number that tells us
# when a change moves a published result); the others are marked slow.
@pytest.mark.parametrize("entry", [pytest.param(e, id=e["name"], marks=[pytest.mark.slow] if i else [])
                                   for i, e in enumerate(REPO_ENTRIES)])
def test_each_zoo_entry_rescores_its_recorded_top1(entry, tmp_path, one_thread, shared_data):
    """Within 0.1 points: bfloat16 evaluation may round differently on another CPU. The data is read
    from the shared folder wherever this checkout is ($LONGTAIL_SHARED_DATA, default ../shared/data)."""
    import shutil
    folder = tmp_path / "entry"
    shutil.copytree(zoo_tool.ZOO / entry["name"], folder, ignore=shutil.ignore_patterns("evals", "stage2_*"))
    archive = shared_data / Path(yaml.safe_load((folder / "config.yaml").read_text())["data"]["root"]).name
    if not archive.is_file():
        pytest.skip(f"{archive} not found: set LONGTAIL_SHARED_DATA to the folder that holds it")
    assert abs(_eval_top1(folder, f"data.root={archive}") - entry["test"]["top1"]) <= 0.001
