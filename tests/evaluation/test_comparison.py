"""compare: every candidate fitted, tuned and evaluated the same way."""

from __future__ import annotations

import csv
import json
import math
import warnings

import pytest
import torch
from laplace import Laplace
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace.evaluation.candidates import DEFAULT_CANDIDATES, Candidate
from ekfac_laplace.evaluation.comparison import (
    EvaluationSettings,
    compare,
    residual_noise_scale,
)
from ekfac_laplace.evaluation.metrics import classification_metrics, regression_metrics
from ekfac_laplace.evaluation.models import mlp, train_map
from ekfac_laplace.evaluation.predictions import predict


def _compare(
    model,
    likelihood,
    train_loader,
    test_loader,
    *,
    candidates=DEFAULT_CANDIDATES,
    val_loader=None,
    ood_loader=None,
    shift_loaders=None,
    **settings,
):
    """compare with the evaluation settings as keywords (marglik unless told)."""
    settings = {"prior_tuning": "marglik", **settings}
    return compare(
        model,
        likelihood,
        train_loader,
        test_loader,
        candidates=candidates,
        val_loader=val_loader,
        ood_loader=ood_loader,
        shift_loaders=shift_loaders,
        settings=EvaluationSettings(**settings),
    )


def _loaders(likelihood: str, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    X = torch.randn(150, 3, generator=generator)
    if likelihood == "classification":
        y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    else:
        y = torch.sin(X[:, :1]) + 0.1 * torch.randn(150, 1, generator=generator)
    parts = [(0, 80), (80, 110), (110, 150)]
    return [DataLoader(TensorDataset(X[a:b], y[a:b]), batch_size=32) for a, b in parts]


@pytest.fixture(scope="module")
def classification():
    torch.manual_seed(0)
    train, val, test = _loaders("classification")
    model = train_map(mlp((3,), 3, hidden=(8,)), train, "classification", epochs=40)
    shift = {
        "noise": {
            s: DataLoader(
                TensorDataset(
                    test.dataset.tensors[0] + s * torch.randn(40, 3),
                    test.dataset.tensors[1],
                ),
                batch_size=32,
            )
            for s in (0.5, 1.0)
        }
    }
    ood = DataLoader(
        TensorDataset(5 * torch.randn(30, 3), -torch.ones(30, dtype=torch.long)),
        batch_size=32,
    )
    return model, train, val, test, shift, ood


class _OutOfMemory(Candidate):
    def build(self, model, likelihood, *, sigma_noise=1.0):
        raise MemoryError("simulated: not enough memory for the Hessian")


def test_compare_classification_rows_match_direct_evaluation(classification):
    model, train, val, test, shift, ood = classification
    before = [p.detach().clone() for p in model.parameters()]
    comparison = _compare(
        model,
        "classification",
        train,
        test,
        candidates=["map", "ll_kron", "ll_ekfac", "all_ekfac", "all_diag"],
        val_loader=val,
        ood_loader=ood,
        shift_loaders=shift,
        marglik_steps=30,
        keep_fitted=True,
    )
    assert [row.candidate for row in comparison.rows] == [
        "map",
        "ll_kron",
        "ll_ekfac",
        "all_ekfac",
        "all_diag",
    ]
    assert all(row.ok for row in comparison.rows), comparison.table()
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)

    # The MAP row is the network's softmax, scored by the calibration module.
    map_row = comparison.row("map")
    with torch.no_grad():
        X, y = test.dataset.tensors
        probs = model(X).softmax(-1)
    assert map_row.test["accuracy"] == pytest.approx(
        (probs.argmax(-1) == y).double().mean().item()
    )
    assert map_row.log_marginal_likelihood is None and map_row.fit_seconds is None

    # The EKFAC row: same numbers as a Laplace object fitted by hand at that prior.
    row = comparison.row("all_ekfac")
    la = Laplace(model, "classification", "all", "ekfac")
    la.fit(train)
    la.prior_precision = row.prior_precision
    assert row.log_marginal_likelihood == pytest.approx(
        la.log_marginal_likelihood().item(), rel=1e-5
    )
    direct = classification_metrics(
        predict(la, test), predict(la, ood), n_bins=comparison.config["n_bins"]
    )
    for key, value in direct.items():
        assert row.test[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert set(row.shift["noise"]) == {0.5, 1.0}
    assert row.fit_seconds > 0 and row.tune_seconds > 0
    assert row.n_params == sum(p.numel() for p in model.parameters())
    assert comparison.row("ll_ekfac").n_params == 8 * 3 + 3
    assert comparison.fitted["all_ekfac"].prior_precision.item() == pytest.approx(
        row.prior_precision
    )
    assert {"ood_auroc_entropy", "ood_fpr95_max_prob"} <= set(row.test)

    record = row.record()
    assert record["shift_noise_nll"] == pytest.approx(
        (row.shift["noise"][0.5]["nll"] + row.shift["noise"][1.0]["nll"]) / 2
    )
    assert record["shift_noise_0.5_ece"] == row.shift["noise"][0.5]["ece"]
    assert record["val_nll"] == row.val["nll"]
    assert "all_ekfac" in comparison.table()
    assert comparison.table(markdown=True).startswith("| candidate |")


def test_failed_candidate_is_a_row_and_leaves_the_model(classification, tmp_path):
    model, train, _, test, _, _ = classification
    before = [p.detach().clone() for p in model.parameters()]
    failing = _OutOfMemory("all_full", "all", "full", "ggn")
    comparison = _compare(
        model, "classification", train, test, candidates=[failing, "ll_ekfac"]
    )
    first, second = comparison.rows
    assert first.status == "failed" and not first.ok
    assert first.error == "MemoryError: simulated: not enough memory for the Hessian"
    assert second.ok
    assert "MemoryError" in comparison.table()
    for p, q in zip(before, model.parameters()):
        assert torch.equal(p, q)
    # Files: JSON parses, non-finite numbers become null, CSV has every column.
    comparison.rows[1].test["nll"] = math.inf
    payload = json.loads(comparison.to_json(tmp_path / "r.json").read_text())
    assert payload["rows"][0]["error"].startswith("MemoryError")
    assert payload["records"][1]["test_nll"] is None
    with comparison.to_csv(tmp_path / "r.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["candidate"] for r in rows] == ["all_full", "ll_ekfac"]
    assert rows[0]["status"] == "failed" and "test_accuracy" in rows[0]


def test_gridsearch_picks_the_lowest_validation_nll(classification):
    model, train, val, test, _, _ = classification
    grid = (0.01, 1.0, 100.0)
    comparison = _compare(
        model,
        "classification",
        train,
        test,
        candidates=["ll_ekfac"],
        val_loader=val,
        prior_tuning="gridsearch",
        prior_grid=grid,
    )
    row = comparison.row("ll_ekfac")
    la = Laplace(model, "classification", "last_layer", "ekfac")
    la.fit(train)
    nlls = []
    for value in grid:
        la.prior_precision = value
        nlls.append(classification_metrics(predict(la, val))["nll"])
    assert row.prior_precision == grid[nlls.index(min(nlls))]
    assert row.val["nll"] == pytest.approx(min(nlls), rel=1e-6)


def test_layerwise_marglik_prior(classification):
    model, train, _, test, _, _ = classification
    row = _compare(
        model,
        "classification",
        train,
        test,
        candidates=["all_ekfac"],
        prior_structure="layerwise",
        marglik_steps=10,
    ).rows[0]
    assert row.ok and isinstance(row.prior_precision, list)
    assert len(row.prior_precision) == 4  # two weights, two biases
    geometric = math.exp(sum(map(math.log, row.prior_precision)) / 4)
    assert row.record()["prior_precision"] == pytest.approx(geometric)


def test_compare_regression_estimates_the_noise():
    torch.manual_seed(0)
    train, val, test = _loaders("regression")
    model = train_map(mlp((3,), 1, hidden=(8,)), train, "regression", epochs=40)
    comparison = _compare(
        model,
        "regression",
        train,
        test,
        candidates=["map", "all_ekfac", "ll_kron"],
        val_loader=val,
        marglik_steps=20,
    )
    sigma = comparison.config["sigma_noise"]
    assert sigma == pytest.approx(residual_noise_scale(model, train))
    assert all(row.ok for row in comparison.rows), comparison.table()
    map_row = comparison.row("map")
    X, y = test.dataset.tensors
    with torch.no_grad():
        mean = model(X)
    assert map_row.test["rmse"] == pytest.approx(
        ((mean - y) ** 2).mean().sqrt().item(), rel=1e-6
    )
    ekfac = predict(
        comparison.fitted.get("all_ekfac") or _fit(model, train, sigma), test
    )
    assert comparison.row("all_ekfac").test.keys() == regression_metrics(ekfac).keys()
    assert "test_rmse" in comparison.table()


def _fit(model, train, sigma):
    la = Laplace(model, "regression", "all", "ekfac", sigma_noise=sigma)
    la.fit(train)
    return la


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"candidates": []}, "No candidates"),
        ({"candidates": ["map", "map"]}, "distinct"),
        ({"candidates": ["all_blocks"]}, "Unknown candidate"),
        ({"prior_tuning": "cv"}, "Unknown prior_tuning"),
        ({"prior_tuning": "gridsearch"}, "needs val_loader"),
        ({"prior_structure": "diag"}, "Unknown prior_structure"),
        ({"pred_type": "gp"}, "Unknown pred_type"),
        ({"likelihood": "poisson"}, "Unknown likelihood"),
    ],
)
def test_bad_arguments_fail_before_fitting(classification, kwargs, match):
    model, train, _, test, _, _ = classification
    kwargs = {"likelihood": "classification", **kwargs}
    with pytest.raises(ValueError, match=match), warnings.catch_warnings():
        _compare(model, train_loader=train, test_loader=test, **kwargs)


def test_rows_are_reproducible_and_leave_the_global_rng(classification):
    model, train, _, test, _, _ = classification
    options = {
        "candidates": ["all_ekfac:mc", "ll_ekfac"],
        "pred_type": "nn",
        "n_samples": 5,
        "marglik_steps": 5,
    }
    timing = ("fit_seconds", "tune_seconds", "predict_seconds", "fit_memory_mib")
    torch.manual_seed(123)
    first = _compare(model, "classification", train, test, **options).records()
    after_compare = torch.rand(1)
    torch.manual_seed(123)
    expected = torch.rand(1)
    # The second candidate alone gives the same row as after the first one.
    second = _compare(model, "classification", train, test, **options).records()
    alone = _compare(
        model, "classification", train, test, **{**options, "candidates": ["ll_ekfac"]}
    ).records()
    assert torch.equal(after_compare, expected)
    for a, b in zip(first, second):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }
    assert alone[0]["test_nll"] == first[1]["test_nll"]
    other_seed = _compare(
        model, "classification", train, test, **{**options, "seed": 1}
    ).records()
    assert other_seed[1]["test_nll"] != first[1]["test_nll"]


def test_peers_tunings_sharing_a_fit_and_the_sweep(classification):
    model, train, val, test, _, _ = classification
    trained = []

    def train_peer(seed: int, dropout: float) -> nn.Module:
        trained.append((seed, dropout))
        net = mlp((3,), 3, hidden=(8,), dropout=dropout)
        return train_map(net, train, "classification", epochs=3, seed=seed)

    comparison = compare(
        model,
        "classification",
        train,
        test,
        candidates=[
            "map_ts",
            "ensemble3",
            "mc_dropout:0.2",
            "ll_ekfac",
            "ll_ekfac@marglik",
            "all_ekfac",
        ],
        val_loader=val,
        settings=EvaluationSettings(
            prior_grid=(0.1, 1.0, 10.0),
            sweep_grid=(0.5, 5.0),
            sweep_candidates=["ll_ekfac"],
            marglik_steps=5,
        ),
        train_peer=train_peer,
    )
    assert all(row.ok for row in comparison.rows), comparison.table()
    assert trained == [(1, 0.0), (2, 0.0), (0, 0.2)]  # the MAP is member 0
    ts = comparison.row("map_ts")
    assert ts.temperature > 0 and ts.prior_precision is None
    assert ts.record()["temperature"] == ts.temperature
    assert comparison.row("ensemble3").n_params == 3 * sum(
        p.numel() for p in model.parameters()
    )
    tuned, marglik = comparison.row("ll_ekfac"), comparison.row("ll_ekfac@marglik")
    assert (tuned.prior_tuning, marglik.prior_tuning) == ("validation", "marglik")
    assert tuned.fit_seconds == marglik.fit_seconds  # one fit, shared
    assert tuned.prior_precision in (0.1, 1.0, 10.0)
    assert [p["prior_precision"] for p in tuned.sweep] == [0.5, 5.0]
    assert marglik.sweep is tuned.sweep
    assert comparison.row("all_ekfac").sweep == []  # not among sweep_candidates
    assert "prior_tuning" in comparison.table()


def test_kept_fits_keep_each_rows_prior(classification):
    model, train, val, test, _, _ = classification
    comparison = compare(
        model,
        "classification",
        train,
        test,
        candidates=["ll_ekfac", "ll_ekfac@marglik"],
        val_loader=val,
        settings=EvaluationSettings(
            prior_grid=(100.0, 1000.0), marglik_steps=20, keep_fitted=True
        ),
    )
    tuned, marglik = (
        comparison.fitted["ll_ekfac"],
        comparison.fitted["ll_ekfac@marglik"],
    )
    assert tuned is not marglik and tuned.H is marglik.H  # one fit
    for name, la in comparison.fitted.items():
        assert float(la.prior_precision) == comparison.row(name).prior_precision
    assert float(tuned.prior_precision) != float(marglik.prior_precision)
    nll = classification_metrics(predict(tuned, test))["nll"]
    assert nll == pytest.approx(comparison.row("ll_ekfac").test["nll"], rel=1e-12)


def test_peers_and_validation_rules_say_what_they_need(classification):
    model, train, val, test, _, _ = classification
    comparison = compare(
        model,
        "classification",
        train,
        test,
        candidates=["map_ts", "ensemble2", "ll_ekfac@marglik"],
        settings=EvaluationSettings(prior_tuning="marglik", marglik_steps=5),
    )
    ts, ensemble, laplace = comparison.rows
    assert "fits its temperature on validation data" in ts.error
    assert "pass compare(..., train_peer=...)" in ensemble.error
    assert laplace.ok
    with pytest.raises(ValueError, match="'validation' needs val_loader"):
        compare(model, "classification", train, test, candidates=["ll_ekfac"])
    with pytest.raises(ValueError, match="tune a scalar prior"):
        compare(
            model,
            "classification",
            train,
            test,
            candidates=["ll_ekfac@gridsearch"],
            val_loader=val,
            settings=EvaluationSettings(
                prior_tuning="marglik", prior_structure="layerwise"
            ),
        )
