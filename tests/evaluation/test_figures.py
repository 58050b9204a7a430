"""The figures of a comparison and of a sampling run, as real PNG files."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch

from ekfac_laplace.evaluation import plotting
from ekfac_laplace.evaluation.figures import write_comparison_plots, write_sample_plot
from ekfac_laplace.evaluation.metrics import (
    ClassificationPredictions,
    RegressionPredictions,
)
from ekfac_laplace.evaluation.problems import load_problem
from ekfac_laplace.evaluation.report import Comparison, ComparisonRow
from ekfac_laplace.evaluation.sampling import SampleCheck


def _predictions(seed: int) -> ClassificationPredictions:
    generator = torch.Generator().manual_seed(seed)
    probs = torch.softmax(3 * torch.randn(40, 10, generator=generator), -1)
    return ClassificationPredictions(
        probs, torch.randint(0, 10, (40,), generator=generator)
    )


def _assert_images(paths) -> None:
    for path in paths:
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 50 and image.shape[1] > 50 and image.std() > 0


def _record_titles(monkeypatch) -> dict[str, str]:
    """Record each saved figure's title, by file name."""
    titles, save = {}, plotting.save_figure

    def recording_save(fig, path):
        titles[path.name] = fig.get_suptitle()
        return save(fig, path)

    monkeypatch.setattr(plotting, "save_figure", recording_save)
    return titles


def test_comparison_figures_of_a_classification_problem(tmp_path, monkeypatch):
    titles = _record_titles(monkeypatch)
    problem = load_problem("digits")
    rows, predictions = [], {}
    for seed, name in enumerate(("map", "all_ekfac")):
        shift = {
            kind: {s: {"nll": 1.0 + s / 100, "ece": 0.1} for s in strengths}
            for kind, strengths in problem.shift_loaders.items()
        }
        rows.append(
            ComparisonRow(
                name, None, None, None, test={"nll": 0.5, "ece": 0.05}, shift=shift
            )
        )
        predictions[name] = {"test": _predictions(seed), "ood": _predictions(seed + 9)}
    rows.append(ComparisonRow("all_full", "all", "full", "ggn", status="failed"))
    comparison = Comparison(rows, predictions, {"likelihood": "classification"})
    written = write_comparison_plots(comparison, problem, tmp_path)
    assert [path.name for path in written] == [
        "reliability.png",
        "confidence.png",
        "ood_entropy.png",
        "shift_rotation.png",
        "shift_noise.png",
    ]
    _assert_images(written)
    # Every title names the split; the OOD figure says what the OOD set is.
    assert all("digits test set" in title for title in titles.values()), titles
    assert "photographs" in titles["ood_entropy.png"]
    assert "rotated" in titles["shift_rotation.png"]
    nothing = Comparison([rows[-1]], {}, {})
    assert write_comparison_plots(nothing, problem, tmp_path / "none") == []


def test_comparison_figures_of_a_regression_problem(tmp_path, monkeypatch):
    titles = _record_titles(monkeypatch)
    problem = load_problem("diabetes")
    generator = torch.Generator().manual_seed(0)
    targets = torch.randn(111, 1, generator=generator)
    rows, predictions = [], {}
    for scale, name in ((0.5, "map"), (1.0, "all_ekfac")):
        rows.append(ComparisonRow(name, None, None, None, test={"nll": 1.0}))
        mean = targets + 0.8 * torch.randn(111, 1, generator=generator)
        test = RegressionPredictions(mean, torch.full_like(mean, scale), targets)
        predictions[name] = {"test": test, "ood": None, "shift": {}}
    comparison = Comparison(rows, predictions, {"likelihood": "regression"})
    written = write_comparison_plots(comparison, problem, tmp_path)
    assert [path.name for path in written] == ["coverage.png", "residuals.png"]
    _assert_images(written)
    assert all("diabetes test set (111 examples)" in t for t in titles.values())


def test_sample_figure(tmp_path):
    variance = torch.rand(30) + 0.1
    check = SampleCheck(50, variance, variance * 1.1, 0.1, 0.14, 0.05)
    predictions = {name: _predictions(seed) for seed, name in enumerate(("map", "glm"))}
    _assert_images([write_sample_plot(predictions, check, tmp_path / "c.png")])
    mean = torch.zeros(20, 1)
    regression = {
        name: RegressionPredictions(mean, torch.rand(20, 1) + 0.1, mean)
        for name in ("map", "glm")
    }
    _assert_images([write_sample_plot(regression, check, tmp_path / "r.png")])
    # One sample has no variance: the panel says so instead of failing.
    one = SampleCheck(1, variance, torch.full_like(variance, float("nan")), 0, None, 1)
    _assert_images([write_sample_plot(predictions, one, tmp_path / "one.png")])


def test_sample_figure_draws_the_monte_carlo_band(tmp_path, monkeypatch):
    axes = []
    save = plotting.save_figure

    def recording_save(fig, path):
        axes.extend(fig.axes)
        return save(fig, path)

    monkeypatch.setattr(plotting, "save_figure", recording_save)
    variance = torch.rand(30) + 0.1
    check = SampleCheck(51, variance, variance * 1.1, 0.1, 0.14, 0.05)
    predictions = {name: _predictions(seed) for seed, name in enumerate(("map", "glm"))}
    write_sample_plot(predictions, check, tmp_path / "c.png")
    variances, predictive = axes
    assert variances.get_title() and predictive.get_title()
    # ±2 sd of a sample variance of 51 draws: σ²(1 ± 2·sqrt(2/50)) = σ²(1 ± 0.4).
    x, y = variances.collections[0].get_paths()[0].vertices.T
    assert (y / x).min() == pytest.approx(0.6) and (y / x).max() == pytest.approx(1.4)
    assert "100% inside" in variances.get_legend_handles_labels()[1][0]


def test_prior_figures_draw_every_swept_candidate_with_its_marks(tmp_path, monkeypatch):
    from ekfac_laplace.evaluation.figures import prior_figures

    titles = _record_titles(monkeypatch)
    drawn = {}
    save = plotting.save_figure

    def keep_axes(fig, path):
        drawn[path.name] = fig.axes
        return save(fig, path)

    monkeypatch.setattr(plotting, "save_figure", keep_axes)
    problem = load_problem("digits")
    kinds = list(problem.shift_loaders)

    def metrics(prior: float) -> dict[str, float]:
        return {
            "prior_precision": prior,
            "log_marginal_likelihood": -10.0 * prior,
            "val_nll": 0.1 + 1 / (1 + prior),
            "test_nll": 0.1 + 1 / (1 + prior),
            "test_ece": 0.02 + 0.5 / (1 + prior),
            "ood_auroc_entropy": 0.8 + 0.1 / (1 + prior),
            "shift_nll": 3.0 - 1 / (1 + prior),
        }

    sweep = [metrics(p) for p in (0.1, 1.0, 10.0)]

    def row(name, tuning, prior):
        shift = {
            k: {15.0: {"nll": metrics(prior)["shift_nll"], "ece": 0.2}} for k in kinds
        }
        test = {"nll": metrics(prior)["test_nll"], "ece": metrics(prior)["test_ece"]}
        test["ood_auroc_entropy"] = metrics(prior)["ood_auroc_entropy"]
        return ComparisonRow(
            name, "all", "ekfac", "ggn", prior_tuning=tuning, prior_precision=prior,
            log_marginal_likelihood=-1.0, val={"nll": 0.3}, test=test, shift=shift,
            sweep=sweep,
        )  # fmt: skip

    map_test = {"nll": 0.1, "ece": 0.02, "ood_auroc_entropy": 0.8}
    map_row = ComparisonRow(
        "map", None, None, None, test=map_test, val={"nll": 0.1},
        shift={k: {15.0: {"nll": 3.0, "ece": 0.3}} for k in kinds},
    )  # fmt: skip
    rows = [
        map_row,
        row("all_ekfac", "validation", 10.0),
        row("all_ekfac@marglik", "marglik", 1.0),
    ]
    written = prior_figures(Comparison(rows, {}, {}), problem, tmp_path)
    assert [p.name for p in written] == ["prior_tradeoff.png", "prior_sweep.png"]
    _assert_images(written)
    assert "prior trade-off on digits" in titles["prior_tradeoff.png"]
    tradeoff = drawn["prior_tradeoff.png"]
    assert [(ax.get_xlabel(), ax.get_ylabel()) for ax in tradeoff] == [
        ("test NLL (log scale)", "NLL under shift (mean over shifts)"),
        ("test ECE (log scale)", "NLL under shift (mean over shifts)"),
        ("test NLL (log scale)", "OOD AUROC (entropy)"),
        ("test ECE (log scale)", "OOD AUROC (entropy)"),
    ]
    lines = {line.get_label(): line for line in tradeoff[0].get_lines()}
    assert list(lines["all_ekfac"].get_xdata()) == [s["test_nll"] for s in sweep]
    assert tuple(lines["prior by marglik"].get_xydata()[0]) == (
        metrics(1.0)["test_nll"],
        metrics(1.0)["shift_nll"],
    )
    assert tuple(lines["map"].get_xydata()[0]) == (0.1, 3.0)
    sweep_axes = drawn["prior_sweep.png"]
    assert [ax.get_ylabel() for ax in sweep_axes if ax.has_data()] == [
        "validation NLL",
        "test NLL",
        "test ECE",
        "NLL under shift (mean over shifts)",
        "OOD AUROC (entropy)",
        "log marginal likelihood",
    ]
    assert prior_figures(Comparison([map_row], {}, {}), problem, tmp_path) == []
