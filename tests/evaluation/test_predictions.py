"""Running Laplace objects and MAP networks over loaders: predict, evaluate."""

from __future__ import annotations

import math

import pytest
import torch
from laplace import Laplace
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import ekfac_laplace  # noqa: F401  (registers hessian_structure="ekfac")
from ekfac_laplace.evaluation.metrics import (
    ClassificationPredictions,
    RegressionPredictions,
    gaussian_nll,
    negative_log_likelihood,
)
from ekfac_laplace.evaluation.predictions import evaluate, predict
from tests.evaluation.expected import (
    CLASSIFICATION_KEYS,
    OOD_KEYS,
    REGRESSION_KEYS,
)

F64 = torch.float64


# ------------------------------------------------------------ predict/evaluate
def _classification_data(
    n: int = 24, seed: int = 0
) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    X = torch.randn(n, 2, dtype=F64)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 1).long()
    return model, X, y


def _regression_data(n: int = 24, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 2)).to(F64)
    X = torch.randn(n, 2, dtype=F64)
    return model, X, torch.randn(n, 2, dtype=F64)


def _loader(X: Tensor, y: Tensor) -> DataLoader:
    return DataLoader(TensorDataset(X, y), batch_size=10, shuffle=False)


def _assert_finite(metrics: dict[str, float]) -> None:
    assert all(isinstance(v, float) and math.isfinite(v) for v in metrics.values())


@pytest.fixture(scope="module")
def ekfac_classifier():
    model, X, y = _classification_data()
    la = Laplace(
        model, "classification", subset_of_weights="all", hessian_structure="ekfac"
    )
    la.fit(_loader(X, y))
    return la, X, y


@pytest.fixture(scope="module")
def ekfac_regressor():
    model, X, y = _regression_data()
    la = Laplace(
        model,
        "regression",
        subset_of_weights="all",
        hessian_structure="ekfac",
        sigma_noise=0.5,
    )
    la.fit(_loader(X, y))
    return la, X, y


def test_predict_plain_module_classification():
    model, X, y = _classification_data()
    predictions = predict(model, _loader(X, y), likelihood="classification")
    assert isinstance(predictions, ClassificationPredictions)
    torch.testing.assert_close(predictions.probs, model(X).softmax(dim=1).detach())
    assert torch.equal(predictions.targets, y)
    metrics = evaluate(model, _loader(X, y), likelihood="classification", n_bins=5)
    assert set(metrics) == CLASSIFICATION_KEYS
    _assert_finite(metrics)
    assert metrics["nll"] == negative_log_likelihood(predictions.probs, y)
    # sigma_noise plays no role in classification and is ignored
    ignored = predict(
        model, _loader(X, y), likelihood="classification", sigma_noise=1.0
    )
    torch.testing.assert_close(ignored.probs, predictions.probs)


def test_predict_plain_module_regression():
    model, X, y = _regression_data()
    predictions = predict(
        model, _loader(X, y), likelihood="regression", sigma_noise=0.5
    )
    assert isinstance(predictions, RegressionPredictions)
    torch.testing.assert_close(predictions.mean, model(X).detach())
    torch.testing.assert_close(predictions.variance, torch.full_like(y, 0.25))
    metrics = evaluate(model, _loader(X, y), likelihood="regression", sigma_noise=0.5)
    assert set(metrics) == REGRESSION_KEYS
    _assert_finite(metrics)
    assert metrics["nll"] == gaussian_nll(predictions.mean, predictions.variance, y)


def test_predict_reshapes_one_dimensional_regression_targets():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).to(F64)
    X, y = torch.randn(6, 2, dtype=F64), torch.randn(6, dtype=F64)
    predictions = predict(
        model, _loader(X, y), likelihood="regression", sigma_noise=1.0
    )
    assert predictions.targets.shape == (6, 1)
    torch.testing.assert_close(predictions.targets, y[:, None])


class _DictModel(nn.Module):
    """A Hugging Face style model: takes the whole batch dict."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)

    def forward(self, data: dict[str, Tensor]) -> Tensor:
        return self.net(data["input_ids"])


class _DictDataset(Dataset):
    def __init__(self, X: Tensor, y: Tensor) -> None:
        self.X, self.y = X, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        return {"input_ids": self.X[i], "labels": self.y[i]}


def test_predict_dict_batches():
    _, X, y = _classification_data()
    torch.manual_seed(0)
    model = _DictModel()
    loader = DataLoader(_DictDataset(X, y), batch_size=10)
    map_predictions = predict(model, loader, likelihood="classification")
    torch.testing.assert_close(
        map_predictions.probs, model({"input_ids": X}).softmax(dim=1).detach()
    )
    la = Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="kron",
    )
    la.fit(loader)
    predictions = predict(la, loader)
    assert predictions.probs.shape == (24, 3)
    assert torch.equal(predictions.targets, y)


def test_laplace_torch_kron_last_layer():
    model, X, y = _classification_data()
    la = Laplace(
        model,
        "classification",
        subset_of_weights="last_layer",
        hessian_structure="kron",
    )
    la.fit(_loader(X, y))
    predictions = predict(la, _loader(X, y))
    torch.testing.assert_close(predictions.probs, la(X, link_approx="probit"))
    ood_X = 5 * torch.randn(12, 2, dtype=F64)
    ood_labels = torch.full((12,), 7)  # outside the model's classes: not checked
    metrics = evaluate(la, _loader(X, y), ood_loader=_loader(ood_X, ood_labels))
    assert set(metrics) == CLASSIFICATION_KEYS | OOD_KEYS
    _assert_finite(metrics)
    assert metrics["nll"] == negative_log_likelihood(predictions.probs, y)


@pytest.mark.parametrize(
    ("pred_type", "link_approx"), [("glm", "probit"), ("glm", "mc"), ("nn", "probit")]
)
def test_ekfac_classification(ekfac_classifier, pred_type, link_approx):
    la, X, y = ekfac_classifier
    options = {"pred_type": pred_type, "link_approx": link_approx, "n_samples": 20}
    torch.manual_seed(0)
    predictions = predict(la, _loader(X, y), **options)
    assert predictions.probs.shape == (24, 3)
    ood_X = 5 * torch.randn(12, 2, dtype=F64)
    torch.manual_seed(0)
    metrics = evaluate(la, _loader(X, y), ood_loader=_loader(ood_X, y[:12]), **options)
    assert set(metrics) == CLASSIFICATION_KEYS | OOD_KEYS
    _assert_finite(metrics)
    assert metrics["nll"] == pytest.approx(
        negative_log_likelihood(predictions.probs, y), abs=1e-12
    )


def test_ekfac_regression_glm(ekfac_regressor):
    la, X, y = ekfac_regressor
    predictions = predict(la, _loader(X, y))
    f_mu, f_var = la(X)
    torch.testing.assert_close(predictions.mean, f_mu)
    # predictive variance of y: diagonal of the functional covariance + σ²
    torch.testing.assert_close(
        predictions.variance, torch.diagonal(f_var, dim1=1, dim2=2) + 0.25
    )
    metrics = evaluate(la, _loader(X, y))
    assert set(metrics) == REGRESSION_KEYS
    _assert_finite(metrics)
    assert metrics["nll"] == gaussian_nll(predictions.mean, predictions.variance, y)


def test_ekfac_regression_nn(ekfac_regressor):
    la, X, y = ekfac_regressor
    # a list of batches: iterating a DataLoader would draw from the global RNG
    torch.manual_seed(0)
    predictions = predict(la, [(X, y)], pred_type="nn", n_samples=30)
    torch.manual_seed(0)
    f_mu, f_var = la(X, pred_type="nn", link_approx="mc", n_samples=30)
    # "nn" returns the sample variance (B, K) of f; σ² is added
    torch.testing.assert_close(predictions.variance, f_var + 0.25)
    torch.testing.assert_close(predictions.mean, f_mu)
    metrics = evaluate(la, _loader(X, y), pred_type="nn", n_samples=30)
    _assert_finite(metrics)


def test_predict_option_errors():
    model, X, y = _classification_data()
    loader = _loader(X, y)
    with pytest.raises(ValueError, match=r"Unknown pred_type 'lin'.*'glm', 'nn'"):
        predict(model, loader, likelihood="classification", pred_type="lin")
    with pytest.raises(ValueError, match=r"Unknown link_approx 'logit'.*'probit'"):
        predict(model, loader, likelihood="classification", link_approx="logit")
    with pytest.raises(ValueError, match="plain nn.Module needs likelihood"):
        predict(model, loader)
    with pytest.raises(ValueError, match=r"Unknown likelihood 'poisson'"):
        evaluate(model, loader, likelihood="poisson")
    with pytest.raises(ValueError, match="sigma_noise as a float > 0, got None"):
        predict(model, loader, likelihood="regression")
    with pytest.raises(ValueError, match="sigma_noise as a float > 0, got -1.0"):
        predict(model, loader, likelihood="regression", sigma_noise=-1.0)
    with pytest.raises(ValueError, match="n_samples must be an integer, got 2.0"):
        predict(model, loader, likelihood="classification", n_samples=2.0)
    with pytest.raises(
        TypeError, match="an nn.Module or an evaluation.peers.Predictive, got str"
    ):
        predict("model", loader, likelihood="classification")


def test_predict_laplace_errors(ekfac_classifier, ekfac_regressor):
    la, X, y = ekfac_classifier
    with pytest.raises(ValueError, match=r"likelihood='regression' disagrees"):
        predict(la, _loader(X, y), likelihood="regression")
    with pytest.raises(ValueError, match=r"read from the Laplace object"):
        predict(la, _loader(X, y), sigma_noise=1.0)
    reg, X_reg, y_reg = ekfac_regressor
    with pytest.raises(ValueError, match=r"n_samples must be >= 2 .*'nn'"):
        predict(reg, _loader(X_reg, y_reg), pred_type="nn", n_samples=1)
    with pytest.raises(ValueError, match="ood_loader is only supported for classif"):
        evaluate(reg, _loader(X_reg, y_reg), ood_loader=_loader(X_reg, y_reg))


def test_predict_data_errors():
    model, X, y = _classification_data()
    with pytest.raises(ValueError, match="yielded no batches"):
        predict(model, [], likelihood="classification")
    with pytest.raises(ValueError, match=r"\(x, y\) tuples/lists or dicts"):
        predict(model, [X], likelihood="classification")
    with pytest.raises(KeyError, match=r"no target key 'labels' \(keys: \['x', 'y'\]"):
        predict(model, [{"x": X, "y": y}], likelihood="classification")
    with pytest.raises(
        ValueError, match=r"shape \(24, 3\) do not match targets.*\(24, 2\)"
    ):
        predict(model, [(X, torch.zeros(24, 2))], likelihood="classification")
    reg_model, X_reg, _ = _regression_data()
    with pytest.raises(ValueError, match=r"mean of shape \(24, 2\).*targets of shape"):
        predict(
            reg_model,
            [(X_reg, torch.zeros(24, 3, dtype=F64))],
            likelihood="regression",
            sigma_noise=1.0,
        )
