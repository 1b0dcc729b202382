"""``longtail calibrate`` on a real (tiny) Digits-LT run with a validation split."""
import json

import pytest
import torch

from longtail.calibration import load_calibrator
from longtail.cli import main


@pytest.fixture(scope="module")
def run_with_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    assert main(["train", f"output_dir={root}", "train.epochs=6", "data.val_fraction=0.2"]) == 0
    return root / "digits_lt_ce"


@pytest.mark.parametrize("method", ["ts", "kt_ts", "iso"])
def test_calibrate_writes_calibrator_table_and_diagrams(run_with_val, method):
    assert main(["calibrate", str(run_with_val), "--method", method]) == 0
    out = run_with_val / "calibration" / method
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["rows"]) == {"uncalibrated", method}
    assert metrics["fitted_on"].startswith("validation split")
    for name in ("calibrator.pt", "table.md", "reliability_before.png", "reliability_after.png"):
        assert (out / name).is_file()
    calibrator = load_calibrator(out / "calibrator.pt")
    probs = calibrator.predict_proba(torch.randn(5, 10))
    torch.testing.assert_close(probs.sum(1), torch.ones(5, dtype=probs.dtype))
    if method in ("ts", "kt_ts"):  # temperature scaling never changes the prediction
        assert metrics["rows"][method]["top1"] == metrics["rows"]["uncalibrated"]["top1"]


def test_calibrate_params_are_checked(run_with_val, capsys):
    assert main(["calibrate", str(run_with_val), "--method", "kt_ts", "--param", "alpha=0.9"]) == 0
    assert main(["calibrate", str(run_with_val), "--method", "kt_ts", "--param", "alhpa=0.9"]) == 2
    assert "alhpa" in capsys.readouterr().err


def test_calibrate_without_validation_split_is_a_clear_error(tmp_path, capsys):
    assert main(["train", f"output_dir={tmp_path}", "train.epochs=1"]) == 0
    assert main(["calibrate", str(tmp_path / "digits_lt_ce")]) == 2
    assert "data.val_fraction=0.2" in capsys.readouterr().err
