"""Post-hoc calibrators, scikit-learn style: ``fit(logits, targets, **extra)`` on a validation split,
then ``predict_proba(logits)``. They are the baselines of Chen & Su, "Transfer Knowledge from Head to
Tail: Uncertainty Calibration under Long-tailed Distribution" (CVPR 2023, Table 1): temperature
scaling, vector scaling, ensemble TS, histogram binning, one-vs-all and pooled isotonic regression,
TS followed by isotonic regression, the scaling-binning calibrator and Gaussian-process calibration.
Fitted state is plain tensors and numbers, so ``torch.load(weights_only=True)`` reads a saved
calibrator.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.cluster.vq
import scipy.optimize
import torch
import torch.nn.functional as F
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from longtail.engine.checkpoint import load_checkpoint, save_checkpoint
from longtail.functional import (bin_indices, bin_means, equal_mass_bin_edges, fit_temperature, gp_latent_marginals,
                                 platt_probability, softmax_expected_log_lik, whitened_gauss_kl)
from longtail.registry import CALIBRATORS

__all__ = ["Calibrator", "TemperatureScaling", "VectorScaling", "EnsembleTemperatureScaling",
           "HistogramBinning", "IsotonicOneVsAll", "TemperatureIsotonic", "IsotonicPooled", "ScalingBinning",
           "GPCalibration", "load_calibrator"]


def _checked(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"logits must be (N, C) with C >= 2 classes, got shape {tuple(logits.shape)}")
    if targets.shape != (logits.shape[0],) or logits.shape[0] == 0:
        raise ValueError(f"targets must be (N,) with N = {logits.shape[0]} >= 1, got shape {tuple(targets.shape)}")
    return logits.detach().double(), targets.detach().long()


class Calibrator(abc.ABC):
    """Common interface; subclasses implement fitting, the probability map and their fitted state.
    ``needs_features``: ``fit`` needs the validation and training features (``features``,
    ``train_features``, ``train_targets``), not only logits."""

    name: ClassVar[str]
    needs_features: ClassVar[bool] = False

    def __init__(self) -> None:
        self.num_classes: int | None = None

    @abc.abstractmethod
    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "Calibrator":
        """Learn the map from validation logits (N, C) and targets (N,); ``extra`` (features, class
        counts, ...) is accepted by every calibrator so a caller can pass the same context to all."""

    @abc.abstractmethod
    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities from float64 logits."""

    @abc.abstractmethod
    def _fitted_state(self) -> dict[str, Any]:
        """What fitting learned, as tensors / numbers / strings / lists."""

    @abc.abstractmethod
    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        """Inverse of :meth:`_fitted_state`."""

    def config(self) -> dict[str, Any]:
        """Constructor arguments (what a config file sets); none by default."""
        return {}

    def predict_proba(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated probabilities (N, C), rows summing to 1, in at least float32."""
        if self.num_classes is None:
            raise RuntimeError(f"calibrator {self.name!r} is not fitted: call fit(val_logits, val_targets) "
                               "or load_calibrator(path) first")
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"calibrator {self.name!r} was fitted on {self.num_classes} classes; "
                             f"got logits of shape {tuple(logits.shape)}")
        probs = self._probabilities(logits.detach().double())
        return probs.to(torch.promote_types(logits.dtype, torch.float32))

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Calibrated log-probabilities: logits whose softmax is :meth:`predict_proba`, so every metric
        of ``longtail.functional`` (which take logits) scores the calibrated model."""
        return self.predict_proba(logits).log()

    def state_dict(self) -> dict[str, Any]:
        if self.num_classes is None:
            raise RuntimeError(f"calibrator {self.name!r} is not fitted; there is no state to save")
        return {"calibrator": self.name, "config": self.config(), "num_classes": self.num_classes,
                "state": self._fitted_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("calibrator") != self.name:
            raise ValueError(f"state is for calibrator {state.get('calibrator')!r}, not {self.name!r}; "
                             "use load_calibrator(path) to build the right one")
        self._load_fitted_state(state["state"])
        self.num_classes = int(state["num_classes"])

    def save(self, path: str | Path) -> Path:
        """Write the state atomically (temporary file + rename), readable with ``weights_only=True``."""
        return save_checkpoint(self.state_dict(), path)


def load_calibrator(path: str | Path) -> Calibrator:
    """Rebuild a saved calibrator (any registered kind) from :meth:`Calibrator.save`'s file."""
    state = load_checkpoint(Path(path))
    if not isinstance(state, dict) or "calibrator" not in state:
        raise ValueError(f"{path} is not a saved calibrator (no 'calibrator' key); "
                         "write one with calibrator.save(path)")
    calibrator = CALIBRATORS.get(state["calibrator"])(**state["config"])
    calibrator.load_state_dict(state)
    return calibrator


@CALIBRATORS.register("ts")
class TemperatureScaling(Calibrator):
    """One temperature for all logits (Guo et al. 2017; Chen & Su 2023, eq. 3), fitted by
    :func:`longtail.functional.fit_temperature` as the authors' code."""

    name = "ts"

    def __init__(self) -> None:
        super().__init__()
        self.temperature = 1.0

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "TemperatureScaling":
        logits, targets = _checked(logits, targets)
        self.temperature = fit_temperature(logits, targets)
        self.num_classes = logits.shape[1]
        return self

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits / self.temperature).softmax(dim=1)

    def _fitted_state(self) -> dict[str, Any]:
        return {"temperature": self.temperature}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])


@CALIBRATORS.register("vs")
class VectorScaling(Calibrator):
    """``softmax(w * z + b)`` with one scale and one bias per class (Guo et al. 2017), fitted by
    L-BFGS on the validation NLL from w = 1, b = 0."""

    name = "vs"

    def __init__(self, max_iter: int = 200) -> None:
        super().__init__()
        self.max_iter = max_iter
        self.scale = torch.ones(0, dtype=torch.float64)
        self.bias = torch.zeros(0, dtype=torch.float64)

    def config(self) -> dict[str, Any]:
        return {"max_iter": self.max_iter}

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "VectorScaling":
        logits, targets = _checked(logits, targets)
        scale = torch.ones(logits.shape[1], dtype=torch.float64, device=logits.device, requires_grad=True)
        bias = torch.zeros_like(scale, requires_grad=True)
        optimizer = torch.optim.LBFGS([scale, bias], lr=1.0, max_iter=self.max_iter, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-9, tolerance_change=1e-12)

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(logits * scale + bias, targets)
            loss.backward()
            return loss

        optimizer.step(closure)
        self.scale, self.bias = scale.detach().cpu(), bias.detach().cpu()
        self.num_classes = logits.shape[1]
        return self

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return (logits * self.scale.to(logits.device) + self.bias.to(logits.device)).softmax(dim=1)

    def _fitted_state(self) -> dict[str, Any]:
        return {"scale": self.scale, "bias": self.bias}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.scale, self.bias = state["scale"].double(), state["bias"].double()


@CALIBRATORS.register("ets")
class EnsembleTemperatureScaling(Calibrator):
    """Ensemble TS (Zhang et al. 2020, "Mix-n-Match"): ``w1 softmax(z/T) + w2 softmax(z) + w3 / C`` with
    w on the simplex. T is fitted first, then w by SLSQP from (1, 0, 0), both on the same loss:
    ``mse`` (Brier; the default, as Zhang et al.'s code and the seed authors' ETSModel) or ``nll``."""

    name = "ets"

    def __init__(self, loss: str = "mse") -> None:
        super().__init__()
        if loss not in ("mse", "nll"):
            raise ValueError(f"unknown ETS loss {loss!r}; allowed: mse, nll")
        self.loss = loss
        self.temperature = 1.0
        self.weights = [1.0, 0.0, 0.0]

    def config(self) -> dict[str, Any]:
        return {"loss": self.loss}

    def _components(self, logits: torch.Tensor) -> torch.Tensor:
        """(3, N, C): tempered, original and uniform probabilities."""
        tempered = (logits / self.temperature).softmax(dim=1)
        return torch.stack([tempered, logits.softmax(dim=1), torch.full_like(tempered, 1 / logits.shape[1])])

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "EnsembleTemperatureScaling":
        logits, targets = _checked(logits, targets)
        self.temperature = fit_temperature(logits, targets, loss=self.loss)
        components = self._components(logits)
        n = logits.shape[0]
        if self.loss == "mse":
            # ||sum_k w_k P_k - Y||^2 / N = w'Gw - 2 w'h + const: a 3x3 quadratic, exact and cheap
            one_hot = F.one_hot(targets, logits.shape[1]).double()
            flat = components.flatten(1)
            gram = (flat @ flat.T / n).cpu().numpy()
            linear = (flat @ one_hot.flatten() / n).cpu().numpy()

            def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
                return float(w @ gram @ w - 2 * w @ linear), 2 * gram @ w - 2 * linear
        else:
            target_probs = components[:, torch.arange(n, device=logits.device), targets].cpu().numpy()  # (3, N)

            def objective(w: np.ndarray) -> tuple[float, np.ndarray]:
                mixed = np.maximum(w @ target_probs, 1e-300)
                return float(-np.log(mixed).mean()), -(target_probs / mixed).mean(axis=1)

        result = scipy.optimize.minimize(objective, x0=np.array([1.0, 0.0, 0.0]), jac=True, method="SLSQP",
                                         bounds=[(0.0, 1.0)] * 3, tol=1e-12,
                                         constraints={"type": "eq", "fun": lambda w: w.sum() - 1.0})
        self.weights = [float(w) for w in result.x]
        self.num_classes = logits.shape[1]
        return self

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        weights = torch.tensor(self.weights, dtype=torch.float64, device=logits.device)
        mixed = torch.einsum("k,knc->nc", weights, self._components(logits))
        return mixed / mixed.sum(dim=1, keepdim=True)

    def _fitted_state(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "weights": list(self.weights)}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.temperature = float(state["temperature"])
        self.weights = [float(w) for w in state["weights"]]


@CALIBRATORS.register("hist")
class HistogramBinning(Calibrator):
    """Histogram binning of the top-label confidence (Zadrozny & Elkan 2001): the confidence is replaced
    by the validation accuracy of its bin (equal-width ``(lo, hi]`` bins, the rule of
    ``longtail.functional.bin_indices``); an empty bin leaves the confidence unchanged. The other classes
    share ``1 - confidence`` in proportion to their original probabilities, so rows stay distributions
    (the argmax may change when the new confidence is low). Confidences are kept in [1e-6, 1 - 1e-6]
    so the NLL of a wrong or right prediction stays finite."""

    name = "hist"
    margin = 1e-6

    def __init__(self, n_bins: int = 15) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        self.n_bins = n_bins
        self.bin_accuracy = torch.zeros(0, dtype=torch.float64)

    def config(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins}

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "HistogramBinning":
        logits, targets = _checked(logits, targets)
        confidence, prediction = logits.softmax(dim=1).max(dim=1)
        index = bin_indices(confidence, self.n_bins)
        count = torch.bincount(index, minlength=self.n_bins)
        correct = torch.bincount(index, weights=(prediction == targets).double(), minlength=self.n_bins)
        self.bin_accuracy = torch.where(count > 0, correct / count.clamp(min=1), float("nan")).cpu()
        self.num_classes = logits.shape[1]
        return self

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=1)
        confidence, prediction = probs.max(dim=1)
        binned = self.bin_accuracy.to(logits.device)[bin_indices(confidence, self.n_bins)]
        calibrated = torch.where(binned.isnan(), confidence, binned).clamp(self.margin, 1 - self.margin)
        top = F.one_hot(prediction, probs.shape[1]).bool()
        rest = probs.masked_fill(top, 0.0)
        rest_sum = rest.sum(dim=1, keepdim=True)
        uniform_rest = (~top).double() / (probs.shape[1] - 1)  # when the model put all mass on the top class
        share = torch.where(rest_sum > 0, rest / rest_sum.clamp(min=torch.finfo(torch.float64).tiny), uniform_rest)
        return torch.where(top, calibrated.unsqueeze(1), share * (1 - calibrated).unsqueeze(1))

    def _fitted_state(self) -> dict[str, Any]:
        return {"bin_accuracy": self.bin_accuracy}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.bin_accuracy = state["bin_accuracy"].double()
        self.n_bins = int(self.bin_accuracy.numel())


@CALIBRATORS.register("iso")
class IsotonicOneVsAll(Calibrator):
    """One isotonic regression per class on ``softmax(z)_k`` against ``1(y = k)`` (Zadrozny & Elkan
    2002; "IROvA" in Chen & Su 2023, Table 1), with scikit-learn, clipped outside the fitted
    range, then rows renormalised. As the authors' code, ``1e-9 * softmax(z)`` is added first so a row
    the regressions map to all zeros falls back to the model's own ranking."""

    name = "iso"
    fallback = 1e-9

    def __init__(self) -> None:
        super().__init__()
        self.x_thresholds: list[torch.Tensor] = []
        self.y_thresholds: list[torch.Tensor] = []

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "IsotonicOneVsAll":
        logits, targets = _checked(logits, targets)
        probs = logits.softmax(dim=1).cpu().numpy()
        labels = targets.cpu().numpy()
        self.x_thresholds, self.y_thresholds = [], []
        for cls in range(probs.shape[1]):
            regression = IsotonicRegression(out_of_bounds="clip").fit(probs[:, cls], (labels == cls).astype(np.float64))
            self.x_thresholds.append(torch.from_numpy(regression.X_thresholds_.astype(np.float64)))
            self.y_thresholds.append(torch.from_numpy(regression.y_thresholds_.astype(np.float64)))
        self.num_classes = probs.shape[1]
        return self

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=1)
        probs_np = probs.cpu().numpy()
        # IsotonicRegression.predict with out_of_bounds="clip" is linear interpolation between its
        # thresholds, constant beyond them: np.interp on the stored thresholds is the same map
        mapped = np.stack([np.interp(probs_np[:, cls], self.x_thresholds[cls].numpy(), self.y_thresholds[cls].numpy())
                           for cls in range(probs_np.shape[1])], axis=1)
        calibrated = torch.from_numpy(mapped).to(probs.device) + self.fallback * probs
        return calibrated / calibrated.sum(dim=1, keepdim=True)

    def _fitted_state(self) -> dict[str, Any]:
        return {"x_thresholds": list(self.x_thresholds), "y_thresholds": list(self.y_thresholds)}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.x_thresholds = [x.double() for x in state["x_thresholds"]]
        self.y_thresholds = [y.double() for y in state["y_thresholds"]]


@CALIBRATORS.register("ts_ir")
class TemperatureIsotonic(IsotonicOneVsAll):
    """TS-IR of Chen & Su 2023, Table 1 (Zhang et al. 2020, "Mix-n-Match"): a temperature
    fitted on the Brier score (``fit_temperature(loss="mse")``), then :class:`IsotonicOneVsAll` on the
    tempered probabilities, as the authors' ``IROVATSModel`` (``train_irovats(loss="mse")``)."""

    name = "ts_ir"

    def __init__(self) -> None:
        super().__init__()
        self.temperature = 1.0

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "TemperatureIsotonic":
        logits, targets = _checked(logits, targets)
        self.temperature = fit_temperature(logits, targets, loss="mse")
        return super().fit(logits / self.temperature, targets)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return super()._probabilities(logits / self.temperature)

    def _fitted_state(self) -> dict[str, Any]:
        return {**super()._fitted_state(), "temperature": self.temperature}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        super()._load_fitted_state(state)
        self.temperature = float(state["temperature"])


@CALIBRATORS.register("ir_pooled")
class IsotonicPooled(Calibrator):
    """One isotonic regression over all C x N pairs ``(softmax(z)_k, 1(y = k))`` (Zhang et al. 2020's
    multi-class IR; the authors' ``IRMModel``), applied to every column, ``1e-9 * softmax(z)`` added
    and rows renormalised as :class:`IsotonicOneVsAll`. Chen & Su 2023's Table 1 prints it as "IROvA" and the
    one-vs-all map as "IR": only that reading reproduces both columns on the authors' arrays
    (``benchmarks/kt_table1.py``)."""

    name = "ir_pooled"
    fallback = IsotonicOneVsAll.fallback

    def __init__(self) -> None:
        super().__init__()
        self.x_thresholds = torch.zeros(0, dtype=torch.float64)
        self.y_thresholds = torch.zeros(0, dtype=torch.float64)

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "IsotonicPooled":
        logits, targets = _checked(logits, targets)
        probs = logits.softmax(dim=1)
        indicators = F.one_hot(targets, probs.shape[1]).double()
        regression = IsotonicRegression(out_of_bounds="clip").fit(probs.flatten().cpu().numpy(),
                                                                  indicators.flatten().cpu().numpy())
        self.x_thresholds = torch.from_numpy(regression.X_thresholds_.astype(np.float64))
        self.y_thresholds = torch.from_numpy(regression.y_thresholds_.astype(np.float64))
        self.num_classes = probs.shape[1]
        return self

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=1)
        mapped = np.interp(probs.cpu().numpy(), self.x_thresholds.numpy(), self.y_thresholds.numpy())
        calibrated = torch.from_numpy(mapped).to(probs.device) + self.fallback * probs
        return calibrated / calibrated.sum(dim=1, keepdim=True)

    def _fitted_state(self) -> dict[str, Any]:
        return {"x_thresholds": self.x_thresholds, "y_thresholds": self.y_thresholds}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.x_thresholds, self.y_thresholds = state["x_thresholds"].double(), state["y_thresholds"].double()


@CALIBRATORS.register("sbc")
class ScalingBinning(Calibrator):
    """Scaling-binning calibrator (Kumar et al. 2019, "Verified uncertainty calibration", Sec. 4.1),
    per class (marginal) as the authors' ``PlattBinnerMarginalCalibrator``: for each class k, Platt
    scaling ``g_k`` of ``softmax(z)_k`` against ``1(y = k)`` (:func:`platt_probability`, fitted with
    scikit-learn's unregularised logistic regression as their ``get_platt_scaler``), equal-mass bins
    of ``g_k`` (:func:`equal_mass_bin_edges`), and the output is the mean of ``g_k`` over the bin
    (:func:`bin_means`). Rows are renormalised (Chen & Su's code scores ``log p`` through a softmax).

    ``split="none"`` (default) fits all three steps on the whole validation set, as the authors'
    library does; ``split="half"`` follows the paper: Platt on the first half of the (shuffled with
    ``seed``) validation set, bins and bin means on the second half."""

    name = "sbc"

    def __init__(self, n_bins: int = 10, split: str = "none", seed: int = 0) -> None:
        super().__init__()
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if split not in ("none", "half"):
            raise ValueError(f"unknown SBC split {split!r}; allowed: none (authors' library), half (paper)")
        self.n_bins, self.split, self.seed = n_bins, split, seed
        self.coef: list[float] = []
        self.intercept: list[float] = []
        self.edges: list[torch.Tensor] = []
        self.means: list[torch.Tensor] = []

    def config(self) -> dict[str, Any]:
        return {"n_bins": self.n_bins, "split": self.split, "seed": self.seed}

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "ScalingBinning":
        logits, targets = _checked(logits, targets)
        probs = logits.softmax(dim=1).cpu()
        indicators = F.one_hot(targets.cpu(), probs.shape[1]).double()
        scale_rows = bin_rows = torch.arange(len(probs))
        if self.split == "half":
            if len(probs) < 2:
                raise ValueError("sbc with split='half' needs at least 2 validation samples")
            order = torch.randperm(len(probs), generator=torch.Generator().manual_seed(self.seed))
            scale_rows, bin_rows = order[: len(probs) // 2], order[len(probs) // 2:]
        self.coef, self.intercept, self.edges, self.means = [], [], [], []
        for cls in range(probs.shape[1]):
            if indicators[scale_rows, cls].unique().numel() < 2:
                raise ValueError(f"sbc cannot Platt-scale class {cls}: its validation rows are all "
                                 "positive or all negative; give a validation set holding every class")
            p = probs[:, cls].clamp(1e-12, 1 - 1e-12)
            platt = LogisticRegression(C=1e10, solver="lbfgs").fit(
                torch.log(p / (1 - p))[scale_rows, None].numpy(), indicators[scale_rows, cls].numpy())
            coef, intercept = float(platt.coef_[0, 0]), float(platt.intercept_[0])
            scaled = platt_probability(probs[bin_rows, cls], coef, intercept)
            edges = equal_mass_bin_edges(scaled, self.n_bins)
            self.coef.append(coef)
            self.intercept.append(intercept)
            self.edges.append(edges)
            self.means.append(bin_means(scaled, scaled, edges))
        self.num_classes = probs.shape[1]
        return self

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        probs = logits.softmax(dim=1).cpu()
        columns = []
        for cls in range(probs.shape[1]):
            scaled = platt_probability(probs[:, cls], self.coef[cls], self.intercept[cls])
            index = torch.searchsorted(self.edges[cls], scaled).clamp(max=self.edges[cls].numel() - 1)
            columns.append(self.means[cls][index])
        calibrated = torch.stack(columns, dim=1)
        return (calibrated / calibrated.sum(dim=1, keepdim=True)).to(logits.device)

    def _fitted_state(self) -> dict[str, Any]:
        return {"coef": list(self.coef), "intercept": list(self.intercept), "edges": list(self.edges),
                "means": list(self.means)}

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.coef = [float(c) for c in state["coef"]]
        self.intercept = [float(b) for b in state["intercept"]]
        self.edges = [e.double() for e in state["edges"]]
        self.means = [m.double() for m in state["means"]]


@CALIBRATORS.register("gpc")
class GPCalibration(Calibrator):
    """Gaussian-process calibration (Wenger et al. 2020, "Non-parametric calibration for
    classification"): one latent function g: R -> R, applied to every logit, ``p = E softmax(g(z))``.
    g is a sparse variational GP with prior mean ``g(z) = z`` and kernel RBF + White; the bound is the
    sum of the Taylor-approximated expected log-likelihoods minus the whitened KL; prediction averages
    the softmax over ``n_monte_carlo`` samples of the latent marginals. A compact torch port of the
    authors' ``GPCalibration(logits=True)`` (JonathanWenger/pycalib, TensorFlow/GPflow): same
    defaults (10 inducing points placed by k-means on the logits and trained, lengthscale 10,
    variance 1, white 0.01, q = N(0, I), 1000 L-BFGS iterations, 100 Monte Carlo samples), positive
    parameters through softplus + 1e-6 as GPflow. ``n_monte_carlo=0`` predicts from the latent mean."""

    name = "gpc"
    floor = 1e-6

    def __init__(self, n_inducing: int = 10, max_iter: int = 1000, n_monte_carlo: int = 100, seed: int = 1) -> None:
        super().__init__()
        if n_inducing < 1 or max_iter < 1 or n_monte_carlo < 0:
            raise ValueError(f"gpc needs n_inducing >= 1, max_iter >= 1, n_monte_carlo >= 0; got {n_inducing}, "
                             f"{max_iter}, {n_monte_carlo}")
        self.n_inducing, self.max_iter, self.n_monte_carlo, self.seed = n_inducing, max_iter, n_monte_carlo, seed
        self.params: dict[str, torch.Tensor] = {}

    def config(self) -> dict[str, Any]:
        return {"n_inducing": self.n_inducing, "max_iter": self.max_iter, "n_monte_carlo": self.n_monte_carlo,
                "seed": self.seed}

    @classmethod
    def _positive(cls, raw: torch.Tensor) -> torch.Tensor:
        return F.softplus(raw) + cls.floor

    @classmethod
    def _unconstrained(cls, value: float | torch.Tensor) -> torch.Tensor:
        value = torch.as_tensor(value, dtype=torch.float64) - cls.floor
        return value + torch.log(-torch.expm1(-value))  # inverse softplus

    def _marginals(self, logits: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        mean, var = gp_latent_marginals(logits, params["inducing"], params["q_mu"], self._positive(params["q_sqrt"]),
                                        self._positive(params["lengthscale"]), self._positive(params["variance"]),
                                        self._positive(params["white"]))
        return logits + mean, var.clamp(min=0.0)

    def fit(self, logits: torch.Tensor, targets: torch.Tensor, **extra: Any) -> "GPCalibration":
        logits, targets = _checked(logits, targets)
        logits, targets = logits.cpu(), targets.cpu()
        flat = logits.flatten().numpy()[:, None]
        centres = scipy.cluster.vq.kmeans(flat, min(flat.shape[0], self.n_inducing), seed=self.seed)[0]
        m = centres.shape[0]
        params = {"inducing": torch.from_numpy(centres[:, 0].astype(np.float64)),
                  "q_mu": torch.zeros(m, dtype=torch.float64),
                  "q_sqrt": self._unconstrained(torch.ones(m, dtype=torch.float64)),
                  "lengthscale": self._unconstrained(10.0), "variance": self._unconstrained(1.0),
                  "white": self._unconstrained(0.01)}
        for tensor in params.values():
            tensor.requires_grad_(True)
        optimizer = torch.optim.LBFGS(list(params.values()), lr=1.0, max_iter=self.max_iter,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-9, tolerance_change=1e-12)
        n = logits.shape[0]

        def closure() -> torch.Tensor:
            optimizer.zero_grad()
            mean, var = self._marginals(logits, params)
            elbo = softmax_expected_log_lik(mean, var, targets).sum() - whitened_gauss_kl(
                params["q_mu"], self._positive(params["q_sqrt"]))
            loss = -elbo / n
            loss.backward()
            return loss

        optimizer.step(closure)
        self.params = {key: value.detach() for key, value in params.items()}
        self.num_classes = logits.shape[1]
        return self

    def latent(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and variance of the calibration map g at logits z (any shape)."""
        return self._marginals(z.detach().double().cpu(), self.params)

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        mean, var = self.latent(logits)
        if self.n_monte_carlo == 0:
            return mean.softmax(dim=1).to(logits.device)
        generator = torch.Generator().manual_seed(self.seed)
        noise = torch.randn((self.n_monte_carlo, *mean.shape), generator=generator, dtype=torch.float64)
        return (mean + var.sqrt() * noise).softmax(dim=2).mean(dim=0).to(logits.device)

    def _fitted_state(self) -> dict[str, Any]:
        return dict(self.params)

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        self.params = {key: state[key].double() for key in ("inducing", "q_mu", "q_sqrt", "lengthscale", "variance",
                                                             "white")}
