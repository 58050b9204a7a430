"""Figures for regression: interval coverage, standardised residuals, 1-D bands.

Like the classification plots of :mod:`~ekfac_laplace.evaluation.plotting`, every
function draws into a given matplotlib ``Axes`` or, with ``ax=None``, into a new one
from :func:`~ekfac_laplace.evaluation.plotting.new_figure`, and returns it; save the
figure with :func:`~ekfac_laplace.evaluation.plotting.save_figure`.
:func:`coverage_curves` and :func:`residual_histogram` show whether a Gaussian
predictive is calibrated; :func:`regression_bands` draws a 1-D predictive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from matplotlib.axes import Axes

from ekfac_laplace.evaluation.checks import check_n_bins, check_regression
from ekfac_laplace.evaluation.plotting import (
    ACCURACY_COLOR,
    ArrayLike,
    axes_or_new,
    line_style,
    positive_int,
)


# ------------------------------------------------------ regression calibration
def coverage_curves(
    results: Mapping[str, Mapping[float, float]],
    *,
    n_examples: int | None = None,
    deviation: bool = False,
    ax: Axes | None = None,
    title: str | None = None,
    legend: bool = True,
) -> Axes:
    """Regression calibration: coverage of central intervals against their level.

    A calibrated Gaussian predictive puts a fraction ``α`` of the targets inside its
    central ``α`` intervals, so its curve follows the diagonal (Kuleshov et al.,
    2018, with central intervals). With ``n_examples`` the band of ±2 binomial
    standard deviations, ``2·sqrt(α(1−α)/N)``, shows how far a calibrated
    predictive strays on ``N`` test targets by chance.

    Args:
        results: ``{candidate name: {level α: observed coverage}}``, e.g. from
            :func:`~ekfac_laplace.evaluation.metrics.interval_coverage`.
        n_examples: Number of targets behind each coverage (draws the band).
        deviation: Plot ``coverage − α`` (zero is calibrated) instead of the
            coverage, which separates curves that nearly coincide.
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.
        legend: Draw the legend in the axes; ``False`` for
            :func:`~ekfac_laplace.evaluation.plotting.legend_outside`.

    Returns:
        The axes.

    Raises:
        ValueError: If ``results`` or a curve is empty, a level is outside
            ``(0, 1)``, or ``n_examples`` is not a positive integer.
    """
    if not results:
        raise ValueError("results is empty; pass {name: {level: coverage}}.")
    if n_examples is not None:
        positive_int("n_examples", n_examples)
    ax = axes_or_new(ax)
    levels = np.linspace(0.0, 1.0, 101)
    reference = np.zeros_like(levels) if deviation else levels
    if n_examples is not None:
        half_width = 2 * np.sqrt(levels * (1 - levels) / n_examples)
        ax.fill_between(
            levels,
            reference - half_width,
            reference + half_width,
            color="0.85",
            linewidth=0,
            label=f"±2 sd of a calibrated predictive, N = {n_examples}",
        )
    ax.plot(levels, reference, "k--", linewidth=1, label="perfect calibration")
    for index, (name, curve) in enumerate(results.items()):
        if not curve:
            raise ValueError(f"The curve of {name!r} is empty; give it one point.")
        nominal = np.array(sorted(curve), dtype=np.float64)
        if ((nominal <= 0) | (nominal >= 1)).any():
            raise ValueError(
                f"Levels of {name!r} must lie in (0, 1), got {nominal.tolist()}."
            )
        observed = np.array([curve[level] for level in sorted(curve)])
        shown = observed - nominal if deviation else observed
        ax.plot(nominal, shown, label=name, **line_style(index))
    ylabel = "coverage − nominal level" if deviation else "observed coverage"
    ax.set(xlim=(0, 1), xlabel="nominal level of the central interval")
    ax.set_ylabel(ylabel)
    if not deviation:
        ax.set_ylim(0, 1)
    if legend:
        ax.legend(loc="best", fontsize=7)
    if title is not None:
        ax.set_title(title)
    return ax


def residual_histogram(
    mean: ArrayLike,
    variance: ArrayLike,
    targets: ArrayLike,
    *,
    bins: int = 20,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Histogram of standardised residuals ``(y − μ)/σ`` against ``N(0, 1)``.

    For a calibrated Gaussian predictive the standardised residuals are standard
    normal: a histogram wider than the curve means overconfidence, narrower means
    underconfidence, shifted means bias. Their mean and standard deviation are
    printed in the corner.

    Args:
        mean: Predictive mean, shape ``(N,)`` or ``(N, K)``.
        variance: Predictive variance of ``y`` (positive), same shape.
        targets: Targets, same shape.
        bins: Number of equal-width bins.
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.

    Returns:
        The axes.

    Raises:
        ValueError: For mismatched shapes, a non-positive variance or bad ``bins``.
    """
    bins = check_n_bins(bins)
    mean, variance, targets = check_regression(
        mean=torch.as_tensor(mean),
        variance=torch.as_tensor(variance),
        targets=torch.as_tensor(targets),
    )
    residuals = ((targets - mean) / variance.sqrt()).flatten()
    z = residuals.detach().cpu().double().numpy()
    extent = max(4.0, float(np.abs(z).max()))
    ax = axes_or_new(ax)
    ax.hist(
        z,
        bins=np.linspace(-extent, extent, bins + 1),
        density=True,
        color=ACCURACY_COLOR,
        alpha=0.6,
        edgecolor="black",
        linewidth=0.6,
        label="standardised residuals",
    )
    grid = np.linspace(-extent, extent, 200)
    ax.plot(
        grid,
        np.exp(-(grid**2) / 2) / math.sqrt(2 * math.pi),
        color="black",
        linewidth=1.2,
        label="N(0, 1): calibrated",
    )
    ax.text(
        0.03,
        0.97,
        f"mean {z.mean():.2f}\nstd {z.std():.2f}",
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=7,
    )
    ax.set(xlabel="(y − predictive mean) / predictive std", ylabel="density")
    ax.legend(loc="upper right", fontsize=7)
    if title is not None:
        ax.set_title(title)
    return ax


# ----------------------------------------------------------- 1-D regression
def regression_bands(
    x_train: ArrayLike,
    y_train: ArrayLike,
    x_grid: ArrayLike,
    mean: ArrayLike,
    std: ArrayLike,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    n_std: float = 2.0,
) -> Axes:
    """1-D regression: training points, predictive mean and a ``±n_std`` band.

    Args:
        x_train: Training inputs, shape ``(N,)`` or ``(N, 1)``.
        y_train: Training targets, same length.
        x_grid: Inputs of the predictive, shape ``(M,)`` or ``(M, 1)``.
        mean: Predictive mean on ``x_grid``, same length.
        std: Predictive standard deviation on ``x_grid`` (non-negative).
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.
        n_std: Half-width of the band in standard deviations (> 0).

    Returns:
        The axes.

    Raises:
        ValueError: For mismatched lengths, a negative ``std`` or ``n_std <= 0``.
    """
    x_train, y_train = _vector("x_train", x_train), _vector("y_train", y_train)
    _same_length(x_train=x_train, y_train=y_train)
    x_grid, mean, std = (
        _vector("x_grid", x_grid),
        _vector("mean", mean),
        _vector("std", std),
    )
    _same_length(x_grid=x_grid, mean=mean, std=std)
    if (std < 0).any():
        raise ValueError(f"std must be non-negative, got minimum {std.min():.4g}.")
    if not n_std > 0:
        raise ValueError(f"n_std must be positive, got {n_std!r}.")
    order = np.argsort(x_grid)
    x_grid, mean, std = x_grid[order], mean[order], std[order]
    ax = axes_or_new(ax)
    ax.fill_between(
        x_grid,
        mean - n_std * std,
        mean + n_std * std,
        color=ACCURACY_COLOR,
        alpha=0.25,
        label=f"±{n_std:g} std",
    )
    ax.plot(x_grid, mean, color=ACCURACY_COLOR, label="predictive mean")
    ax.scatter(x_train, y_train, s=10, color="black", zorder=3, label="training data")
    ax.set(xlabel="x", ylabel="y")
    ax.legend(fontsize=7)
    if title is not None:
        ax.set_title(title)
    return ax


def _vector(name: str, values: ArrayLike) -> np.ndarray:
    """A float64 NumPy vector from shape ``(N,)`` or ``(N, 1)``."""
    tensor = torch.as_tensor(values)
    if tensor.ndim == 2 and tensor.shape[1] == 1:
        tensor = tensor[:, 0]
    if tensor.ndim != 1 or tensor.numel() == 0:
        raise ValueError(
            f"{name} must have shape (N,) or (N, 1) with N >= 1, got shape "
            f"{tuple(tensor.shape)}."
        )
    return tensor.detach().cpu().double().numpy()


def _same_length(**vectors: np.ndarray) -> None:
    lengths = {name: len(vector) for name, vector in vectors.items()}
    if len(set(lengths.values())) != 1:
        described = ", ".join(f"{name} {n}" for name, n in lengths.items())
        raise ValueError(f"Lengths must match, got {described}.")
