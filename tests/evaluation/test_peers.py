"""The non-Laplace peers: temperature scaling, deep ensembles, MC dropout."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace.evaluation.metrics import (
    ClassificationPredictions,
    RegressionPredictions,
)
from ekfac_laplace.evaluation.peers import (
    DeepEnsemble,
    MCDropout,
    TemperatureScaled,
    fit_temperature,
    mixture_moments,
    mixture_probs,
    network_outputs,
)
from ekfac_laplace.evaluation.predictions import predict


def _nll(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    return float(nn.functional.cross_entropy(logits / temperature, targets))


def _noisy_logits(seed: int = 0, n: int = 200, scale: float = 4.0):
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(0, 5, (n,), generator=generator)
    logits = torch.randn(n, 5, generator=generator, dtype=torch.float64)
    logits[torch.arange(n), targets] += 1.0
    return scale * logits, targets


@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0])
def test_fit_temperature_is_the_minimum_of_a_dense_grid(scale):
    logits, targets = _noisy_logits(scale=scale)
    fitted = fit_temperature(logits, targets)
    grid = torch.logspace(-2, 2, 4001, dtype=torch.float64)
    nlls = torch.tensor([_nll(logits, targets, float(t)) for t in grid])
    brute = float(grid[nlls.argmin()])
    assert fitted == pytest.approx(brute, rel=3e-3)  # grid spacing 2.3e-3
    assert _nll(logits, targets, fitted) <= float(nlls.min()) + 1e-10
    # the optimum is stationary: d NLL / d log T = 0
    log_t = torch.tensor(math.log(fitted), dtype=torch.float64, requires_grad=True)
    nn.functional.cross_entropy(logits / log_t.exp(), targets).backward()
    assert abs(float(log_t.grad)) < 1e-10


def test_fit_temperature_of_separable_data_sharpens_until_the_nll_is_flat():
    logits, targets = torch.tensor([[5.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1])
    fitted = fit_temperature(logits, targets)  # the minimum is at T -> 0
    assert fitted < 0.2 and _nll(logits.double(), targets, fitted) < 1e-12
    assert fit_temperature(logits, targets, bound=2.0) == pytest.approx(0.5)
    # every prediction wrong: the minimum is at T -> infinity, cut at the bound
    assert fit_temperature(logits, torch.tensor([1, 0]), bound=50.0) == 50.0


def _loader(*tensors, batch_size=7):
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size)


def test_temperature_scaled_classifier():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4)).double()
    X = torch.randn(40, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (40,))
    scaled = TemperatureScaled.fit(model, _loader(X, y), "classification")
    logits = model(X).detach()
    assert scaled.temperature == pytest.approx(fit_temperature(logits, y), rel=1e-6)
    predictions = predict(scaled, _loader(X, y))
    assert isinstance(predictions, ClassificationPredictions)
    expected = torch.softmax(logits / scaled.temperature, -1)
    torch.testing.assert_close(predictions.probs, expected)
    assert torch.equal(predictions.probs.argmax(-1), logits.argmax(-1))


def test_temperature_scaled_regressor_refits_the_noise_on_validation_data():
    torch.manual_seed(0)
    model = nn.Linear(2, 1).double()
    X = torch.randn(30, 2, dtype=torch.float64)
    y = torch.randn(30, 1, dtype=torch.float64)
    scaled = TemperatureScaled.fit(model, _loader(X, y), "regression", sigma_noise=0.5)
    rms = float((model(X) - y).detach().square().mean().sqrt())
    assert scaled.sigma_noise == pytest.approx(rms, rel=1e-12)
    assert scaled.temperature == pytest.approx(rms / 0.5, rel=1e-12)
    predictions = predict(scaled, _loader(X, y))
    assert isinstance(predictions, RegressionPredictions)
    torch.testing.assert_close(predictions.variance, torch.full_like(y, rms**2))
    with pytest.raises(ValueError, match="needs sigma_noise"):
        TemperatureScaled.fit(model, _loader(X, y), "regression")
    with pytest.raises(ValueError, match="temperature must be positive"):
        TemperatureScaled(model, "classification", 0.0)


def test_mixtures_by_hand():
    a = torch.tensor([[0.0, math.log(3.0)]])
    b = torch.tensor([[math.log(3.0), 0.0]])
    torch.testing.assert_close(mixture_probs([a, b]), torch.tensor([[0.5, 0.5]]))
    mean, variance = mixture_moments(
        [torch.tensor([[1.0]]), torch.tensor([[3.0]])], [1.0, 2.0]
    )
    # mixture of N(1, 1) and N(3, 4): mean 2, variance (1 + 4)/2 + ((1-2)² + (3-2)²)/2
    torch.testing.assert_close(mean, torch.tensor([[2.0]]))
    torch.testing.assert_close(variance, torch.tensor([[3.5]]))


def test_deep_ensemble_averages_its_members():
    torch.manual_seed(0)
    members = [nn.Linear(3, 4).double() for _ in range(3)]
    X = torch.randn(20, 3, dtype=torch.float64)
    y = torch.randint(0, 4, (20,))
    predictions = predict(DeepEnsemble(members, "classification"), _loader(X, y))
    expected = torch.stack([torch.softmax(m(X), -1) for m in members]).mean(0)
    torch.testing.assert_close(predictions.probs, expected.detach())
    regression = DeepEnsemble(members, "regression", [0.5, 1.0, 2.0])
    targets = torch.randn(20, 4, dtype=torch.float64)
    out = predict(regression, _loader(X, targets))
    outputs = torch.stack([m(X) for m in members]).detach()
    torch.testing.assert_close(out.mean, outputs.mean(0))
    noise = (0.25 + 1.0 + 4.0) / 3
    torch.testing.assert_close(out.variance, outputs.var(0, unbiased=False) + noise)
    with pytest.raises(ValueError, match="one sigma_noise per member"):
        DeepEnsemble(members, "regression", [1.0])
    with pytest.raises(ValueError, match="at least one member"):
        DeepEnsemble([], "classification")


def test_mc_dropout_averages_masks_and_keeps_the_other_modules_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 4)
    ).double()
    model.eval()
    X = torch.randn(10, 3, dtype=torch.float64)
    dropout = MCDropout(model, "classification", n_samples=5)
    torch.manual_seed(1)
    probs = dropout(X)
    # by hand: the same masks, drawn with only the dropout module in train mode
    torch.manual_seed(1)
    model[2].train()
    expected = torch.stack([torch.softmax(model(X), -1) for _ in range(5)]).mean(0)
    model[2].eval()
    torch.testing.assert_close(probs, expected)
    assert not model.training and not model[1].training and not model[2].training
    assert not torch.allclose(probs, torch.softmax(model(X), -1))  # masks mattered
    with pytest.raises(ValueError, match="needs a network with dropout modules"):
        MCDropout(nn.Linear(3, 4), "classification")
    with pytest.raises(ValueError, match="n_samples must be at least 1"):
        MCDropout(model, "classification", n_samples=0)


def test_predict_refuses_what_a_peer_owns():
    model = nn.Linear(2, 3)
    scaled = TemperatureScaled(model, "classification", 2.0)
    loader = _loader(torch.randn(4, 2), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="disagrees with the predictive's likelihood"):
        predict(scaled, loader, likelihood="regression")
    with pytest.raises(ValueError, match="sigma_noise is read from the Temperature"):
        predict(scaled, loader, sigma_noise=1.0)


def test_network_outputs_refuses_an_empty_loader():
    with pytest.raises(ValueError, match="validation loader is empty"):
        network_outputs(nn.Linear(2, 2), [])
