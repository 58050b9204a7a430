"""Figures for classification calibration, and what every plot shares.

Every function draws into a given matplotlib ``Axes`` or, with ``ax=None``, into a
new one from :func:`new_figure`, and returns it. Figures are built from
``matplotlib.figure.Figure`` directly, not through ``pyplot``, so nothing here picks
a backend or needs a display; :func:`save_figure` writes them to disk. The regression
figures (interval coverage, standardised residuals, 1-D bands) are in
:mod:`~ekfac_laplace.evaluation.regression_plots`, built on the helpers here
(:func:`new_figure`, :func:`line_style`, :func:`legend_outside`, ...).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from ekfac_laplace.evaluation.checks import (
    check_classification,
    check_n_bins,
    check_probs,
    check_scores,
)
from ekfac_laplace.evaluation.metrics import (
    accuracy,
    calibration_bins,
    expected_calibration_error,
)

ArrayLike = Tensor | np.ndarray

ACCURACY_COLOR = "tab:blue"
GAP_COLOR = "tab:red"
SAVE_DPI = 120

#: Axis labels of the metrics and shifts the command line plots.
METRIC_LABELS = {
    "nll": "NLL",
    "ece": "ECE",
    "ece_adaptive": "adaptive ECE",
    "mce": "MCE",
    "brier": "Brier score",
    "accuracy": "accuracy",
    "rmse": "RMSE",
}
SHIFT_LABELS = {
    "rotation": "rotation angle (degrees)",
    "noise": "pixel-noise standard deviation (pixels in [0, 1])",
}
#: Line styles and markers cycle with coprime periods, so neighbouring candidates
#: (e.g. KFAC and EKFAC, whose curves often coincide) differ in both.
_LINE_STYLES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


# ------------------------------------------------------------------- figures
def new_figure(
    n_axes: int = 1, *, ncols: int | None = None, size: tuple[float, float] = (4.0, 3.2)
) -> tuple[Figure, list[Axes]]:
    """A figure with ``n_axes`` axes on a grid (constrained layout).

    Args:
        n_axes: Number of axes.
        ncols: Columns of the grid; default ``min(n_axes, 3)``.
        size: Width and height of one axes' cell, in inches.

    Returns:
        The figure and its axes, row by row.

    Raises:
        ValueError: If ``n_axes`` or ``ncols`` is not a positive integer.
    """
    n_axes = positive_int("n_axes", n_axes)
    ncols = min(n_axes, 3) if ncols is None else positive_int("ncols", ncols)
    nrows = math.ceil(n_axes / ncols)
    figure = Figure(figsize=(size[0] * ncols, size[1] * nrows), layout="constrained")
    axes = list(figure.subplots(nrows, ncols, squeeze=False).flat)
    for unused in axes[n_axes:]:
        figure.delaxes(unused)
    return figure, axes[:n_axes]


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write a figure to ``path`` (dpi 120), creating missing parent directories.

    Args:
        fig: The figure.
        path: Target file; its suffix picks the format, ``.png`` if it has none.

    Returns:
        The path written.
    """
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=SAVE_DPI)
    return path


def positive_int(name: str, value: object) -> int:
    """A positive integer option of a plot (a number of axes, points, examples).

    Args:
        name: The option's name, for the message.
        value: Its value.

    Returns:
        ``value``, unchanged.

    Raises:
        ValueError: If ``value`` is not an ``int`` of at least 1 (``bool`` is not).
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    return value


def axes_or_new(ax: Axes | None) -> Axes:
    """The axes to draw into: ``ax``, or the axes of a new :func:`new_figure`.

    Args:
        ax: Axes a caller passed, or ``None``.

    Returns:
        ``ax`` if given, else a new figure's one axes.
    """
    return new_figure()[1][0] if ax is None else ax


def line_style(index: int) -> dict[str, object]:
    """Colour, line style and (open) marker of the ``index``-th curve of a figure.

    Colours follow matplotlib's cycle; line styles and markers cycle with periods 4
    and 7, so curves drawn one after the other differ in all three and a curve that
    lies on top of another leaves it visible.

    Args:
        index: Position of the curve, from 0.

    Returns:
        Keyword arguments for ``Axes.plot``.
    """
    return {
        "color": f"C{index % 10}",
        "linestyle": _LINE_STYLES[index % len(_LINE_STYLES)],
        "marker": _MARKERS[index % len(_MARKERS)],
        "markersize": 5,
        "markerfacecolor": "none",
        "markeredgewidth": 1.2,
        "linewidth": 1.4,
    }


def legend_outside(
    fig: Figure,
    ax: Axes,
    *,
    loc: str = "outside right center",
    ncols: int = 1,
    fontsize: float = 7,
) -> None:
    """One legend for the whole figure, outside the axes, from ``ax``'s artists.

    Args:
        fig: The figure (its constrained layout makes room for the legend).
        ax: Axes whose labelled artists make the legend.
        loc: An ``"outside ..."`` location of ``Figure.legend``.
        ncols: Columns of the legend.
        fontsize: Font size of the entries.
    """
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc=loc, ncols=ncols, fontsize=fontsize)


# --------------------------------------------------------------- calibration
def reliability_diagram(
    probs: ArrayLike,
    targets: ArrayLike,
    *,
    n_bins: int = 15,
    binning: str = "width",
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Per-bin accuracy against confidence, with the gap to perfect calibration.

    Bars show the accuracy of each non-empty bin of
    :func:`~ekfac_laplace.evaluation.metrics.calibration_bins`; red hatching (no
    fill, so it mixes no colour with the bars) spans the gap to the bin's mean
    confidence, above the bar when overconfident and over it when underconfident;
    the dashed diagonal is perfect calibration; the number of examples is written in
    each bar and the ECE in the legend.

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.
        targets: Integer labels, shape ``(N,)``.
        n_bins: Number of bins.
        binning: ``"width"`` or ``"mass"``.
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.

    Returns:
        The axes.

    Raises:
        ValueError: For bad probabilities, labels or binning options.
    """
    probs, targets = torch.as_tensor(probs), torch.as_tensor(targets)
    bins = calibration_bins(probs, targets, n_bins=n_bins, binning=binning)
    ece = expected_calibration_error(probs, targets, n_bins=n_bins, binning=binning)
    ax = axes_or_new(ax)
    edges = bins.edges.detach().cpu().double().numpy()
    counts = bins.counts.cpu().numpy()
    filled = counts > 0
    left, width = edges[:-1][filled], np.diff(edges)[filled]
    bin_accuracy = bins.accuracy.detach().cpu().double().numpy()[filled]
    bin_confidence = bins.confidence.detach().cpu().double().numpy()[filled]
    # The gap is hatching without a fill, so where it lies over a bar (an
    # underconfident bin) it mixes no new colour: the bar stays the accuracy's blue
    # and the red hatch is the legend's.
    ax.bar(
        left,
        bin_accuracy,
        width=width,
        align="edge",
        color=ACCURACY_COLOR,
        edgecolor="black",
        linewidth=0.6,
        label="accuracy",
    )
    ax.bar(
        left,
        bin_confidence - bin_accuracy,
        bottom=bin_accuracy,
        width=width,
        align="edge",
        fill=False,
        edgecolor=GAP_COLOR,
        hatch="///",
        linewidth=0.8,
        label="gap to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for x, count in zip(left + width / 2, counts[filled]):
        ax.text(x, 0.02, str(count), rotation=90, ha="center", va="bottom", fontsize=6)
    # The legend sits in a strip above accuracy 1, so it never hides a bar.
    ax.set(xlim=(0, 1), ylim=(0, 1.32), xlabel="confidence", ylabel="accuracy")
    ax.set_yticks([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.legend(
        loc="upper center",
        ncol=2,
        fontsize=6,
        title=f"ECE = {ece:.3f}",
        title_fontsize=7,
        frameon=False,
        borderaxespad=0.2,
    )
    if title is not None:
        ax.set_title(title)
    return ax


def confidence_histogram(
    probs: ArrayLike,
    targets: ArrayLike,
    *,
    n_bins: int = 20,
    ax: Axes | None = None,
    title: str | None = None,
) -> Axes:
    """Histogram of top-label confidence, with the mean confidence and accuracy.

    A mean confidence right of the accuracy line means overconfidence.

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.
        targets: Integer labels, shape ``(N,)``.
        n_bins: Number of equal-width bins on ``[0, 1]``.
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.

    Returns:
        The axes.

    Raises:
        ValueError: For bad probabilities, labels or ``n_bins``.
    """
    n_bins = check_n_bins(n_bins)
    probs, targets = check_classification(
        torch.as_tensor(probs), torch.as_tensor(targets)
    )
    confidence = probs.max(dim=1).values.detach().cpu().double().numpy()
    ax = axes_or_new(ax)
    ax.hist(
        confidence,
        bins=np.linspace(0, 1, n_bins + 1),
        weights=np.full(confidence.shape, 1 / confidence.size),
        color=ACCURACY_COLOR,
        edgecolor="black",
        linewidth=0.6,
    )
    mean_confidence = float(confidence.mean())
    correct = accuracy(probs, targets)
    ax.axvline(
        mean_confidence,
        color="black",
        linestyle="--",
        label=f"mean confidence {mean_confidence:.3f}",
    )
    ax.axvline(correct, color=GAP_COLOR, linestyle=":", label=f"accuracy {correct:.3f}")
    ax.set(xlim=(0, 1), xlabel="top-label confidence", ylabel="fraction of examples")
    ax.legend(loc="upper left", fontsize=7)
    if title is not None:
        ax.set_title(title)
    return ax


def shift_curves(
    results: Mapping[str, Mapping[float, float]],
    *,
    metric: str,
    shift: str,
    ax: Axes | None = None,
    title: str | None = None,
    legend: bool = True,
) -> Axes:
    """One line per candidate: a metric against the strength of a data shift.

    Each candidate gets its own colour, line style and open marker
    (:func:`line_style`), so candidates whose curves coincide stay visible.

    Args:
        results: ``{candidate name: {shift strength: metric value}}``.
        metric: Name of the metric; known ones get their usual label (``"nll"`` ->
            ``NLL``, ``"ece"`` -> ``ECE``, see :data:`METRIC_LABELS`).
        shift: Name of the shift; ``"rotation"`` and ``"noise"`` are labelled with
            their unit (:data:`SHIFT_LABELS`), others ``"<shift> strength"``.
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.
        legend: Draw the legend in the axes (at the best place); pass ``False`` to
            draw one for the whole figure with :func:`legend_outside`.

    Returns:
        The axes.

    Raises:
        ValueError: If ``results`` or one candidate's curve is empty.
    """
    if not results:
        raise ValueError("results is empty; pass {name: {strength: value}}.")
    ax = axes_or_new(ax)
    for index, (name, curve) in enumerate(results.items()):
        if not curve:
            raise ValueError(f"The curve of {name!r} is empty; give it one point.")
        strengths = sorted(curve)
        values = [curve[strength] for strength in strengths]
        ax.plot(strengths, values, label=name, **line_style(index))
    ax.set(
        xlabel=SHIFT_LABELS.get(shift, f"{shift} strength"),
        ylabel=METRIC_LABELS.get(metric.lower(), metric),
    )
    if legend:
        ax.legend(loc="best", fontsize=7)
    if title is not None:
        ax.set_title(title)
    return ax


def ood_histogram(
    scores_in: ArrayLike,
    scores_out: ArrayLike,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    xlabel: str = "predictive entropy",
    in_label: str = "in-distribution",
    out_label: str = "out-of-distribution",
) -> Axes:
    """Densities of a score on in-distribution (filled) and OOD (outlined) inputs.

    Args:
        scores_in: Scores of in-distribution inputs, shape ``(N_in,)``.
        scores_out: Scores of OOD inputs, shape ``(N_out,)``.
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.
        xlabel: Name of the score.
        in_label: Legend entry of the in-distribution set; name it (e.g.
            ``"digits test set"``).
        out_label: Legend entry of the OOD set; name it (e.g.
            ``"photo patches (OOD)"``).

    Returns:
        The axes.

    Raises:
        ValueError: If either set of scores is empty, not 1-D or not finite.
    """
    scores_in = check_scores("scores_in", torch.as_tensor(scores_in))
    scores_out = check_scores("scores_out", torch.as_tensor(scores_out))
    inside = scores_in.detach().cpu().double().numpy()
    outside = scores_out.detach().cpu().double().numpy()
    edges = np.histogram_bin_edges(np.concatenate([inside, outside]), bins=30)
    ax = axes_or_new(ax)
    # Filled and outlined, not two translucent fills: overlaps mix no new colour.
    ax.hist(
        inside,
        bins=edges,
        density=True,
        color=ACCURACY_COLOR,
        alpha=0.55,
        label=in_label,
    )
    ax.hist(
        outside,
        bins=edges,
        density=True,
        histtype="step",
        color=GAP_COLOR,
        linewidth=1.6,
        label=out_label,
    )
    ax.set(xlabel=xlabel, ylabel="density")
    ax.legend(fontsize=7)
    if title is not None:
        ax.set_title(title)
    return ax


# --------------------------------------------------------- predictive shapes
def confidence_map(
    predict_proba: Callable[[Tensor], Tensor],
    X: ArrayLike,
    y: ArrayLike,
    *,
    ax: Axes | None = None,
    title: str | None = None,
    resolution: int = 100,
    margin: float = 0.5,
) -> Axes:
    """2-D classification: filled contours of the maximum predictive probability.

    Args:
        predict_proba: Maps inputs of shape ``(M, 2)`` (dtype and device of ``X``)
            to probabilities of shape ``(M, C)``, e.g.
            ``lambda x: la(x, link_approx="probit")``.
        X: Training inputs, shape ``(N, 2)``.
        y: Integer training labels, shape ``(N,)``; colour the points.
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.
        resolution: Grid points per axis (>= 2).
        margin: Extent of the grid beyond the data on each side (>= 0).

    Returns:
        The axes.

    Raises:
        ValueError: For bad shapes, options, or outputs of ``predict_proba``.
    """
    X, y = torch.as_tensor(X), torch.as_tensor(y)
    if X.ndim != 2 or X.shape[1] != 2 or X.shape[0] == 0:
        raise ValueError(f"X must have shape (N, 2), got shape {tuple(X.shape)}.")
    if y.shape != (X.shape[0],):
        raise ValueError(
            f"y must have shape (N,) = ({X.shape[0]},) to match X, got shape "
            f"{tuple(y.shape)}."
        )
    if positive_int("resolution", resolution) < 2:
        raise ValueError(f"resolution must be at least 2, got {resolution!r}.")
    if not margin >= 0:
        raise ValueError(f"margin must be non-negative, got {margin!r}.")
    dtype = X.dtype if X.is_floating_point() else torch.get_default_dtype()
    low, high = X.min(dim=0).values - margin, X.max(dim=0).values + margin
    axis_0 = torch.linspace(low[0].item(), high[0].item(), resolution, dtype=dtype)
    axis_1 = torch.linspace(low[1].item(), high[1].item(), resolution, dtype=dtype)
    grid_0, grid_1 = torch.meshgrid(axis_0, axis_1, indexing="xy")
    points = torch.stack([grid_0.reshape(-1), grid_1.reshape(-1)], dim=1)
    with torch.no_grad():
        probs = predict_proba(points.to(X.device))
    probs = check_probs(torch.as_tensor(probs), "predict_proba(grid)")
    if probs.shape[0] != points.shape[0]:
        raise ValueError(
            f"predict_proba returned {probs.shape[0]} rows for {points.shape[0]} "
            "grid points; it must return shape (M, C)."
        )
    n_classes = probs.shape[1]
    max_prob = probs.max(dim=1).values.reshape(resolution, resolution)
    ax = axes_or_new(ax)
    contours = ax.contourf(
        grid_0.double().numpy(),
        grid_1.double().numpy(),
        max_prob.detach().cpu().double().numpy(),
        levels=np.linspace(1 / n_classes, 1, 11),
        cmap="viridis",
    )
    ax.get_figure().colorbar(contours, ax=ax, label="max probability")
    points_x = X.detach().cpu().double().numpy()
    ax.scatter(
        points_x[:, 0],
        points_x[:, 1],
        c=y.detach().cpu().numpy() % 10,
        cmap="tab10",
        vmin=0,
        vmax=9,
        s=14,
        edgecolors="white",
        linewidths=0.5,
    )
    ax.set(xlabel="$x_1$", ylabel="$x_2$")
    if title is not None:
        ax.set_title(title)
    return ax
