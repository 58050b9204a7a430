"""Prior tuning rules and the prior sweep."""

from __future__ import annotations

import pytest
import torch
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ekfac_laplace  # noqa: F401  (registers "ekfac")
from ekfac_laplace.evaluation.metrics import metrics_of
from ekfac_laplace.evaluation.predictions import predict
from ekfac_laplace.evaluation.priors import (
    evaluate_sets,
    sweep_prior,
    tune_prior,
    validation_curve,
    widest_within,
)
from ekfac_laplace.evaluation.settings import EvaluationData, EvaluationSettings


def test_widest_within_by_hand():
    curve = {0.1: 0.50, 1.0: 0.30, 10.0: 0.20, 100.0: 0.21, 1000.0: 0.20}
    assert widest_within(curve, 0.0) == 10.0  # ties: the widest (smallest) prior
    assert widest_within(curve, 0.01) == 10.0  # 0.21 <= 0.21 but 100 > 10
    assert widest_within(curve, 0.1) == 1.0  # 0.30 <= 0.30
    assert widest_within(curve, 0.3) == 0.1
    assert widest_within({3.0: -2.0, 1.0: -1.5}, 0.5) == 1.0  # nats, also below 0
    with pytest.raises(ValueError, match="curve is empty"):
        widest_within({}, 0.1)
    with pytest.raises(ValueError, match="tolerance must be non-negative"):
        widest_within(curve, -0.1)


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    X = torch.randn(60, 3)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(X), y).backward()
        optimizer.step()
    train = DataLoader(TensorDataset(X[:40], y[:40]), batch_size=16)
    val = DataLoader(TensorDataset(X[40:50], y[40:50]), batch_size=16)
    test = DataLoader(TensorDataset(X[50:], y[50:]), batch_size=16)
    ood = DataLoader(TensorDataset(3 * torch.randn(10, 3), torch.zeros(10).long()))
    shift = {"scale": {2.0: DataLoader(TensorDataset(2 * X[50:], y[50:]))}}
    la = Laplace(model, "classification", hessian_structure="ekfac")
    la.fit(train)
    return la, EvaluationData(train, test, val, ood, shift)


GRID = (0.01, 0.1, 1.0, 10.0, 100.0)


def test_validation_rules_pick_from_the_validation_curve(fitted):
    la, data = fitted
    settings = EvaluationSettings(prior_grid=GRID, val_tolerance=0.02)
    curve = validation_curve(la, settings, data.val_loader)
    for prior, nll in curve.items():
        la.prior_precision = prior
        expected = metrics_of(predict(la, data.val_loader))["nll"]
        assert nll == pytest.approx(expected, rel=1e-12)
    tune_prior(la, settings, data.val_loader, tuning="gridsearch")
    best = min(curve, key=curve.get)
    assert float(la.prior_precision) == pytest.approx(best)
    tune_prior(la, settings, data.val_loader)  # the settings' rule: "validation"
    chosen = float(la.prior_precision)
    assert chosen == pytest.approx(widest_within(curve, 0.02))
    assert curve[chosen] <= curve[best] + 0.02 and chosen <= best
    with pytest.raises(ValueError, match="'validation' needs val_loader"):
        tune_prior(la, settings, None)


def test_sweep_matches_evaluating_at_each_prior_and_restores_the_prior(fitted):
    la, data = fitted
    settings = EvaluationSettings(sweep_grid=(0.1, 10.0))
    la.prior_precision = 3.0
    points = sweep_prior(la, data, settings)
    assert float(la.prior_precision) == 3.0
    assert [p["prior_precision"] for p in points] == [0.1, 10.0]
    for point in points:
        la.prior_precision = point["prior_precision"]
        sets = evaluate_sets(la, data, settings.predictive, settings.n_bins)
        assert point["test_nll"] == pytest.approx(sets.test["nll"], rel=1e-12)
        assert point["val_ece"] == pytest.approx(sets.val["ece"], rel=1e-12)
        assert point["ood_auroc_entropy"] == pytest.approx(
            sets.test["ood_auroc_entropy"], rel=1e-12
        )
        assert point["shift_scale_nll"] == pytest.approx(
            sets.shift["scale"][2.0]["nll"]
        )
        assert point["shift_nll"] == point["shift_scale_nll"]  # one kind
        assert point["log_marginal_likelihood"] == pytest.approx(
            float(la.log_marginal_likelihood())
        )
        assert not any(key.startswith("shift_scale_2_") for key in point)
    assert points[0]["test_nll"] != points[1]["test_nll"]


def test_settings_refuse_bad_grids_and_tolerances():
    with pytest.raises(ValueError, match="sweep_grid must hold positive finite"):
        EvaluationSettings(sweep_grid=(1.0, 0.0))
    with pytest.raises(ValueError, match="prior_grid must hold positive finite"):
        EvaluationSettings(prior_grid=())
    with pytest.raises(ValueError, match="val_tolerance must be a non-negative number"):
        EvaluationSettings(val_tolerance=-0.1)
    with pytest.raises(ValueError, match="'validation' tunes a scalar prior"):
        EvaluationSettings(prior_structure="layerwise")
    EvaluationSettings(prior_tuning="marglik", prior_structure="layerwise")
