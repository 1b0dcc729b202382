"""Post-hoc calibrators, scikit-learn style: ``fit(logits, targets, **extra)`` on a validation split,
then ``predict_proba(logits)``. They are the baselines of seed 000_aa1c4ab53dd5e13c.txt (second
paper, Table 1): temperature scaling, vector scaling, ensemble TS, histogram binning, one-vs-all
isotonic regression. Fitted state is plain tensors and numbers, so ``torch.load(weights_only=True)``
reads a saved calibrator.
"""
from __future__ import annotations

import abc
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import scipy.optimize
import torch
import torch.nn.functional as F
from sklearn.isotonic import IsotonicRegression

from longtail.engine.checkpoint import load_checkpoint, save_checkpoint
from longtail.functional import bin_indices, fit_temperature
from longtail.registry import CALIBRATORS

__all__ = ["Calibrator", "TemperatureScaling", "VectorScaling", "EnsembleTemperatureScaling",
           "HistogramBinning", "IsotonicOneVsAll", "load_calibrator"]


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
    """One temperature for all logits (Guo et al. 2017; seed 000, second paper, eq. 3), fitted by
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
    2002; "IROvA" in seed 000, second paper, Table 1), with scikit-learn, clipped outside the fitted
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
