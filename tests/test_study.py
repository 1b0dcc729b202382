"""`longtail study` and the study report on the embedded Digits-LT: run, interrupt, resume without
retraining, mean ± std over seeds in report.md and report.html; the statistics and the paper column."""
import base64
import csv
import json
import math
import os
import shlex
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch
import yaml

from longtail.cli import main
from longtail.commands.study import MARKER, load_study, plan_runs
from longtail.config import apply_overrides
from longtail.engine.checkpoint import load_checkpoint
from longtail.report.aggregate import paired_difference
from longtail.report.compare import format_mean_std
from longtail.report import papers as papers_module
from longtail.report.papers import PaperNumbersNotFound, load_paper_numbers, paper_entry_for, paper_numbers_path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "studies" / "tiny_digits.yaml"


class Tables(HTMLParser):
    """The rows of every table (by id) and every image's src of an HTML page."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.images: list[str] = []
        self._table = self._row = self._cell = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = []
        elif tag in ("td", "th") and self._row is not None:
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs["src"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._row is not None:
            self._row.append(self._cell)
            self._cell = None
        elif tag == "tr" and self._table is not None:
            self._table.append(self._row)
            self._row = None
        elif tag == "table":
            self._table = None


def test_tiny_study_is_interrupted_resumed_without_retraining_and_reported(tmp_path, capsys, one_thread):
    out = tmp_path / "study"
    assert main(["study", str(TINY), "--out", str(out), "--max-runs", "1"]) == 0  # "interrupted" after one run
    first = out / "ce" / "seed0"
    assert (first / "study_run.json").is_file() and not (out / "balanced_softmax").exists()
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in
            [first / "metrics.json", first / "checkpoints" / "last.pt", first / "stage2_crt" / "metrics.json",
             first / "calibration" / "ts" / "metrics.json", first / "study_run.json"]}

    # the second run is killed after its first epoch: a checkpoint, no results
    (second,) = [r for r in plan_runs(load_study(TINY), TINY, out) if r.recipe == "ce" and r.seed == 1]
    assert main([*second.steps[0].argv, "train.stop_at_epoch=1"]) == 0
    assert (second.run_dir / "checkpoints" / "last.pt").is_file() and not (second.run_dir / "metrics.json").exists()

    # another run died before its first checkpoint: its folder holds nothing to resume and is started afresh
    (dead,) = [r for r in plan_runs(load_study(TINY), TINY, out) if r.recipe == "balanced_softmax" and r.seed == 1]
    dead.run_dir.mkdir(parents=True)
    (dead.run_dir / "config.yaml").write_text("name: seed1\n")

    assert main(["study", str(TINY), "--out", str(out)]) == 0
    assert sorted(p.name for p in (out / "balanced_softmax").iterdir()) == ["seed0", "seed1"]
    for path, (mtime, content) in kept.items():  # the finished run was not touched
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content, path
    assert sorted(p.name for p in (out / "ce").iterdir()) == ["seed0", "seed1"]  # resumed, not started again
    assert "resumed from epoch 1" in (second.run_dir / "train.log").read_text()
    assert len(list(out.glob("*/*/study_run.json"))) == 4
    # every step done but the marker lost (the steps ran from --print-commands elsewhere): nothing reruns
    (first / "study_run.json").unlink()
    del kept[first / "study_run.json"]
    assert main(["study", str(TINY), "--out", str(out)]) == 0
    assert (first / "study_run.json").is_file()
    for path, (mtime, _) in kept.items():
        assert path.stat().st_mtime_ns == mtime, path
    assert sorted(p.name for p in (out / "ce").iterdir()) == ["seed0", "seed1"]
    assert [p.name for p in first.glob("stage2_*")] == ["stage2_crt"]
    assert [p.name for p in (first / "calibration").iterdir()] == ["ts"]

    # the study file changed under finished runs: they are not silently reused
    edited = tmp_path / "edited.yaml"
    raw = yaml.safe_load(TINY.read_text())
    raw["overrides"] = [*raw["overrides"], "optim.lr=0.05"]
    for recipe in raw["recipes"]:
        recipe["config"] = str(TINY.parent / recipe["config"])
    edited.write_text(yaml.safe_dump(raw))
    assert main(["study", str(edited), "--out", str(out)]) == 2
    assert "made from a different version of their recipe" in capsys.readouterr().err

    # published numbers: one entry matches balanced softmax's setting, the CE one differs in schedule length
    source = {"paper": "P", "seed_file": "x.txt", "table": "T1", "row": "r", "selection": "last epoch"}
    setting = {"data.dataset": "digits_lt", "data.imbalance_factor": 10, "model.name": "mlp", "train.epochs": 2,
               "data.val_fraction": 0.2}  # the study holds 20 % out for TS, so must the entry
    papers = tmp_path / "papers.yaml"
    papers.write_text(yaml.safe_dump({"entries": [
        {**source, "setting": setting, "method": {"loss.name": "balanced_softmax", "stage2.method": None},
         "metrics": {"top1": 80.0, "ece": 30.0}},
        {**source, "setting": {**setting, "train.epochs": 30}, "method": {"loss.name": "ce", "stage2.method": None},
         "metrics": {"top1": 90.0}}]}))

    report = tmp_path / "report"
    assert main(["report", str(out), "--out", str(report), "--papers", str(papers)]) == 0
    top1 = {recipe: [json.loads((out / recipe / f"seed{k}" / "metrics.json").read_text())["last"]["test"]["top1"]
                     for k in (0, 1)] for recipe in ("ce", "balanced_softmax")}
    expected = {recipe: f"{100 * sum(v) / 2:.2f} ± {100 * abs(v[0] - v[1]) / math.sqrt(2):.2f}"
                for recipe, v in top1.items()}  # sample std of two values: |a - b| / sqrt(2)
    text = (report / "report.md").read_text()
    for recipe, cell in expected.items():
        assert f"| {recipe} | 2 | {cell} |" in text

    page = Tables()
    page.feed((report / "report.html").read_text())
    recipes = {row[0]: row for row in page.tables["recipes"][1:]}
    assert set(recipes) == {"ce", "ce · crt", "balanced_softmax"}
    header = page.tables["recipes"][0]
    for recipe, cell in expected.items():
        assert recipes[recipe][header.index("n")] == "2" and recipes[recipe][header.index("top-1")] == cell
    assert recipes["ce"][header.index("ECE after ts")] != "–"
    bsce = sum(top1["balanced_softmax"]) / 2
    assert recipes["balanced_softmax"][header.index("paper top-1")] == "80.00"
    assert recipes["balanced_softmax"][header.index("ours − paper top-1")] == f"{100 * bsce - 80:+.2f}"
    assert recipes["balanced_softmax"][header.index("paper ECE")] == "30.00"
    assert "P, T1, row 'r' (model selection: last epoch)" in recipes["balanced_softmax"][header.index("paper source")]
    for label in ("ce", "ce · crt"):  # 2 epochs against the paper's 30 (and a stage 2): never compared
        assert recipes[label][header.index("paper top-1")] == "–"
    assert len(page.tables["runs"]) == 1 + 6  # 4 runs, 2 of them with a stage 2
    assert {row[2] for row in page.tables["differences"][1:]} == {"top-1", "ECE"}
    assert len(page.images) == 4 + 3  # shot groups, class size, calibration, learning curves; a reliability diagram per recipe
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"

    # against one baseline: only the pairs containing it, read as "other − baseline"
    assert main(["report", str(out), "--out", str(tmp_path / "vs_ce"), "--baseline", "ce"]) == 0
    page = Tables()
    page.feed((tmp_path / "vs_ce" / "report.html").read_text())
    pairs = {(row[0], row[1], row[2]): row for row in page.tables["differences"][1:]}
    assert set(pairs) == {(a, "ce", m) for a in ("balanced_softmax", "ce · crt") for m in ("top-1", "ECE")}
    assert pairs[("balanced_softmax", "ce", "top-1")][4] == f"{100 * (bsce - sum(top1['ce']) / 2):+.2f}"
    assert main(["report", str(out), "--out", str(tmp_path / "typo"), "--baseline", "cee"]) == 2
    assert "--baseline 'cee' is not a group of this report; the groups are: balanced_softmax, ce, ce · crt" in (
        capsys.readouterr().err)
    assert not (tmp_path / "typo").exists()

    # the validation split, for choosing between readings without the test set
    assert main(["report", str(out), "--out", str(tmp_path / "val"), "--split", "val"]) == 0
    page = Tables()
    page.feed((tmp_path / "val" / "report.html").read_text())
    header, *rows = page.tables["recipes"]
    assert "paper top-1" not in header and not any(h.startswith("ECE after") for h in header)
    val = [json.loads((out / "ce" / f"seed{k}" / "metrics.json").read_text())["last"]["val"] for k in (0, 1)]
    class_avg = [sum(a for a in v["per_class_top1"] if a is not None) /
                 sum(a is not None for a in v["per_class_top1"]) for v in val]
    assert {r[0]: r for r in rows}["ce"][header.index("class-avg")] == format_mean_std(class_avg, "top1")
    assert {r[0]: r for r in rows}["ce"][header.index("top-1")] == format_mean_std([v["top1"] for v in val], "top1")
    assert {row[2] for row in page.tables["differences"][1:]} == {"class-avg", "ECE"}


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_study_file_plans_valid_runs(path, tmp_path):
    study = load_study(path)
    runs = plan_runs(study, path, tmp_path)  # builds and validates every run's config
    assert len(runs) == len(study.seeds) * len(study.selection_seeds) * len(study.recipes)
    assert len({run.run_dir for run in runs}) == len(runs)


def test_study_file_is_validated_before_anything_runs(tmp_path, capsys):
    raw = yaml.safe_load(TINY.read_text())
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**raw, "seed": [0]}))
    assert main(["study", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key 'seed' (did you mean 'seeds'?)" in capsys.readouterr().err

    raw["recipes"][0]["overrides"] = ["optim.lrr=0.1"]
    raw["recipes"][1]["config"] = str(TINY.parent / raw["recipes"][1]["config"])
    raw["recipes"][0]["config"] = str(TINY.parent / raw["recipes"][0]["config"])
    bad.write_text(yaml.safe_dump(raw))
    assert main(["study", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key 'optim.lrr' (did you mean 'lr'?)" in capsys.readouterr().err

    raw["recipes"][0]["overrides"] = []
    raw["recipes"][0]["stage2"] = [{"overrides": ["stage2.method=crt", "stage2.epoch=2"]}]
    bad.write_text(yaml.safe_dump(raw))
    assert main(["study", str(bad), "--out", str(tmp_path / "out")]) == 2
    assert "unknown key 'stage2.epoch' (did you mean 'epochs'?)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_print_commands_lists_each_unfinished_run_with_its_steps(tmp_path, capsys):
    raw = yaml.safe_load(TINY.read_text())
    raw["grid"] = {"data.imbalance_factor": [10, 20]}
    for recipe in raw["recipes"]:
        recipe["config"] = str(TINY.parent / recipe["config"])
    study = tmp_path / "grid.yaml"
    study.write_text(yaml.safe_dump(raw))
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--print-commands"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("#")]
    assert len(lines) == 2 * 2 * 2  # seeds x recipes x grid
    assert lines[0].startswith("torchrun --nproc_per_node=${NPROC:-1} -m longtail train ")
    assert "data.imbalance_factor=10 seed=0 data.selection_seed=0" in lines[0]
    assert f"output_dir={tmp_path / 'out' / 'ce__imbalance_factor=10'} name=seed0" in lines[0]
    assert " && torchrun --nproc_per_node=${NPROC:-1} -m longtail stage2 " in lines[0]
    assert lines[0].endswith("--method ts")
    assert not (tmp_path / "out").exists()  # printing runs nothing



def test_runs_done_from_printed_commands_are_recorded_without_training_more(tmp_path, capsys, one_thread):
    out = tmp_path / "out"
    assert main(["study", str(TINY), "--out", str(out), "--print-commands"]) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if not line.startswith("#"))
    for number, command in enumerate(first.split(" && ")):  # what another machine would run, here in-process
        words = shlex.split(command.replace("${NPROC:-1}", "1"))
        assert main(words[words.index("longtail") + 1:]) == 0
        if number == 0:  # trained, stage 2 and calibration still to run: the report already shows stage 1
            assert main(["study", str(TINY), "--out", str(out), "--max-runs", "0"]) == 0  # writes study.yaml only
            assert not list(out.glob("*/*/study_run.json"))
            assert main(["report", str(out), "--out", str(tmp_path / "partial")]) == 0
            text = (tmp_path / "partial" / "report.md").read_text()
            assert "| ce | 1 |" in text and "ce · crt" not in text
            assert "1 study runs still have stage-2 or calibration steps to run" in text
    assert main(["study", str(TINY), "--out", str(out), "--max-runs", "0"]) == 0
    assert [p.parent.relative_to(out).as_posix() for p in out.glob("*/*/study_run.json")] == ["ce/seed0"]
    assert sorted(p.relative_to(out).as_posix() for p in out.glob("[!.]*/*")) == ["ce/seed0"]  # nothing else trained
    assert "3 left" in capsys.readouterr().out


def test_two_stage2_steps_of_one_method_need_names_and_land_side_by_side(tmp_path, capsys):
    raw = yaml.safe_load(TINY.read_text())
    for recipe in raw["recipes"]:
        recipe["config"] = str(TINY.parent / recipe["config"])
    cached = {"overrides": ["stage2.method=crt", "stage2.epochs=2", "stage2.features=cached"]}
    raw["recipes"][0]["stage2"].append(cached)
    study = tmp_path / "two.yaml"
    study.write_text(yaml.safe_dump(raw))
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--print-commands"]) == 2
    assert "two stage2 steps land in the same folder (stage2_crt)" in capsys.readouterr().err
    cached["name"] = "crt-cached"
    study.write_text(yaml.safe_dump(raw))
    run = plan_runs(load_study(study), study, tmp_path / "out")[0]
    assert [step.output.name for step in run.steps[1:3]] == ["stage2_crt", "stage2_crt-cached"]
    assert run.steps[2].argv[-2:] == ["--name", "crt-cached"]  # where `longtail stage2` will write it
    cached["name"] = "../up"
    study.write_text(yaml.safe_dump(raw))
    assert main(["study", str(study), "--out", str(tmp_path / "out"), "--print-commands"]) == 2
    assert "folder name" in capsys.readouterr().err


def test_paired_difference_matches_the_hand_computed_t_test():
    # differences 0.1, 0.3, 0.2: mean 0.2, sd 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.4641 with 2 degrees of
    # freedom; two-sided p = 1 - t / sqrt(2 + t^2) = 0.07418 (the t(2) distribution's closed form)
    a = {(0, 0): 0.6, (1, 0): 0.8, (2, 0): 0.7}
    b = {(0, 0): 0.5, (1, 0): 0.5, (2, 0): 0.5, (3, 0): 0.9}  # seed 3 has no partner: left out
    result = paired_difference(a, b)
    t = 0.2 / (0.1 / math.sqrt(3))
    assert result["n"] == 3 and result["mean"] == pytest.approx(0.2)
    assert result["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t), rel=1e-6)
    # 95% interval: mean ± t_{0.975, 2} * se with t_{0.975, 2} = 4.302653
    assert result["low"] == pytest.approx(0.2 - 4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert result["verdict"] == "within noise"
    tight = paired_difference({k: v + 0.2 + 0.001 * k[0] for k, v in b.items()}, b)
    assert tight["verdict"] == "outside noise" and tight["p"] < 0.05
    assert paired_difference({(0, 0): 1.0}, {(0, 0): 0.5})["verdict"].startswith("cannot tell")


def test_mean_std_cell_is_the_sample_std():
    assert format_mean_std([0.5, 0.7, 0.6], "top1") == "60.00 ± 10.00"
    assert format_mean_std([0.5], "top1") == "50.00 ± –"
    assert format_mean_std([1.0, 1.2], "nll") == f"1.100 ± {0.2 / math.sqrt(2):.3f}"


def _row(overrides: tuple[str, ...] = (), stage: str = "last") -> dict:
    """A report row of a CIFAR-10-LT IF=100 ResNet-32 CE run of 200 epochs, changed by ``overrides``."""
    config = {"data": {"dataset": "cifar10_lt", "imbalance_factor": 100.0, "augment": {"mixup_alpha": 0.0}},
              "model": {"name": "resnet32"}, "optim": {"nesterov": False},
              "loss": {"name": "ce", "params": {}}, "train": {"epochs": 200}, "stage2": None}
    return {"stage": stage, "config": apply_overrides(config, list(overrides))}


def test_paper_numbers_appear_only_where_the_setting_matches():
    entries = load_paper_numbers()
    ce = paper_entry_for(_row(), entries)
    assert ce is not None and ce["row"] == "Cross-entropy training" and ce["metrics"]["top1"] == 70.14
    for change in ("train.epochs=10", "data.imbalance_factor=50", "model.name=resnet56", "loss.name=focal_typo"):
        assert paper_entry_for(_row((change,)), entries) is None, change  # never compared
    ce100 = paper_entry_for(_row(("data.dataset=cifar100_lt",)), entries)
    assert ce100["metrics"]["top1"] == 37.92 and "MiSLAS" in ce100["also"][0] and "38.4" in ce100["also"][0]
    # IKL's Softmax row is SADE's recipe (Nesterov): CE on it gets that row, CE on Cao et al.'s schedule does not
    assert not any("IKL" in other for other in ce100["also"])
    sade = paper_entry_for(_row(("data.dataset=cifar100_lt", "optim.nesterov=true")), entries)
    assert (sade["paper"].split(" (")[0], sade["metrics"]["top1"], sade.get("also")) == ("IKL", 41.4, None)
    # cRT: the CE stage 1 row gets CE's value, its stage-2 row cRT's; never the other way round
    crt = paper_entry_for(_row(("stage2.method=crt",), stage="stage 2 (crt)"), entries)
    assert crt is not None and crt["row"] == "cRT" and crt["metrics"]["top1"] == 73.02
    assert paper_entry_for(_row(("stage2.method=crt",)), entries) == ce
    # the papers train on the whole training set: a run holding out 20 % is not their row
    assert paper_entry_for(_row(("data.dataset=cifar100_lt", "data.val_fraction=0.2")), entries) is None
    assert paper_entry_for(_row(("data.dataset=cifar100_lt", "data.val_fraction=0.0")), entries) == ce100
    # two papers give MiSLAS's row: the one that also reports ECE comes first (its ECE is the one to meet)
    mislas = paper_entry_for(_row(("data.dataset=cifar100_lt", "data.augment.mixup_alpha=1.0", "stage2.method=mislas"),
                                  stage="stage 2 (mislas)"), entries)
    assert (mislas["row"], mislas["metrics"]) == ("MiSLAS", {"top1": 47.0, "ece": 4.83}) and "LADC" in mislas["also"][0]
    seeds = REPO.parent / "shared" / "seeds"
    if seeds.is_dir():
        for entry in entries:  # a paper that is not a seed (LIFT) names its source instead
            assert (seeds / entry["seed_file"]).is_file() if entry["seed_file"] else entry["source"], entry


def test_paper_numbers_location_is_explicit(tmp_path, monkeypatch):
    # the file of record is the repository's benchmarks/paper_numbers.yaml; an argument or
    # $LONGTAIL_PAPER_NUMBERS overrides it, and a missing file says where it was looked for
    monkeypatch.delenv(papers_module.PAPER_NUMBERS_ENV, raising=False)
    assert paper_numbers_path() == REPO / "benchmarks" / "paper_numbers.yaml" == papers_module.REPOSITORY_PAPER_NUMBERS
    copy = tmp_path / "numbers.yaml"
    copy.write_text(yaml.safe_dump({"entries": load_paper_numbers()[:1]}))
    monkeypatch.setenv(papers_module.PAPER_NUMBERS_ENV, str(copy))
    assert paper_numbers_path() == copy and len(load_paper_numbers()) == 1
    assert paper_numbers_path(REPO / "benchmarks" / "paper_numbers.yaml") != copy  # the argument wins
    with pytest.raises(PaperNumbersNotFound, match="LONGTAIL_PAPER_NUMBERS"):
        monkeypatch.setenv(papers_module.PAPER_NUMBERS_ENV, str(tmp_path / "gone.yaml"))
        load_paper_numbers()
    with pytest.raises(FileNotFoundError, match="the given path"):
        load_paper_numbers(tmp_path / "gone.yaml")
    # an installed package (no benchmarks/ beside it): a clear error naming both ways to point at a copy
    monkeypatch.delenv(papers_module.PAPER_NUMBERS_ENV)
    monkeypatch.setattr(papers_module, "REPOSITORY_PAPER_NUMBERS", tmp_path / "site-packages" / "paper_numbers.yaml")
    with pytest.raises(PaperNumbersNotFound, match=r"--papers FILE or set \$LONGTAIL_PAPER_NUMBERS"):
        load_paper_numbers()


def test_a_failing_step_stops_the_study_with_a_clear_error(tmp_path, capsys, one_thread):
    raw = yaml.safe_load(TINY.read_text())
    raw.update(seeds=[0], recipes=[{**raw["recipes"][1], "config": str(TINY.parent / raw["recipes"][1]["config"]),
                                    "overrides": ["data.val_fraction=0"]}])  # calibration needs a validation split
    study = tmp_path / "no_val.yaml"
    study.write_text(yaml.safe_dump(raw))
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no validation split" in err and "calibrate" in err and "rerun the study" in err
    assert not list((tmp_path / "out").glob("*/*/study_run.json"))


def test_runs_of_one_recipe_in_two_data_settings_are_not_averaged():
    from longtail.report.aggregate import group_rows
    rows = [{**_row((f"data.imbalance_factor={factor}",)), "label": "ce", "pair": (0, 0), "top1": 0.5}
            for factor in (10, 100)]
    with pytest.raises(ValueError, match="differ in their data"):
        group_rows(rows)


# ------------------------------------------------------------------ issue 27: processes sharing a study
def _small_study(tmp_path: Path, **changes) -> Path:
    """Two recipes x two seeds, one epoch of a small MLP, no stage 2: a few seconds a run."""
    raw = {"name": "shared", "seeds": [0, 1],
           "overrides": ["train.epochs=1", "data.batch_size=64", "data.val_fraction=0.2", "model.params.hidden=[32]"],
           "recipes": [{"name": "ce", "config": str(REPO / "configs" / "digits_lt" / "ce.yaml")},
                       {"name": "bs", "config": str(REPO / "configs" / "digits_lt" / "ce.yaml"),
                        "overrides": ["loss.name=balanced_softmax"]}]}
    raw.update(changes)
    path = tmp_path / "shared.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _trainings(run_dir: Path) -> int:
    """How many times training started in ``run_dir`` (one line per start in its train.log)."""
    return (run_dir / "train.log").read_text().count("training images in")


def test_two_study_processes_share_one_study_and_train_each_run_once(tmp_path):
    import os
    import re
    import subprocess
    import sys
    import time
    study, out = _small_study(tmp_path), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    children = []
    for _ in range(2):
        children.append(subprocess.Popen([sys.executable, "-m", "longtail", "study", str(study), "--out", str(out)],
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))
        time.sleep(0.3)
    results = [child.communicate(timeout=300) for child in children]
    assert [child.returncode for child in children] == [0, 0], results
    ran = [int(re.search(r"(\d+) of them here|ran (\d+) runs", stdout).group(1) or
               re.search(r"ran (\d+) runs", stdout).group(1)) for stdout, _ in results]
    assert sum(ran) == 4, results  # every run trained by exactly one of the two
    for recipe in ("ce", "bs"):
        assert sorted(p.name for p in (out / recipe).iterdir()) == ["seed0", "seed1"]  # no seed0-1 duplicate
        for seed in (0, 1):
            run = out / recipe / f"seed{seed}"
            assert _trainings(run) == 1 and (run / "study_run.json").is_file()
            assert {"config.yaml", "env.json", "metrics.json"} <= {p.name for p in run.iterdir()}
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| ce | 2 |" in text and "| bs | 2 |" in text and "4 runs in 2 groups" in text


def test_a_run_held_by_a_live_process_is_skipped_and_a_dead_claim_is_taken(tmp_path, capsys, one_thread):
    from longtail.commands.study import load_study
    from longtail.engine.rundir import run_lock, try_claim
    study, out = _small_study(tmp_path, seeds=[0]), tmp_path / "out"
    ce, bs = plan_runs(load_study(study), study, out)
    # ce/seed0 is claimed by another live process (here: another open file of this one), bs/seed0 is
    # being trained by hand (its RUN/.lock held); neither is touched, the study says so and exits 0
    claim = try_claim(ce.claim_file)
    bs.run_dir.mkdir(parents=True)
    (bs.run_dir / "config.yaml").write_text("name: seed0\n")
    with run_lock(bs.run_dir):
        assert main(["study", str(study), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "2 runs are being worked on by other processes" in text and "ran 0 runs; 2 left" in text
    assert not ce.run_dir.exists() and sorted(p.name for p in bs.run_dir.iterdir()) == [".lock", "config.yaml"]
    # the claimer dies (the kernel drops its lock; the file stays, naming a dead pid): the claim is taken
    claim.close()
    assert ce.claim_file.is_file()
    assert main(["study", str(study), "--out", str(out)]) == 0
    assert "study shared finished (2 runs, 2 of them here)" in capsys.readouterr().out
    assert _trainings(ce.run_dir) == 1 and _trainings(bs.run_dir) == 1


def test_a_stopped_run_whose_recipe_was_edited_is_refused(tmp_path, capsys, one_thread):
    from longtail.cli import build_parser
    from longtail.commands.study import load_study
    study = _small_study(tmp_path, overrides=["train.epochs=2", "data.batch_size=64", "data.val_fraction=0.2",
                                              "model.params.hidden=[32]"])
    out = tmp_path / "out"
    by_study, by_hand = [run for run in plan_runs(load_study(study), study, out) if run.recipe == "ce"]
    # one run stopped after its first epoch by hand (as from --print-commands), one by Ctrl-C in the study
    assert main([*by_hand.steps[0].argv, "train.stop_at_epoch=1"]) == 0
    args = build_parser().parse_args(["study", str(study), "--out", str(out)])
    args.run_command = lambda argv: main([*argv, "train.stop_at_epoch=1"]) or 130
    assert args.func(args) == 130
    for run in (by_hand, by_study):
        assert (run.run_dir / "checkpoints" / "last.pt").is_file() and not (run.run_dir / "metrics.json").exists()
    raw = yaml.safe_load(study.read_text())
    edited = tmp_path / "edited.yaml"
    raw["recipes"][0]["overrides"] = ["data.imbalance_factor=50"]
    edited.write_text(yaml.safe_dump(raw))
    assert main(["study", str(edited), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "2 finished or stopped runs (2 stopped) were made from a different version of their recipe" in err
    # a step added: the config is the same, the signature the study recorded when it started the run is not
    raw["recipes"][0]["overrides"] = []
    raw["recipes"][0]["calibrate"] = [{"method": "ts"}]
    edited.write_text(yaml.safe_dump(raw))
    assert main(["study", str(edited), "--out", str(out)]) == 2
    assert "1 finished or stopped runs (1 stopped)" in capsys.readouterr().err
    for run in (by_hand, by_study):
        assert _trainings(run.run_dir) == 1 and not (run.run_dir / "study_run.json").exists()
    assert main(["study", str(study), "--out", str(out)]) == 0  # the unedited file resumes and finishes them
    for run in (by_hand, by_study):
        assert "resumed from epoch 1" in (run.run_dir / "train.log").read_text()


def test_runs_made_before_a_setting_existed_are_reused_when_it_keeps_their_value(tmp_path, capsys, one_thread):
    """A newer longtail that only adds a setting (its default the old behaviour) changes every run's
    signature; the recorded config re-read with that default still equals the plan, so finished runs
    are kept, while a recorded value that differs from the plan, or other steps, still refuse."""
    study = _small_study(tmp_path, seeds=[0], recipes=[
        {"name": "ce", "config": str(REPO / "configs" / "digits_lt" / "ce.yaml"), "calibrate": [{"method": "ts"}]}])
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out)]) == 0
    run = out / "ce" / "seed0"
    marker, config = run / "study_run.json", run / "config.yaml"
    # as an older version wrote them: no `rotation` setting, so another digest of the config
    old_marker = {**json.loads(marker.read_text()), "signature": "0123456789abcdef"}
    marker.write_text(json.dumps(old_marker))
    lines = config.read_text().splitlines(keepends=True)
    without = [line for line in lines if line.strip() != "rotation: 0.0"]
    assert len(without) == len(lines) - 1
    config.write_text("".join(without))
    assert main(["study", str(study), "--out", str(out)]) == 0
    assert _trainings(run) == 1 and json.loads(marker.read_text())["signature"] == "0123456789abcdef"
    capsys.readouterr()
    # the recorded value is not the planned one: refused
    config.write_text("".join(lines).replace("rotation: 0.0", "rotation: 15.0"))
    assert main(["study", str(study), "--out", str(out)]) == 2
    assert "made from a different version of their recipe" in capsys.readouterr().err
    # the config agrees but the run's steps were others (TS planned, another calibration recorded)
    config.write_text("".join(without))
    marker.write_text(json.dumps({**old_marker, "steps_signature": "fedcba9876543210"}))
    assert main(["study", str(study), "--out", str(out)]) == 2
    assert "made from a different version of their recipe" in capsys.readouterr().err
    assert _trainings(run) == 1


def test_every_step_is_validated_before_training_and_max_runs_is_checked(tmp_path, capsys):
    raw = yaml.safe_load(_small_study(tmp_path).read_text())
    raw["recipes"][1]["calibrate"] = [{"method": "tss"}]
    study = tmp_path / "bad.yaml"
    study.write_text(yaml.safe_dump(raw))
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    assert "unknown calibrator 'tss'" in capsys.readouterr().err
    raw["recipes"][1]["calibrate"] = [{"method": "hist", "params": {"n_bins": 0}}]
    study.write_text(yaml.safe_dump(raw))
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    assert "n_bins must be >= 1" in capsys.readouterr().err
    raw["recipes"][1]["calibrate"] = []
    raw["recipes"][0]["stage2"] = [{"recipe": "nowhere.yaml"}]
    study.write_text(yaml.safe_dump(raw))
    assert main(["study", str(study), "--out", str(tmp_path / "out")]) == 2
    assert "nowhere.yaml" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main(["study", str(_small_study(tmp_path)), "--out", str(tmp_path / "out"), "--max-runs", "-1"]) == 2
    assert "--max-runs must be >= 0" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_recipes_trains_only_the_named_recipes_and_leaves_the_rest(tmp_path, capsys, one_thread):
    study, out = _small_study(tmp_path, seeds=[0]), tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "--recipes", "bs"]) == 0
    said = capsys.readouterr().out
    assert (out / "bs" / "seed0" / MARKER).is_file() and not (out / "ce").exists()
    assert "the runs of --recipes bs are finished (1 of them here); 1 runs of other recipes are left" in said
    assert f"`longtail study {study} --out {out}` continues them" in said
    assert main(["study", str(study), "--out", str(out)]) == 0  # the rest, without retraining bs
    assert (out / "ce" / "seed0" / MARKER).is_file() and _trainings(out / "bs" / "seed0") == 1
    assert "study shared finished (2 runs, 1 of them here)" in capsys.readouterr().out
    assert main(["study", str(study), "--out", str(out), "--recipes", "bs,cee"]) == 2
    assert "cee is not a recipe of the study; its recipes are ce, bs" in capsys.readouterr().err
    assert main(["study", str(study), "--out", str(out), "--recipes", "bs", "--status"]) == 2
    assert "leave --recipes out" in capsys.readouterr().err


def test_ctrl_c_in_a_study_exits_130_with_the_resume_command(tmp_path, capsys, one_thread):
    study, out = _small_study(tmp_path, seeds=[0]), tmp_path / "out"

    def interrupted(argv):  # what the in-process `longtail train` returns on Ctrl-C
        return 130

    from longtail.cli import build_parser
    args = build_parser().parse_args(["study", str(study), "--out", str(out)])
    args.run_command = interrupted
    assert args.func(args) == 130
    err = capsys.readouterr().err
    assert f"Continue with:\n  longtail study {study} --out {out}" in err and "fix the cause" not in err

    def keyboard(argv):  # Ctrl-C between two steps, in the study itself
        raise KeyboardInterrupt
    args.run_command = keyboard
    assert args.func(args) == 130
    assert f"longtail study {study} --out {out}" in capsys.readouterr().err


def test_a_study_packed_on_one_machine_continues_exactly_from_its_pack_on_another(tmp_path, capsys, one_thread):
    """Sessions end and cloud machines go away: the pack carries the records and the stopped runs'
    checkpoints, the unpacked study resumes them (never retrains the finished ones) and ends where the
    study left on the first machine would have."""
    import tarfile
    from longtail.cli import build_parser
    study = _small_study(tmp_path, seeds=[0], overrides=["train.epochs=2", "data.batch_size=64",
                                                          "data.val_fraction=0.2", "model.params.hidden=[32]"])
    here, there = tmp_path / "here", tmp_path / "there"
    assert main(["study", str(study), "--out", str(here), "--max-runs", "1"]) == 0   # ce finished
    args = build_parser().parse_args(["study", str(study), "--out", str(here)])
    args.run_command = lambda argv: main([*argv, "train.stop_at_epoch=1"]) or 130  # bs stopped after epoch 1
    assert args.func(args) == 130
    pack = tmp_path / "carry" / "shared.tar.gz"
    assert main(["study", str(study), "--out", str(here), "--pack", str(pack)]) == 0
    assert "1 finished runs (records only), 1 to continue" in capsys.readouterr().out
    with tarfile.open(pack) as tar:
        names = set(tar.getnames())
    assert {"bs/seed0/checkpoints/last.pt", "bs/seed0/metrics.csv", "ce/seed0/metrics.json",
            "ce/seed0/study_run.json", ".claims/bs/seed0.started"} <= names
    assert not [name for name in names if name.endswith((".lock", ".claim"))]  # this machine's locks stay here
    assert [name for name in names if name.endswith(".pt")] == ["bs/seed0/checkpoints/last.pt"]  # no finished weights
    assert main(["study", str(study), "--out", str(here), "--pack", str(pack)]) == 2  # never over a pack
    assert "exists" in capsys.readouterr().err

    assert main(["study", str(study), "--out", str(there), "--unpack", str(pack)]) == 0
    assert "1 finished runs, 1 to continue" in capsys.readouterr().out
    for out in (there, here):  # the carried study, and the original continued where it stands
        assert main(["study", str(study), "--out", str(out)]) == 0
    assert _trainings(there / "ce" / "seed0") == 1   # finished: not trained again
    assert "resumed from epoch 1" in (there / "bs" / "seed0" / "train.log").read_text()
    def numbers(run):  # the run's results, not the machine's timings
        with (run / "metrics.csv").open() as handle:
            epochs = [{k: v for k, v in row.items() if k not in ("epoch_seconds", "images_per_second")}
                      for row in csv.DictReader(handle)]
        return json.loads((run / "metrics.json").read_text())["last"], epochs
    assert numbers(there / "bs" / "seed0") == numbers(here / "bs" / "seed0")  # as if it had never moved
    # the continued study differs from its pack now: unpacking over it is refused, nothing is overwritten
    before = (there / "bs" / "seed0" / "metrics.csv").read_bytes()
    assert main(["study", str(study), "--out", str(there), "--unpack", str(pack)]) == 2
    assert "differ from the ones in" in capsys.readouterr().err
    assert (there / "bs" / "seed0" / "metrics.csv").read_bytes() == before


def test_status_tells_where_each_run_stands_from_the_folders_alone(tmp_path, capsys, one_thread):
    """`--status` on a study with a finished run, a run stopped in its stage-2 step, one stopped in
    stage 1, one held by a live process, and one not started: each line says which, and at what epoch."""
    from longtail.cli import build_parser
    from longtail.engine.rundir import release, try_claim
    stage2 = [{"overrides": ["stage2.method=crt", "stage2.epochs=3"], "name": "crt"}]
    study = _small_study(tmp_path, seeds=[0, 1, 2], overrides=[
        "train.epochs=2", "data.batch_size=64", "data.val_fraction=0.2", "model.params.hidden=[32]"],
        recipes=[{"name": "ce", "config": str(REPO / "configs" / "digits_lt" / "ce.yaml"), "stage2": stage2}])
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "--max-runs", "1"]) == 0        # ce/seed0 finished

    def stop_early(argv):  # seed1 stops after its stage-2 step's first epoch
        if argv[0] == "stage2":
            return main([*argv[:2], "stage2.stop_at_epoch=1", *argv[2:]]) or 130
        return main(argv)
    args = build_parser().parse_args(["study", str(study), "--out", str(out), "--max-runs", "1"])
    args.run_command = stop_early
    assert args.func(args) == 130
    (seed2,) = [run for run in plan_runs(load_study(study), study, out) if run.seed == 2]
    assert main([*seed2.steps[0].argv, "train.stop_at_epoch=1"]) == 0                  # seed2 stopped in stage 1
    capsys.readouterr()

    assert main(["study", str(study), "--out", str(out), "--status"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"study shared ({out}): 1 of 3 runs finished")
    assert lines[1].startswith("  ce/seed0: finished 20")
    assert lines[2].startswith("  ce/seed1: stopped") and "step 2 of 2, stage 2 crt at epoch 1 of 3, " in lines[2]
    assert " s an epoch, " in lines[2] and "left in it" in lines[2]
    assert lines[3].startswith("  ce/seed2: stopped") and "step 1 of 2, stage 1 at epoch 1 of 2" in lines[3]
    assert lines[3].endswith("; 1 step after it")
    assert not (out / "ce" / "seed2" / "metrics.json").exists()                         # --status changed nothing

    claim = try_claim(seed2.claim_file)  # a study process working on seed2
    try:
        assert main(["study", str(study), "--out", str(out), "--status"]) == 0
        assert f"  ce/seed2: running (pid {os.getpid()} on " in capsys.readouterr().out
    finally:
        release(claim)
    fresh = plan_runs(load_study(study), study, out / "fresh")
    assert main(["study", str(study), "--out", str(out / "fresh"), "--status"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [f"  ce/seed{k}: not started" for k in range(3)]
    claim = try_claim(fresh[0].claim_file)  # claimed, nothing written yet
    try:
        assert main(["study", str(study), "--out", str(out / "fresh"), "--status"]) == 0
        assert "; step 1 of 2, `longtail train` next; 1 step after it" in capsys.readouterr().out.splitlines()[1]
    finally:
        release(claim)


def test_a_recipe_started_from_another_trains_only_the_epochs_after_it(tmp_path, capsys, one_thread):
    """Two lr decays that part at epoch 2 of 3: the second recipe starts from the first's kept epoch 2
    and ends with the weights it would have trained whole; a source finished before the start was
    planned is kept (the kept epochs change no result) but cannot serve it, which is said by name."""
    decay = ["train.epochs=3", "data.batch_size=64", "model.params.hidden=[32]", "optim.lr=0.05",
             "schedule.name=step", "schedule.milestones=[2]"]
    ce = str(REPO / "configs" / "digits_lt" / "ce.yaml")
    first = {"name": "decay10", "config": ce}
    second = {"name": "decay100", "config": ce, "overrides": ["schedule.gamma=0.01"],
              "start_from": {"recipe": "decay10", "epoch": 2}}
    study = _small_study(tmp_path, seeds=[0], overrides=decay, recipes=[first, second])
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out)]) == 0
    source, started = out / "decay10" / "seed0", out / "decay100" / "seed0"
    assert main(["study", str(study), "--out", str(out), "--status"]) == 0
    assert "decay100/seed0: finished" in capsys.readouterr().out
    pending = _small_study(tmp_path, seeds=[0], overrides=decay, recipes=[first, second])
    assert main(["study", str(pending), "--out", str(tmp_path / "pending"), "--status"]) == 0
    assert "decay100/seed0: not started; starts from decay10/seed0's epoch2.pt (not kept yet)" in capsys.readouterr().out
    assert (source / "checkpoints" / "epoch2.pt").is_file()
    assert json.loads((started / "started_from.json").read_text())["checkpoint"] == str(source / "checkpoints" / "epoch2.pt")
    log = (started / "train.log").read_text()
    assert "stage 1 epoch 3/3" in log and "stage 1 epoch 1/3" not in log
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    records = {r["recipe"]: r for r in json.loads((tmp_path / "report" / "report.json").read_text())}
    assert records["decay100"]["started_from"] == {"run": str(source), "epochs": 2}
    assert records["decay10"]["started_from"] is None
    assert main(["train", ce, *decay, "schedule.gamma=0.01", f"output_dir={tmp_path / 'whole'}", "name=run"]) == 0
    whole = load_checkpoint(tmp_path / "whole" / "run")["model"]
    assert all(torch.equal(whole[k], v) for k, v in load_checkpoint(started)["model"].items())
    # a start from a recipe listed after it is refused before anything trains
    later = _small_study(tmp_path, seeds=[0], overrides=decay, recipes=[second, first])
    assert main(["study", str(later), "--out", str(tmp_path / "later")]) == 2
    assert "start_from.recipe 'decay10' must name a recipe listed before it" in capsys.readouterr().err
    # the source trained before the start was planned: kept as it is, and the start says why it cannot begin
    alone = _small_study(tmp_path, seeds=[0], overrides=decay, recipes=[first])
    assert main(["study", str(alone), "--out", str(tmp_path / "old")]) == 0
    both = _small_study(tmp_path, seeds=[0], overrides=decay, recipes=[first, second])
    assert main(["study", str(both), "--out", str(tmp_path / "old")]) == 2
    assert "which " + str(tmp_path / "old" / "decay10" / "seed0") + " did not keep" in capsys.readouterr().err
    assert _trainings(tmp_path / "old" / "decay10" / "seed0") == 1


def test_a_pack_carries_the_checkpoint_a_later_recipe_starts_from(tmp_path, capsys, one_thread):
    """The source finished on one machine, the recipe that starts from it not begun: the pack keeps the
    source's kept epoch (its other weights stay out), and the unpacked study starts the second recipe."""
    import tarfile
    decay = ["train.epochs=2", "data.batch_size=64", "model.params.hidden=[32]", "schedule.name=step",
             "schedule.milestones=[1]"]
    ce = str(REPO / "configs" / "digits_lt" / "ce.yaml")
    study = _small_study(tmp_path, seeds=[0], overrides=decay, recipes=[
        {"name": "decay10", "config": ce},
        {"name": "decay100", "config": ce, "overrides": ["schedule.gamma=0.01"],
         "start_from": {"recipe": "decay10", "epoch": 1}}])
    here, there, pack = tmp_path / "here", tmp_path / "there", tmp_path / "carry.tar.gz"
    assert main(["study", str(study), "--out", str(here), "--max-runs", "1"]) == 0
    assert main(["study", str(study), "--out", str(here), "--pack", str(pack)]) == 0
    with tarfile.open(pack) as tar:
        assert [name for name in tar.getnames() if name.endswith(".pt")] == ["decay10/seed0/checkpoints/epoch1.pt"]
    assert main(["study", str(study), "--out", str(there), "--unpack", str(pack)]) == 0
    assert main(["study", str(study), "--out", str(there)]) == 0
    assert "started from" in (there / "decay100" / "seed0" / "train.log").read_text()
    assert _trainings(there / "decay10" / "seed0") == 1
