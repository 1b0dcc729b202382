"""The reproduction records (``report.json``, benchmarks/reproduction.py): each number is the run's
own, in percent, beside the published one of the same setting, with the wall time the run's log shows."""
import csv
import math
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from longtail.cli import main
from longtail.report.records import best_on_test, learning_curve, wall_hours

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"method", "paper", "paper_top1", "top1", "many", "medium", "few", "ece", "epochs", "seed", "commit",
            "date", "hours", "ece_paper"}


def _benchmark_script(name: str):
    """A script of benchmarks/ (not a package) as a module."""
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _reproduction_script():
    return _benchmark_script("reproduction")


def test_wall_hours_leave_out_the_time_between_a_stop_and_the_resume(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-12-06 10:00:00,000 run r | 100 training images in 10 classes\n"
        "2026-12-06 10:10:00,000 stage 1 epoch 1/3 loss 1.0\n"
        "2026-12-06 10:25:30,500 stage 1 epoch 2/3 loss 0.9\n"
        "Traceback (most recent call last):\n"          # not a log line: skipped
        "2026-12-06 18:00:00,000 run r | 100 training images in 10 classes\n"   # resumed hours later
        "2026-12-06 18:00:01,000 stage 1: resumed from epoch 2; continuing at epoch 3\n"
        "2026-12-06 18:20:01,000 stage 1 epoch 3/3 loss 0.8\n")
    # 25 min 30.5 s before the stop, 20 min 1 s after it
    assert wall_hours(log) == pytest.approx((25 * 60 + 30.5 + 20 * 60 + 1) / 3600)
    assert wall_hours(tmp_path / "missing.log") is None


def test_a_recipes_own_stage_2_is_timed_apart_from_its_stage_1(tmp_path):
    log = tmp_path / "train.log"
    log.write_text(
        "2026-12-06 10:00:00,000 run r | 100 training images in 10 classes\n"
        "2026-12-06 10:30:00,000 stage 1, last epoch: top-1 50.00\n"
        "2026-12-06 10:31:00,000 stage 2: crt on r/checkpoints/last.pt (1 head(s), images features)\n"
        "2026-12-06 10:36:00,000 stage 2 (crt) epoch 1/1 loss 0.9\n"
        "2026-12-06 10:36:30,000 done: r\n")
    assert wall_hours(log, "stage 1") == pytest.approx(0.5)
    assert wall_hours(log, "stage 2") == pytest.approx(5.5 / 60)
    assert wall_hours(log) == pytest.approx(0.5 + 5.5 / 60)  # the minute before "stage 2: " is not counted (a stage-2 command starts so)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory, one_thread):
    """A 3-epoch Digits-LT study evaluated every epoch, with a cRT stage 2 and TS, and its records
    against a papers file whose CE entry matches the setting."""
    root = tmp_path_factory.mktemp("reproduction")
    study = root / "study.yaml"
    study.write_text(yaml.safe_dump({
        "name": "repro", "seeds": [0],
        "overrides": ["train.epochs=3", "train.eval_every=1", "data.batch_size=64", "data.val_fraction=0.2"],
        "recipes": [{"name": "ce", "config": str(REPO / "configs" / "digits_lt" / "ce.yaml"),
                     "stage2": [{"overrides": ["stage2.method=crt", "stage2.epochs=2"]}],
                     "calibrate": [{"method": "ts"}]}]}))
    out = root / "runs"
    assert main(["study", str(study), "--out", str(out)]) == 0
    config = yaml.safe_load((out / "ce" / "seed0" / "config.yaml").read_text())
    papers = root / "papers.yaml"
    papers.write_text(yaml.safe_dump({"entries": [{
        "paper": "P (A et al., 2020)", "seed_file": None, "table": "T1", "row": "CE", "selection": "last epoch",
        "setting": {"data.dataset": config["data"]["dataset"], "data.imbalance_factor": config["data"]["imbalance_factor"],
                    "model.name": config["model"]["name"], "train.epochs": 3,
                    "data.val_fraction": 0.2},  # the run holds 20 % out, so must the entry
        "method": {"loss.name": "ce", "stage2.method": None}, "metrics": {"top1": 80.0, "ece": 5.0}}]}))
    results = root / "results"
    assert _reproduction_script().main([str(out), "--name", "reproduction_t", "--results", str(results), "--papers", str(papers)]) == 0
    records = json.loads((results / "reproduction_t.json").read_text())
    return out / "ce" / "seed0", records, results / "reproduction_t", papers


def test_each_record_is_its_runs_numbers_in_percent_beside_the_matching_paper(reproduced):
    run, records, _, _ = reproduced
    by_method = {r["method"]: r for r in records}
    assert set(by_method) == {"ce", "ce · crt"}
    for record in records:
        assert REQUIRED <= set(record)
    for method, folder in (("ce", run), ("ce · crt", run / "stage2_crt")):
        test = json.loads((folder / "metrics.json").read_text())["last"]["test"]
        record = by_method[method]
        for key, metric in (("top1", "top1"), ("many", "many_top1"), ("medium", "medium_top1"), ("few", "few_top1"),
                            ("ece", "ece")):
            expected = None if test[metric] is None else pytest.approx(100 * test[metric], abs=1e-4)
            assert record[key] == expected, (method, key)  # Digits-LT has no many-shot class: None
        assert record["seed"] == 0 and record["epochs"] == 3
    ce, crt = by_method["ce"], by_method["ce · crt"]
    assert (ce["paper"], ce["paper_top1"], ce["ece_paper"]) == ("P (A et al., 2020)", 80.0, 5.0)
    assert ce["gap_top1"] == pytest.approx(ce["top1"] - 80.0, abs=1e-3)
    assert crt["paper"] is None and crt["stage2_epochs"] == 2  # a stage 2 is not the paper's stage-1 row
    ts = json.loads((run / "calibration" / "ts" / "metrics.json").read_text())["after"]["ece"]
    assert ce["ece_after"] == {"ts": pytest.approx(100 * ts, abs=1e-4)}
    env = json.loads((run / "env.json").read_text())["git"]
    assert ce["commit"] == (env["commit"] + ("-dirty" if env["dirty"] else "") if env.get("commit") else None)
    assert 0 < ce["hours"] < 1 and crt["stage2_hours"] > 0
    assert crt["hours"] == pytest.approx(ce["hours"] + crt["stage2_hours"], abs=2e-6)  # stage 1 + its stage 2
    assert crt["run"] == "ce/seed0/stage2_crt"
    with (run / "metrics.csv").open() as handle:  # the best evaluated test epoch, beside (never instead of) the last
        evaluated = [(100 * float(line["test_top1"]), int(line["epoch"])) for line in csv.DictReader(handle)
                     if line.get("test_top1")]
    best = max(evaluated, key=lambda pair: pair[0])
    assert (ce["best_test_top1"], ce["best_test_epoch"]) == (pytest.approx(best[0], abs=1e-4), best[1])


def test_best_on_test_is_the_highest_evaluated_epoch(tmp_path):
    (tmp_path / "metrics.csv").write_text("epoch,train_loss,test_top1,test_ece\n5,1.0,0.30,0.1\n6,0.9,,\n"
                                          "10,0.8,0.50,0.1\n15,0.7,0.40,0.1\n")
    assert best_on_test(tmp_path) == (50.0, 10)
    assert best_on_test(tmp_path / "missing") == (None, None)


def test_run_files_and_learning_curves_are_kept(reproduced):
    run, _, kept, _ = reproduced
    for relative in ("metrics.csv", "metrics.json", "config.yaml", "stage2_crt/metrics.json", "calibration/ts/metrics.json"):
        assert (kept / "ce" / "seed0" / relative).read_bytes() == (run / relative).read_bytes(), relative
    assert (kept / "learning_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = learning_curve(run)
    with (run / "metrics.csv").open() as handle:
        expected = [100 * float(row["test_top1"]) for row in csv.DictReader(handle)]
    assert curve["epoch"] == [1, 2, 3] and curve["top1"] == pytest.approx(expected)


def test_report_writes_the_same_records(reproduced, tmp_path):
    run, records, _, papers = reproduced
    study = run.parent.parent
    assert main(["report", str(study), "--out", str(tmp_path / "report"), "--papers", str(papers)]) == 0
    reported = json.loads((tmp_path / "report" / "report.json").read_text())
    for record in reported:
        record["run"] = str(Path(record["run"]).relative_to(study))
    assert reported == [{k: v for k, v in record.items() if k != "study"} for record in records]
    assert (tmp_path / "report" / "learning_curves.png").is_file()
    text = (tmp_path / "report" / "report.md").read_text()
    assert "2 comparison(s) (a pair of groups on one metric) rest on a single shared seed" in text
    assert "| ce | ce · crt |" not in text and "cannot tell (" not in text


def test_report_reads_kept_runs_as_the_seeds_of_their_recipe(reproduced, tmp_path, capsys):
    """The kept copies outlive their study folders (another session's machine): `longtail report` on
    the results folder groups them by recipe, so mean ± std over seeds needs no study folder."""
    _, _, kept, papers = reproduced
    results = tmp_path / "kept"
    shutil.copytree(kept / "ce" / "seed0", results / "ce" / "seed0")
    second = results / "ce" / "seed1"  # a second seed: the same files, seed 1, 10 points lower
    shutil.copytree(kept / "ce" / "seed0", second)
    config = yaml.safe_load((second / "config.yaml").read_text())
    (second / "config.yaml").write_text(yaml.safe_dump({**config, "seed": 1}))
    metrics = json.loads((second / "metrics.json").read_text())
    first_top1 = metrics["last"]["test"]["top1"]
    metrics["last"]["test"]["top1"] = first_top1 - 0.1
    (second / "metrics.json").write_text(json.dumps(metrics))
    assert main(["report", str(results), "--out", str(tmp_path / "report"), "--papers", str(papers)]) == 0
    summary = (tmp_path / "report" / "report.md").read_text()
    row = next(line for line in summary.splitlines() if line.startswith("| ce | "))
    assert row.startswith(f"| ce | 2 | {100 * first_top1 - 5:.2f} ± 7.07 |")
    assert "| ce · crt | 2 |" in summary
    # two shared seeds: the paired difference is listed; with one (the study alone) it is counted, not listed
    assert "| ce | ce · crt | top-1 | 2 |" in summary and "comparison(s)" not in summary
    assert main(["report", str(tmp_path / "report"), "--out", str(tmp_path / "nothing")]) != 0
    assert "nor a folder of kept runs" in capsys.readouterr().err


def test_two_studies_make_one_set_of_rows_and_colliding_runs_are_refused(reproduced, tmp_path):
    """A study continued from a later commit under another name is reported with the first; each record
    names its study, and a run both studies hold (same recipe and seed) is refused, not overwritten."""
    run, records, _, papers = reproduced
    first = run.parent.parent
    later = tmp_path / "later.yaml"
    later.write_text(yaml.safe_dump({
        "name": "later", "seeds": [0], "overrides": ["train.epochs=1", "train.eval_every=1", "data.batch_size=64"],
        "recipes": [{"name": "ce_later", "config": str(REPO / "configs" / "digits_lt" / "ce.yaml")}]}))
    second = tmp_path / "later_runs"
    assert main(["study", str(later), "--out", str(second)]) == 0
    script = _reproduction_script()
    results = tmp_path / "results"
    assert script.main([str(first), str(second), "--name", "both", "--results", str(results),
                        "--papers", str(papers)]) == 0
    both = {r["method"]: r for r in json.loads((results / "both.json").read_text())}
    assert set(both) == {"ce", "ce · crt", "ce_later"}
    assert {(r["study"], r["run"]) for r in both.values()} == {
        (first.name, "ce/seed0"), (first.name, "ce/seed0/stage2_crt"), (second.name, "ce_later/seed0")}
    for method in ("ce", "ce · crt"):  # the first study's rows are what it gives alone
        assert both[method] == next(r for r in records if r["method"] == method)
    assert (results / "both" / "ce_later" / "seed0" / "metrics.json").read_bytes() == (
        second / "ce_later" / "seed0" / "metrics.json").read_bytes()
    # one study at a time, into the same results: the rows of a study not given now are kept from its copies,
    # and with its folder gone (the machine that trained it is) a rebuild from the copies gives them back
    step_by_step = tmp_path / "step_by_step"
    assert script.main([str(first), "--name", "both", "--results", str(step_by_step), "--papers", str(papers)]) == 0
    assert script.main([str(second), "--name", "both", "--results", str(step_by_step), "--papers", str(papers)]) == 0
    shutil.rmtree(second)
    assert script.main(["--name", "both", "--results", str(step_by_step), "--papers", str(papers)]) == 0
    rebuilt = {r["method"]: r for r in json.loads((step_by_step / "both.json").read_text())}
    assert rebuilt == both
    copy = tmp_path / "copy_of_first"
    shutil.copytree(first, copy)
    with pytest.raises(SystemExit, match="ce/seed0 is a run of both"):
        script.main([str(first), str(copy), "--name", "clash", "--results", str(results), "--papers", str(papers)])
    assert not (results / "clash.json").exists()
    with pytest.raises(SystemExit, match="ce/seed0 is a run of both"):  # a run kept from another study before
        script.main([str(copy), "--name", "both", "--results", str(step_by_step), "--papers", str(papers)])


def _parity_script():
    return _benchmark_script("precision_parity")


def test_precision_parity_pairs_each_bf16_row_with_its_fp32_row_of_the_same_stage_and_seed(capsys):
    def record(method, seed, top1, ts=None):
        return {"method": method, "seed": seed, "top1": top1, "many": None, "medium": None, "few": None,
                "ece": 10.0, "ece_after": {"ts": ts} if ts is not None else {}}
    records = [record("ce_bf16", 0, 30.0, ts=5.0), record("ce_fp32", 0, 29.0, ts=6.0),
               record("ce_bf16", 1, 28.0, ts=5.5), record("ce_fp32", 1, 28.5, ts=6.0),
               record("ce_bf16 · crt", 0, 40.0), record("ce_fp32 · crt", 0, 37.0),
               record("ce_bf16 · crt", 1, 41.0), record("ce_fp32 · crt", 1, 38.0),
               record("ce_fp32", 2, 99.0)]  # no bf16 partner: left out
    rows = {(row[0], row[1]): row for row in _parity_script().parity_rows(records)}
    assert rows[("ce", "top1")][2:4] == ["+1.00 -0.50", "+0.25"]        # bf16 − fp32, seed by seed
    assert rows[("ce", "ece_after_ts")][2:4] == ["-1.00 -0.50", "-0.75"]
    assert rows[("ce · crt", "top1")][3] == "+3.00" and rows[("ce · crt", "top1")][5] == "outside noise"
    pooled = rows[("all paths (4 pairs)", "top1")]
    assert pooled[3] == "+1.62" and pooled[5] == "within noise"        # (1 − 0.5 + 3 + 3) / 4
    assert ("ce", "many") not in rows                                   # no value, no row


def test_authors_curve_lines_our_stage_1_and_2_epochs_up_with_the_authors_log(reproduced, tmp_path, capsys):
    """SHIKE's authors keep their training log; our curve, stage 2 counted on from stage 1, is compared
    epoch by epoch (the per-batch 'Test:' lines are not epoch summaries)."""
    run, _, _, _ = reproduced
    stage2 = next(run.glob("stage2_*"))
    authors = [10.0, 20.0, 30.0, 40.0, 50.0]  # 3 stage-1 epochs, then stage 2's 2 as epochs 4 and 5
    log = tmp_path / "authors.log"
    log.write_text("".join(f"Test: [ 0/79]\tTime  0.6\tLoss 2.0e+00\tAcc@1  99.00 ( 99.00)\tAcc@5 99.0\n"
                           f" * Acc@1 {value:.3f} Acc@5 60.000\n" for value in authors))
    script = _benchmark_script("authors_curve")
    assert script.authors_top1(log.read_text()) == authors
    plot = tmp_path / "curve.png"
    assert script.main([str(log), str(run), "--stage2", stage2.name, "--plot", str(plot)]) == 0
    ours = [100 * float(line["test_top1"]) for line in csv.DictReader((run / "metrics.csv").open())]
    ours.append(100 * json.loads((stage2 / "metrics.json").read_text())["last"]["test"]["top1"])  # scored at its end
    authors_at = [10.0, 20.0, 30.0, 50.0]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(line.split("|")[1]) for line in rows] == [1, 2, 3, 5]
    assert [int(line.split("|")[2]) for line in rows] == [1, 1, 1, 2]
    assert [float(line.split("|")[5]) for line in rows] == pytest.approx(
        [mine - theirs for mine, theirs in zip(ours, authors_at)], abs=0.006)
    assert plot.stat().st_size > 0
    with pytest.raises(SystemExit):
        script.main([str(log), str(run), "--stage2", "stage2_missing"])


def test_bbn_diagnosis_mixes_the_branches_as_bbn_trains_and_tests():
    """benchmarks/bbn_diagnosis.py: a = 1/2 is the model's own test logits W [f_c ; f_r] + b, a = 1 and
    a = 0 leave one branch alone (its features doubled, as BBN trains with 2 a f_c)."""
    diagnosis = _benchmark_script("bbn_diagnosis")
    generator = torch.Generator().manual_seed(0)
    features, weight, bias = (torch.randn(6, 8, generator=generator), torch.randn(3, 8, generator=generator),
                              torch.randn(3, generator=generator))
    torch.testing.assert_close(diagnosis.mixed_logits(features, weight, bias, 0.5),
                               torch.nn.functional.linear(features, weight, bias))
    torch.testing.assert_close(diagnosis.mixed_logits(features, weight, bias, 1.0),
                               2 * features[:, :4] @ weight[:, :4].T + bias)
    torch.testing.assert_close(diagnosis.mixed_logits(features, weight, bias, 0.0),
                               2 * features[:, 4:] @ weight[:, 4:].T + bias)
    # by hand: f_c votes for class 0, f_r for class 1; the branch with the larger weight wins
    features, weight = torch.tensor([[1.0, 0.0, 1.5, 0.0]]), torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0]])
    assert diagnosis.mixed_logits(features, weight, torch.zeros(2), 0.25).tolist() == [[0.5, 2.25]]
    assert diagnosis.mixed_logits(features, weight, torch.zeros(2), 0.75).tolist() == [[1.5, 0.75]]
    # a checkpoint written after the 100th epoch (index 99) of 200 trained its last epoch at 1 - (99/200)^2
    assert diagnosis.trained_alpha({"epoch": 99}, 200) == pytest.approx(0.754975)


def test_grad_precision_compares_each_parameters_two_gradients_per_module():
    """benchmarks/grad_precision.py: cosine and norm ratio of the bfloat16 gradient against float32's,
    grouped by top-level module (each head on its own)."""
    script = _benchmark_script("grad_precision")
    assert [script.module_of(n) for n in ("stem.0.weight", "shared.1.0.conv1.weight", "heads.2.weight")] == [
        "stem", "shared", "heads.2"]
    float32 = {"stem.0.weight": torch.tensor([1.0, 0.0]), "heads.0.weight": torch.tensor([[3.0, 4.0]])}
    bfloat16 = {"stem.0.weight": torch.tensor([0.0, 2.0]), "heads.0.weight": torch.tensor([[6.0, 8.0]])}
    rows = script.compare(float32, bfloat16)
    assert rows["stem"] == [(pytest.approx(0.0), pytest.approx(2.0))]  # orthogonal, twice as long
    assert rows["heads.0"] == [(pytest.approx(1.0), pytest.approx(2.0))]  # same direction, doubled


def test_ikl_diagnosis_measures_soft_label_structure_and_prior_shift():
    """benchmarks/ikl_diagnosis.py's two measures on hand-made inputs: the superclass share of the
    off-target mass, and top-1 after subtracting t * log prior."""
    diagnosis = _benchmark_script("ikl_diagnosis")
    names = [n for fines in diagnosis.SUPERCLASSES.values() for n in fines.split()]
    same = diagnosis.same_superclass(names)
    assert same.shape == (100, 100) and same.sum(1).tolist() == [4] * 100 and not same.diagonal().any()
    assert diagnosis.same_superclass(["cat", "dog"]) is None
    # uniform smoothing: the share is 4/99, the entropy ln 99
    uniform = torch.full((100, 100), 0.5 / 99).fill_diagonal_(0.5)
    row = diagnosis.label_structure(uniform, same)
    assert row["target_mass"] == pytest.approx(0.5)
    assert row["same_superclass_share"] == pytest.approx(4 / 99)
    assert row["off_target_entropy_nats"] == pytest.approx(math.log(99), abs=1e-5)
    # all off-target mass on the superclass: share 1, entropy ln 4
    focused = (same.float() * 0.1).fill_diagonal_(0.6)
    row = diagnosis.label_structure(focused, same)
    assert row["same_superclass_share"] == pytest.approx(1.0) and row["off_target_entropy_nats"] == pytest.approx(math.log(4))
    # prior shift: class 0 (count 150) wins by 1 nat on every image; subtracting log(150/10) = 2.7 nats
    # moves all to class 1, so at t = 1 the class-1 images are right and the class-0 images wrong
    logits = torch.tensor([[1.0, 0.0]] * 4)
    targets = torch.tensor([0, 0, 1, 1])
    rows = diagnosis.prior_shift(logits, targets, [150, 10])
    assert rows["0"]["top1"] == 50.0 and rows["1"]["top1"] == 50.0
    assert rows["0"]["few"] == 0.0 and rows["1"]["few"] == 100.0 and rows["1"]["many"] == 0.0
