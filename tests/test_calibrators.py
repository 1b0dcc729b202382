"""Post-hoc calibrators: they fix over-confident synthetic logits, round-trip through save/load, and
knowledge-transfer TS composes its four steps correctly."""
import numpy as np
import pytest
import torch
from sklearn.isotonic import IsotonicRegression

import longtail.calibration  # noqa: F401 - registers the calibrators
from longtail.calibration import KnowledgeTransferTS, calibration_report, head_mask_from_counts, load_calibrator
from longtail.functional import (diagonal_class_gaussians, ece, fit_temperature, kt_importance_weights, lt_counts,
                                 gp_latent_marginals, mce, nll, per_class_ece, platt_probability,
                                 softmax_expected_log_lik, whitened_gauss_kl)
from longtail.registry import CALIBRATORS, ConfigError

# Every registered calibrator runs the generic tests below on logits alone, with these parameters
# (gpc: the default 1000 L-BFGS steps take ~30 s here; 60 already calibrate), except those in
# NOT_PLAIN, covered by the tests named there. A newly registered calibrator fails
# test_every_registered_calibrator_has_test_params until it has an entry in one of the two.
CALIBRATOR_PARAMS = {"ts": {}, "vs": {}, "ets": {}, "hist": {}, "iso": {}, "ts_ir": {}, "ir_pooled": {}, "sbc": {},
                     "gpc": {"max_iter": 60}}
NOT_PLAIN = {"kt_ts": "needs features and class counts: test_kt_ts_composes_its_four_steps and below"}
PLAIN = [name for name in CALIBRATORS.names() if name not in NOT_PLAIN]
# gpc's own behaviour is tested below (temperature recovery, stationary point); its save/load round trip
# repeats a 25 s fit, so CI runs that case with the slow set
ROUND_TRIP = [pytest.param(n, marks=pytest.mark.slow) if n == "gpc" else n for n in PLAIN]


def overconfident(seed, n=3000, classes=10, factor=3.0):
    """Labels drawn from softmax(z); the model reports z * factor, so it is over-confident."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, classes, generator=g) * 1.5
    labels = torch.multinomial(z.softmax(1), 1, generator=g).squeeze(1)
    return z * factor, labels


VAL = overconfident(0)
TEST = overconfident(1)


def allowed_types_only(value):
    if isinstance(value, dict):
        return all(isinstance(k, str) and allowed_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(allowed_types_only(v) for v in value)
    return value is None or isinstance(value, (torch.Tensor, int, float, str, bool))


def test_every_registered_calibrator_has_test_params():
    assert sorted([*CALIBRATOR_PARAMS, *NOT_PLAIN]) == sorted(CALIBRATORS.names())


@pytest.mark.parametrize("name", PLAIN)
def test_calibrator_lowers_test_nll_and_ece(name):
    calibrator = CALIBRATORS.build(name, CALIBRATOR_PARAMS[name]).fit(*VAL)
    before_logits, targets = TEST
    after = calibrator.transform(before_logits)
    assert float(nll(after, targets)) < float(nll(before_logits, targets)) - 0.1
    assert float(ece(after, targets)) < 0.5 * float(ece(before_logits, targets))
    probs = calibrator.predict_proba(before_logits)
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(1), torch.ones(len(targets)))


@pytest.mark.parametrize("name", ROUND_TRIP)
def test_calibrator_round_trips_through_save_and_weights_only_load(name, tmp_path):
    calibrator = CALIBRATORS.build(name, CALIBRATOR_PARAMS[name]).fit(*VAL)
    path = calibrator.save(tmp_path / f"{name}.pt")
    assert path.is_file() and not list(tmp_path.glob(".*tmp*"))
    raw = torch.load(path, weights_only=True)
    assert raw["calibrator"] == name and allowed_types_only(raw)
    loaded = load_calibrator(path)
    assert type(loaded) is type(calibrator)
    torch.testing.assert_close(loaded.predict_proba(TEST[0]), calibrator.predict_proba(TEST[0]), rtol=0, atol=0)


def test_unfitted_calibrator_and_wrong_shapes_are_clear_errors():
    with pytest.raises(RuntimeError, match="not fitted"):
        CALIBRATORS.build("ts", {}).predict_proba(TEST[0])
    with pytest.raises(ValueError, match="fitted on 10 classes"):
        CALIBRATORS.build("ts", {}).fit(*VAL).predict_proba(TEST[0][:, :5])
    with pytest.raises(ConfigError, match="allowed: loss"):
        CALIBRATORS.build("ets", {"los": "mse"})
    with pytest.raises(ValueError, match="not 'vs'"):
        CALIBRATORS.build("vs", {}).load_state_dict(CALIBRATORS.build("ts", {}).fit(*VAL).state_dict())


def test_ts_uses_fit_temperature_and_recovers_the_factor():
    calibrator = CALIBRATORS.build("ts", {}).fit(*VAL)
    assert calibrator.temperature == fit_temperature(*VAL)
    assert calibrator.temperature == pytest.approx(3.0, rel=0.05)


def test_vs_recovers_per_class_scale_and_bias():
    logits, labels = overconfident(2, n=10000)
    scale, bias = torch.linspace(2.0, 4.0, 10), torch.linspace(-1.0, 1.0, 10)
    calibrator = CALIBRATORS.build("vs", {}).fit(logits / 3.0 * scale - bias, labels)
    torch.testing.assert_close(calibrator.scale.float(), 1 / scale, rtol=0.1, atol=0)
    fitted_bias = calibrator.bias.float() - calibrator.bias.float().mean()  # a shared shift does not change softmax
    centred = bias / scale - (bias / scale).mean()
    torch.testing.assert_close(fitted_bias, centred, atol=0.1, rtol=0)


@pytest.mark.parametrize("loss", ["mse", "nll"])
def test_ets_weights_on_simplex_and_mixture_matches_definition(loss):
    calibrator = CALIBRATORS.build("ets", {"loss": loss}).fit(*VAL)
    w = np.array(calibrator.weights)
    assert (w >= -1e-9).all() and w.sum() == pytest.approx(1.0, abs=1e-8)
    logits = TEST[0].double()
    expected = (w[0] * (logits / calibrator.temperature).softmax(1) + w[1] * logits.softmax(1) + w[2] / 10)
    torch.testing.assert_close(calibrator.predict_proba(logits), expected / expected.sum(1, keepdim=True))


def test_hist_replaces_top_confidence_by_bin_accuracy():
    # 2 bins: confidences 0.6 (right) and 0.7 (wrong) both fall in (0.5, 1], whose accuracy is 0.5
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.7, 0.2]], dtype=torch.float64)
    calibrator = CALIBRATORS.build("hist", {"n_bins": 2}).fit(probs.log(), torch.tensor([0, 2]))
    assert torch.isnan(calibrator.bin_accuracy[0]) and float(calibrator.bin_accuracy[1]) == 0.5
    out = calibrator.predict_proba(torch.tensor([[0.8, 0.15, 0.05], [0.4, 0.35, 0.25]], dtype=torch.float64).log())
    # row 0: top 0.8 -> 0.5, the others share 0.5 as 0.15 : 0.05; row 1: conf 0.4 is in the empty bin, unchanged
    torch.testing.assert_close(out[0], torch.tensor([0.5, 0.375, 0.125], dtype=torch.float64))
    torch.testing.assert_close(out[1], torch.tensor([0.4, 0.35, 0.25], dtype=torch.float64))


def test_iso_is_sklearn_isotonic_per_class_renormalised():
    calibrator = CALIBRATORS.build("iso", {}).fit(*VAL)
    p_val = VAL[0].double().softmax(1).numpy()
    p_test = TEST[0].double().softmax(1).numpy()
    regressions = [IsotonicRegression(out_of_bounds="clip").fit(p_val[:, k], VAL[1].numpy() == k) for k in range(10)]
    mapped = np.stack([r.predict(p_test[:, k]) for k, r in enumerate(regressions)], axis=1) + 1e-9 * p_test
    np.testing.assert_allclose(calibrator.predict_proba(TEST[0].double()).numpy(),
                               mapped / mapped.sum(1, keepdims=True), rtol=1e-10, atol=1e-15)


def sklearn_isotonic_per_class(fit_probs, labels, probs):
    """Independent one-vs-all isotonic map with scikit-learn, ``+ 1e-9 p`` and renormalised."""
    regressions = [IsotonicRegression(out_of_bounds="clip").fit(fit_probs[:, k], labels == k)
                   for k in range(fit_probs.shape[1])]
    mapped = np.stack([r.predict(probs[:, k]) for k, r in enumerate(regressions)], axis=1) + 1e-9 * probs
    return mapped / mapped.sum(1, keepdims=True)


def test_ts_ir_is_brier_temperature_then_isotonic_on_tempered_probabilities():
    calibrator = CALIBRATORS.build("ts_ir", {}).fit(*VAL)
    assert calibrator.temperature == fit_temperature(*VAL, loss="mse")
    assert calibrator.temperature != pytest.approx(fit_temperature(*VAL), abs=1e-3)  # not the NLL temperature
    t = calibrator.temperature
    expected = sklearn_isotonic_per_class((VAL[0].double() / t).softmax(1).numpy(), VAL[1].numpy(),
                                          (TEST[0].double() / t).softmax(1).numpy())
    np.testing.assert_allclose(calibrator.predict_proba(TEST[0].double()).numpy(), expected, rtol=1e-10, atol=1e-15)


def test_ir_pooled_is_one_sklearn_isotonic_over_all_class_probabilities():
    calibrator = CALIBRATORS.build("ir_pooled", {}).fit(*VAL)
    p_val, p_test = VAL[0].double().softmax(1).numpy(), TEST[0].double().softmax(1).numpy()
    one_hot = np.eye(10)[VAL[1].numpy()]
    regression = IsotonicRegression(out_of_bounds="clip").fit(p_val.ravel(), one_hot.ravel())
    mapped = regression.predict(p_test.ravel()).reshape(p_test.shape) + 1e-9 * p_test
    np.testing.assert_allclose(calibrator.predict_proba(TEST[0].double()).numpy(),
                               mapped / mapped.sum(1, keepdims=True), rtol=1e-10, atol=1e-15)
    # one map for every class: equal probabilities in two columns come out equal
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.3, 0.6, 0.1]], dtype=torch.float64)
    pooled = CALIBRATORS.build("ir_pooled", {}).fit(VAL[0][:, :3], VAL[1] % 3).predict_proba(probs.log())
    assert float(pooled[0, 0]) == float(pooled[1, 1]) and float(pooled[0, 1]) == float(pooled[1, 0])


def test_sbc_is_kumar_et_al_platt_binner_marginal_renormalised():
    cal = pytest.importorskip("calibration")  # Kumar et al.'s own library (uncertainty-calibration)
    calibrator = CALIBRATORS.build("sbc", {}).fit(*VAL)
    reference = cal.PlattBinnerMarginalCalibrator(len(VAL[1]), num_bins=10)
    reference.train_calibration(VAL[0].double().softmax(1).numpy(), VAL[1].numpy())
    expected = reference.calibrate(TEST[0].double().softmax(1).numpy())
    np.testing.assert_allclose(calibrator.predict_proba(TEST[0].double()).numpy(),
                               expected / expected.sum(1, keepdims=True), rtol=1e-9, atol=1e-14)


def test_sbc_outputs_few_values_from_equal_mass_bins():
    calibrator = CALIBRATORS.build("sbc", {"n_bins": 5}).fit(*VAL)
    for cls in range(10):
        p = VAL[0].double().softmax(1)[:, cls]
        scaled = platt_probability(p, calibrator.coef[cls], calibrator.intercept[cls])
        counts = torch.bincount(torch.searchsorted(calibrator.edges[cls], scaled), minlength=5)
        assert counts.tolist() == [600] * 5  # 3000 validation samples, 5 equal-mass bins
        torch.testing.assert_close(calibrator.means[cls], torch.stack(
            [scaled[torch.searchsorted(calibrator.edges[cls], scaled) == b].mean() for b in range(5)]))


def test_sbc_half_split_scales_on_one_half_and_bins_on_the_other():
    calibrator = CALIBRATORS.build("sbc", {"n_bins": 5, "split": "half", "seed": 3}).fit(*VAL)
    order = torch.randperm(3000, generator=torch.Generator().manual_seed(3))
    first, second = order[:1500], order[1500:]
    from sklearn.linear_model import LogisticRegression
    p = VAL[0].double().softmax(1)[:, 4].clamp(1e-12, 1 - 1e-12)
    platt = LogisticRegression(C=1e10).fit(torch.log(p / (1 - p))[first, None].numpy(), (VAL[1][first] == 4).numpy())
    assert calibrator.coef[4] == pytest.approx(float(platt.coef_[0, 0]), rel=1e-6)
    scaled = platt_probability(p[second], calibrator.coef[4], calibrator.intercept[4])
    assert torch.bincount(torch.searchsorted(calibrator.edges[4], scaled), minlength=5).tolist() == [300] * 5
    with pytest.raises(ValueError, match="allowed: none"):
        CALIBRATORS.build("sbc", {"split": "thirds"})


def test_gpc_learns_the_temperature_of_an_overconfident_model():
    # the model reports 3 z for labels drawn from softmax(z): the true calibration map is z / 3 (up to a
    # shift, which softmax ignores), and the calibrated probabilities should be softmax(z)
    calibrator = CALIBRATORS.build("gpc", CALIBRATOR_PARAMS["gpc"]).fit(*VAL)
    mean, var = calibrator.latent(torch.tensor([-4.0, 4.0], dtype=torch.float64))
    assert float(mean[1] - mean[0]) / 8 == pytest.approx(1 / 3, abs=0.05)
    assert bool((var >= 0).all())
    truth = (TEST[0].double() / 3).softmax(1)
    gap = (calibrator.predict_proba(TEST[0].double()) - truth).abs().sum(1).mean()
    assert float(gap) < 0.05 < 0.7 < float((TEST[0].double().softmax(1) - truth).abs().sum(1).mean())
    mean_only = CALIBRATORS.build("gpc", {**CALIBRATOR_PARAMS["gpc"], "n_monte_carlo": 0})
    mean_only.params, mean_only.num_classes = calibrator.params, 10
    torch.testing.assert_close(mean_only.predict_proba(TEST[0].double()), calibrator.latent(TEST[0])[0].softmax(1))


def test_gpc_prediction_is_the_expected_softmax_over_the_latent_marginals():
    calibrator = CALIBRATORS.build("gpc", {"max_iter": 1, "n_monte_carlo": 20_000}).fit(*overconfident(0, n=300))
    calibrator.params["white"] = calibrator._unconstrained(1.0)  # wide marginals, so E softmax != softmax E
    logits = TEST[0][:20].double()
    mean, var = calibrator.latent(logits)
    assert float(var.min()) > 0.9
    draws = torch.distributions.Normal(mean, var.sqrt()).sample((100_000,))  # independent Monte Carlo
    expected = draws.softmax(dim=2).mean(0)
    probs = calibrator.predict_proba(logits)
    torch.testing.assert_close(probs, expected, atol=0.01, rtol=0)
    assert float((mean.softmax(1) - expected).abs().max()) > 0.05


def test_gpc_fit_is_a_stationary_point_of_the_svgp_bound():
    """The bound assembled here from the functional pieces (expected log-likelihood minus whitened KL)
    has zero gradient at the fitted parameters: gpc maximises this objective, not another one."""
    logits, targets = overconfident(4, n=300)
    calibrator = CALIBRATORS.build("gpc", {}).fit(logits, targets)
    params = {key: value.clone().requires_grad_(True) for key, value in calibrator.params.items()}
    positive = lambda raw: torch.nn.functional.softplus(raw) + 1e-6  # noqa: E731 - GPflow's positive transform
    z = logits.double()
    mean, var = gp_latent_marginals(z, params["inducing"], params["q_mu"], positive(params["q_sqrt"]),
                                    positive(params["lengthscale"]), positive(params["variance"]),
                                    positive(params["white"]))
    bound = (softmax_expected_log_lik(z + mean, var, targets).sum()
             - whitened_gauss_kl(params["q_mu"], positive(params["q_sqrt"])))
    bound.backward()
    gradient = torch.cat([p.grad.flatten() for p in params.values()])
    assert float(gradient.abs().max()) < 1e-4 * len(targets)
    assert float(params["q_mu"].detach().abs().max()) > 0.05  # the KL gradient q_mu is not negligible


# ------------------------------------------------------------------------------ knowledge-transfer TS

def long_tailed_features(seed, counts, dim=8):
    """Features drawn from one Gaussian per class; the logits are an over-confident linear read-out."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(len(counts), dim, generator=torch.Generator().manual_seed(100)) * 2
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    features = centres[labels] + torch.randn(len(labels), dim, generator=g)
    logits = 4.0 * features @ centres.T
    return logits, labels, features


def test_head_mask_from_counts_mean_rule_gives_the_authors_four_heads():
    counts = [int(0.8 * c) for c in lt_counts(10, 5000, 10)]  # their CIFAR-10-LT IF 10, 80 % training split
    assert head_mask_from_counts(counts).tolist() == [True] * 4 + [False] * 6
    assert head_mask_from_counts(counts, head_threshold=1000).sum() == 6
    with pytest.raises(ValueError, match="no head class"):
        head_mask_from_counts(counts, head_threshold=10_000)


def test_kt_ts_composes_its_four_steps(tmp_path):
    counts = [400, 250, 150, 60, 30, 15]
    train_logits, train_labels, train_features = long_tailed_features(0, counts)
    val_logits, val_labels, val_features = long_tailed_features(1, [c // 4 for c in counts])
    calibrator = CALIBRATORS.build("kt_ts", {"alpha": 0.9}).fit(
        val_logits, val_labels, features=val_features, train_features=train_features, train_targets=train_labels,
        class_counts=counts)
    # step 2: mean count 150.8 -> classes of 400 and 250 are head
    assert calibrator.head_mask.tolist() == [True, True, False, False, False, False]
    # step 1 + 3, done by hand with the functional pieces
    means, variances = diagonal_class_gaussians(train_features, train_labels, 6)
    weights = kt_importance_weights(val_features, val_labels, means, variances.clamp(min=1e-6),
                                    calibrator.head_mask, 0.9)
    torch.testing.assert_close(calibrator.weights, weights)
    head = calibrator.head_mask[val_labels]
    assert (calibrator.weights[head] == 1).all()
    assert ((calibrator.weights[~head] >= 0.3) & (calibrator.weights[~head] <= 5.0)).all()
    assert not torch.allclose(calibrator.weights[~head], torch.ones(int((~head).sum()), dtype=torch.float64))
    # step 4
    assert calibrator.temperature == fit_temperature(val_logits, val_labels, sample_weight=weights)
    assert calibrator.temperature > 1  # the read-out is over-confident
    loaded = load_calibrator(calibrator.save(tmp_path / "kt.pt"))
    assert isinstance(loaded, KnowledgeTransferTS) and loaded.alpha == 0.9
    assert loaded.temperature == calibrator.temperature
    assert loaded.head_mask.tolist() == calibrator.head_mask.tolist()


def test_kt_ts_head_mask_override_and_missing_features_error():
    counts = [200, 100, 20]
    logits, labels, features = long_tailed_features(2, counts)
    with pytest.raises(ValueError, match="kt_ts needs features="):
        CALIBRATORS.build("kt_ts", {}).fit(logits, labels)
    all_head = CALIBRATORS.build("kt_ts", {}).fit(logits, labels, features=features, train_features=features,
                                                  train_targets=labels, head_mask=[True, True, True])
    # no tail class: every weight is 1 and kt_ts is plain temperature scaling
    assert (all_head.weights == 1).all()
    assert all_head.temperature == fit_temperature(logits, labels)


# ------------------------------------------------------------------------------ calibration_report

def test_calibration_report_overall_and_per_group():
    logits, targets = TEST
    counts = [1000, 800, 500, 200, 150, 90, 60, 40, 25, 20]  # many 0-4, medium 5-9, no few-shot class
    report = calibration_report(logits, targets, counts)
    assert set(report["groups"]) == {"many", "medium"}
    p = logits.double().softmax(1).numpy()
    y = targets.numpy()
    assert report["confidence_minus_accuracy"] == pytest.approx(p.max(1).mean() - (p.argmax(1) == y).mean(), abs=1e-12)
    assert report["confidence_minus_accuracy"] > 0.2  # the synthetic model is over-confident
    assert report["ece"] == float(ece(logits, targets)) and report["nll"] == float(nll(logits, targets))
    medium_rows = targets >= 5
    medium = report["groups"]["medium"]
    assert medium["num_samples"] == int(medium_rows.sum()) and medium["num_classes"] == 5
    assert medium["mce"] == float(mce(logits[medium_rows], targets[medium_rows]))
    assert medium["classwise_ece"] == pytest.approx(float(per_class_ece(logits, targets)[5:].mean()), abs=1e-15)
    assert {"ece", "mce", "adaptive_ece", "classwise_ece", "nll", "brier"} <= set(medium)
    with pytest.raises(ValueError, match="class_counts has 3 entries"):
        calibration_report(logits, targets, [1, 2, 3])


# ------------------------------------------------------------------------------ the KT paper's released logits

@pytest.mark.slow
def test_table1_row_on_the_authors_released_arrays():
    """Seed 000's Table 1 (IF=10 / CIFAR-10) on the authors' arrays, when $LONGTAIL_KT_ARRAYS names a folder
    holding them (JiahaoChen1/Calibration, data/*.npy; not redistributed). Expected values: their own code
    (TS-IR, both isotonic maps, TS, ETS, KT) and Kumar et al.'s library (SBC) on the same arrays."""
    import os
    from pathlib import Path
    folder = Path(os.environ.get("LONGTAIL_KT_ARRAYS", "/nonexistent"))
    if not (folder / "cifar10_val_z.npy").is_file():
        pytest.skip("set LONGTAIL_KT_ARRAYS to the folder with the authors' cifar10_*.npy arrays")
    load = lambda split, name: torch.from_numpy(np.load(folder / f"cifar10_{split}_{name}.npy")[0])  # noqa: E731
    val_z, val_y = load("val", "z"), load("val", "label")
    test_z, test_y = load("test", "z").double(), load("test", "label")
    assert float(ece(test_z, test_y)) > 0.08
    expected = {"ts": 2.2384, "ets": 1.6409, "ts_ir": 2.0366, "iso": 2.3061, "ir_pooled": 2.4332, "sbc": 1.7706}
    for name, value in expected.items():
        calibrator = CALIBRATORS.build(name, {}).fit(val_z, val_y)
        assert 100 * float(ece(calibrator.transform(test_z), test_y)) == pytest.approx(value, abs=6e-5), name
    gpc = CALIBRATORS.build("gpc", {}).fit(val_z, val_y)
    assert 100 * float(ece(gpc.transform(test_z), test_y)) < 2.0  # the paper's GPC: 2.01
