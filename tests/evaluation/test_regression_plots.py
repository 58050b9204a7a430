"""Every regression figure renders to a real, non-constant PNG; bad inputs raise."""

from __future__ import annotations

import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from ekfac_laplace.evaluation.plotting import new_figure
from ekfac_laplace.evaluation.regression_plots import (
    coverage_curves,
    regression_bands,
    residual_histogram,
)
from tests.evaluation.images import assert_real_image

F64 = torch.float64

COVERAGE = {"MAP": {0.5: 0.4, 0.9: 0.8}, "EKFAC": {0.1: 0.12, 0.5: 0.5, 0.9: 0.92}}


def _regression() -> tuple[Tensor, Tensor, Tensor]:
    generator = torch.Generator().manual_seed(2)
    mean = torch.randn(60, 1, generator=generator, dtype=F64)
    targets = mean + 0.5 * torch.randn(60, 1, generator=generator, dtype=F64)
    return mean, torch.full_like(mean, 0.25), targets


def _draw_all(axes: list[Axes]) -> None:
    x_train = torch.linspace(-2, 2, 20, dtype=F64)
    x_grid = torch.linspace(-3, 3, 50, dtype=F64)
    regression_bands(
        x_train,
        x_train.sin(),
        x_grid,
        x_grid.sin(),
        0.1 + x_grid.abs() / 5,
        ax=axes[0],
        title="bands",
    )
    coverage_curves(COVERAGE, n_examples=50, ax=axes[1], title="coverage")
    mean, variance, targets = _regression()
    residual_histogram(mean, variance, targets, ax=axes[2], title="residuals")


def test_all_functions_share_one_figure(tmp_path):
    fig, axes = new_figure(3)
    _draw_all(axes)
    assert_real_image(fig, tmp_path / "all.png")


def test_each_function_draws_a_real_image(tmp_path):
    draws = {
        "bands": lambda ax: regression_bands(
            torch.arange(5.0),
            torch.arange(5.0),
            torch.arange(5.0),
            torch.arange(5.0),
            torch.ones(5),
            ax=ax,
        ),
        "coverage": lambda ax: coverage_curves(COVERAGE, deviation=True, ax=ax),
        "residuals": lambda ax: residual_histogram(*_regression(), ax=ax),
    }
    for name, draw in draws.items():
        fig, (ax,) = new_figure()
        assert draw(ax) is ax
        assert_real_image(fig, tmp_path / name / f"{name}.png")


def test_ax_none_creates_a_figure(tmp_path):
    axes = [
        regression_bands(
            torch.arange(4.0),
            torch.arange(4.0),
            torch.arange(4.0),
            torch.zeros(4),
            torch.ones(4),
        ),
        coverage_curves(COVERAGE),
        residual_histogram(*_regression()),
    ]
    for index, ax in enumerate(axes):
        assert isinstance(ax, Axes) and isinstance(ax.get_figure(), Figure)
        assert_real_image(ax.get_figure(), tmp_path / f"own_{index}.png")


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match=r"x_train 5, y_train 4"):
        regression_bands(
            torch.zeros(5),
            torch.zeros(4),
            torch.zeros(3),
            torch.zeros(3),
            torch.ones(3),
        )
    with pytest.raises(ValueError, match=r"x_grid 3, mean 3, std 2"):
        regression_bands(
            torch.zeros(5),
            torch.zeros(5),
            torch.zeros(3),
            torch.zeros(3),
            torch.ones(2),
        )
    with pytest.raises(ValueError, match=r"mean must have shape \(N,\) or \(N, 1\)"):
        regression_bands(
            torch.zeros(5),
            torch.zeros(5),
            torch.zeros(3),
            torch.zeros(3, 2),
            torch.ones(3),
        )
    with pytest.raises(ValueError, match="std must be non-negative"):
        regression_bands(
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2),
            -torch.ones(2),
        )
    with pytest.raises(ValueError, match="n_std must be positive"):
        regression_bands(
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2),
            torch.zeros(2),
            torch.ones(2),
            n_std=0,
        )
    with pytest.raises(ValueError, match="results is empty"):
        coverage_curves({})
    with pytest.raises(ValueError, match="curve of 'MAP' is empty"):
        coverage_curves({"MAP": {}})
    with pytest.raises(ValueError, match=r"Levels of 'MAP' must lie in \(0, 1\)"):
        coverage_curves({"MAP": {1.0: 1.0}})
    with pytest.raises(ValueError, match="n_examples must be a positive integer"):
        coverage_curves(COVERAGE, n_examples=0)
    mean, variance, targets = _regression()
    with pytest.raises(ValueError, match="variance must be positive"):
        residual_histogram(mean, -variance, targets)
    with pytest.raises(ValueError, match="Shapes must match"):
        residual_histogram(mean, variance, targets[:5])


def test_coverage_and_residuals_show_calibration():
    ax = coverage_curves(COVERAGE, n_examples=100)
    labels = ax.get_legend_handles_labels()[1]
    assert labels[-2:] == ["MAP", "EKFAC"] and "perfect calibration" in labels
    deviation = coverage_curves(COVERAGE, deviation=True)
    ekfac = deviation.get_lines()[-1]
    assert list(ekfac.get_ydata()) == pytest.approx([0.02, 0.0, 0.02])
    mean, variance, targets = _regression()
    ax = residual_histogram(mean, variance, targets)
    corner = ax.texts[0].get_text()
    residuals = ((targets - mean) / variance.sqrt()).flatten()
    assert f"std {residuals.std(unbiased=False):.2f}" in corner
