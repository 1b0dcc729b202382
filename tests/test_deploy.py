"""Using a trained run on a real (tiny) Digits-LT run: ``longtail predict`` (the test images written out
as PNG files give ``longtail eval``'s predictions; a corrupt file is reported and skipped), ``longtail
export`` (TorchScript / ONNX files give the run's logits) and ``longtail eval --shifts``."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from longtail.calibration import load_calibrator
from longtail.cli import main
from longtail.runs import load_run
from longtail.engine import builders
from longtail.engine.predict import predict


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    # float32: bfloat16 rounding depends on the batch shape, and predict batches differently from eval
    assert main(["train", f"output_dir={root}", "train.epochs=4", "data.val_fraction=0.2", "train.amp=none"]) == 0
    assert main(["calibrate", str(root / "digits_lt_ce"), "--method", "ts"]) == 0
    return root / "digits_lt_ce"


@pytest.fixture(scope="module")
def test_images(run, tmp_path_factory):
    """The run's balanced test set as PNG files test/<class>/<index>.png, plus eval's logits of it."""
    loaded = load_run(run)
    folder = tmp_path_factory.mktemp("images")
    for index, (image, label) in enumerate(zip(loaded.bundle.test.images, loaded.bundle.test.targets.tolist())):
        (folder / str(label)).mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(folder / str(label) / f"{index:04d}.png")
    loader = builders.eval_loader(loaded.config, loaded.bundle.test, loaded.augment.normalize, loaded.dist_info)
    outputs = predict(loaded.model, loader, loaded.dist_info, len(loaded.bundle.test))
    return folder, outputs["logits"]


def _read_csv(path):
    with open(path) as file:
        return list(csv.DictReader(file))


def test_predict_equals_eval_on_the_test_images(run, test_images, tmp_path, capsys):
    folder, eval_logits = test_images
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), str(folder), "--out", str(out), "--top-k", "3", "--workers", "0"]) == 0
    rows = _read_csv(out)
    assert len(rows) == len(eval_logits)
    index = [int(row["path"].rsplit("/", 1)[1][:4]) for row in rows]
    probs = eval_logits[index].softmax(1)
    top = probs.topk(3, dim=1)
    assert [row["class_1"] for row in rows] == [str(c) for c in top.indices[:, 0].tolist()]
    got = torch.tensor([[float(row[f"prob_{i}"]) for i in (1, 2, 3)] for row in rows])
    torch.testing.assert_close(got, top.values, atol=1e-5, rtol=0)
    assert all(row["calibrated"] == "False" for row in rows)
    # and the same top-1 accuracy as `longtail eval` reports
    assert main(["eval", str(run)]) == 0
    metrics = json.loads(next((run / "evals").glob("*/metrics.json")).read_text())
    correct = np.mean([row["class_1"] == row["path"].rsplit("/", 2)[1] for row in rows])
    assert correct == pytest.approx(metrics["last"]["test"]["top1"], abs=1e-6)  # float32 mean


def test_corrupt_file_is_reported_and_skipped(run, test_images, tmp_path, capsys):
    folder, eval_logits = test_images
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    good = sorted(folder.rglob("*.png"))[:3]
    listing = tmp_path / "inputs.txt"
    listing.write_text("\n".join(str(p) for p in good[1:]) + "\n")
    out = tmp_path / "preds.jsonl"
    assert main(["predict", str(run), str(good[0]), str(bad), str(listing), "--out", str(out),
                 "--calibrated", "--workers", "0"]) == 0
    err = capsys.readouterr().err
    assert f"skipped {bad}" in err and "cannot decode image" in err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["path"] for row in rows] == [str(p) for p in good]
    assert all(row["calibrated"] and row["calibrator"] == "ts" for row in rows)
    # the calibrated probabilities are the saved calibrator's on eval's logits
    calibrator = load_calibrator(run / "calibration" / "ts" / "calibrator.pt")
    index = int(good[0].stem)
    expected = calibrator.predict_proba(eval_logits[index:index + 1])[0].max()
    assert rows[0]["top_k"][0]["probability"] == pytest.approx(float(expected), abs=1e-5)
    assert len(rows[0]["top_k"]) == 5


def test_predict_input_errors_are_clear(run, tmp_path, capsys):
    assert main(["predict", str(run), str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(run), str(tmp_path), "--calibrator", "vs"]) == 2
    assert "no calibrator 'vs'" in capsys.readouterr().err


def test_eval_shifts_writes_table_plot_and_em_helps_under_shift(run, capsys):
    assert main(["eval", str(run), "shifts.imbalance_factors=[2,10]", "--shifts"]) == 0
    out = next((run / "evals").glob("shifts_last*"))
    result = json.loads((out / "shifts.json").read_text())
    assert (out / "shifts.png").stat().st_size > 0 and (out / "table.md").is_file()
    rows = {(r["direction"], r["imbalance_factor"], r["variant"]): r for r in result["rows"]}
    variants = {r["variant"] for r in result["rows"]}
    assert variants == {f"{v}{c}" for v in ("raw", "ts") for c in ("", " + EM prior", " + true prior")}
    assert {(d, f) for d, f, _ in rows} == {("balanced", 1.0), *((d, f) for d in ("forward", "backward")
                                                                  for f in (2.0, 10.0))}
    # backward-LT at IF 10: the tail dominates; the true prior can only help a calibrated model's top-1
    assert rows[("backward", 10.0, "ts + true prior")]["top1"] >= rows[("backward", 10.0, "ts")]["top1"]
    estimate = rows[("backward", 10.0, "ts + EM prior")]["estimated_prior"]
    assert len(estimate) == 10 and sum(estimate) == pytest.approx(1.0)
    assert rows[("backward", 10.0, "raw")]["num_samples"] == sum(int(50 * 10 ** (-i / 9)) for i in range(10))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_export_matches_the_run_on_real_images(run, test_images, tmp_path, fmt):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime", reason="ONNX export is checked only where onnxruntime is installed")
    from longtail.commands.export import load_export
    _, eval_logits = test_images
    images = load_run(run).bundle.test.images.float()
    for calibrated in (False, True):
        out = tmp_path / f"model_{calibrated}.{'pt' if fmt == 'torchscript' else 'onnx'}"
        assert main(["export", str(run), "--format", fmt, "--out", str(out)] + (["--calibrated"] * calibrated)) == 0
        forward, info = load_export(out)
        temperature = load_calibrator(run / "calibration" / "ts" / "calibrator.pt").temperature if calibrated else 1.0
        torch.testing.assert_close(forward(images), eval_logits / temperature, atol=1e-4, rtol=0)
        assert info["class_names"] == [str(d) for d in range(10)] and info["image_size"] == 8
        assert info["calibrator"] == ("ts" if calibrated else None)
        assert len(info["mean"]) == len(info["std"]) == 1


def test_export_refuses_a_calibrator_it_cannot_fold(run, capsys):
    assert main(["calibrate", str(run), "--method", "iso"]) == 0
    assert main(["export", str(run), "--format", "torchscript", "--calibrator", "iso"]) == 2
    assert "not an affine map" in capsys.readouterr().err


def _predict_matches_eval(run_dir, folder, tmp_path):
    """predict on 20 of the PNG test images gives the loaded run's own eval-loader probabilities."""
    loaded = load_run(run_dir)
    loader = builders.eval_loader(loaded.config, loaded.bundle.test, loaded.augment.normalize, loaded.dist_info)
    probs = predict(loaded.model, loader, loaded.dist_info, len(loaded.bundle.test))["logits"].softmax(1)
    files = sorted(folder.rglob("*.png"))[::25]
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run_dir), *map(str, files), "--out", str(out), "--top-k", "1", "--workers", "0",
                 "--force"]) == 0  # called once per run with one --out
    rows = _read_csv(out)
    index = [int(f.stem) for f in files]
    assert [row["class_1"] for row in rows] == [str(c) for c in probs[index].argmax(1).tolist()]
    torch.testing.assert_close(torch.tensor([float(row["prob_1"]) for row in rows]), probs[index].max(1).values,
                               atol=1e-5, rtol=0)


def test_predict_on_stage2_and_multi_expert_runs(run, test_images, tmp_path):
    folder, _ = test_images
    assert main(["stage2", str(run), "stage2.method=crt", "stage2.epochs=1"]) == 0
    _predict_matches_eval(run / "stage2_crt", folder, tmp_path)
    ride_root = tmp_path / "ride"
    recipe = Path(__file__).resolve().parents[1] / "configs" / "cifar10_lt" / "if100" / "ride.yaml"
    assert main(["train", str(recipe), f"output_dir={ride_root}", "data.dataset=digits_lt", "data.root=null",
                 "data.imbalance_factor=10", "data.max_count=20", "data.batch_size=32", "data.augment={}", "train.epochs=1", "train.eval_every=0",
                 "train.amp=none", "train.scale_schedule=true"]) == 0
    (ride,) = [p for p in ride_root.iterdir() if p.is_dir()]
    _predict_matches_eval(ride, folder, tmp_path)


def test_a_run_evaluated_with_tta_is_scored_with_it_everywhere(test_images, tmp_path):
    """eval.tta=flip: calibrate's "before" numbers, stage 2's and predict's probabilities are those of
    the flip-averaged logits that training's evaluation reported, not of the single view."""
    folder, _ = test_images
    root = tmp_path / "runs"
    assert main(["train", f"output_dir={root}", "name=tta", "train.epochs=2", "data.val_fraction=0.2",
                 "train.amp=none", "eval.tta=flip"]) == 0
    run = root / "tta"
    reported = json.loads((run / "metrics.json").read_text())["last"]["test"]
    assert main(["calibrate", str(run), "--method", "ts"]) == 0
    before = json.loads((run / "calibration" / "ts" / "metrics.json").read_text())["before"]
    assert before["ece"] == pytest.approx(reported["ece"], abs=1e-9)

    loaded = load_run(run)
    flipped = loaded.evaluate(loaded.bundle.test, metrics=False).outputs["logits"]
    single = loaded.evaluate(loaded.bundle.test, metrics=False, test_time_augment=False).outputs["logits"]
    assert not torch.allclose(flipped, single, atol=1e-3)  # the views differ: the test can tell them apart
    files = sorted(folder.rglob("*.png"))[::25]
    out = tmp_path / "preds.csv"
    assert main(["predict", str(run), *map(str, files), "--out", str(out), "--top-k", "1", "--workers", "0"]) == 0
    index = [int(f.stem) for f in files]
    probs = [float(row["prob_1"]) for row in _read_csv(out)]
    torch.testing.assert_close(torch.tensor(probs), flipped[index].softmax(1).max(1).values, atol=1e-5, rtol=0)

    assert main(["stage2", str(run), "stage2.method=crt", "stage2.epochs=1"]) == 0
    stage2 = json.loads((run / "stage2_crt" / "metrics.json").read_text())["last"]["test"]
    evaluated = load_run(run / "stage2_crt").evaluate(load_run(run).bundle.test).metrics
    assert stage2["top1"] == evaluated["top1"] and stage2["ece"] == pytest.approx(evaluated["ece"], abs=1e-9)
