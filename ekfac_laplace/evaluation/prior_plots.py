"""Plots of the prior trade-off: what each prior precision buys and costs.

A Laplace posterior's prior precision ``δ`` trades in-distribution calibration
against robustness under shift and on out-of-distribution inputs.
:func:`tradeoff_curves` draws that trade-off as one curve per candidate, traced by
``δ`` (the sweep of :func:`~ekfac_laplace.evaluation.priors.sweep_prior`), with
the priors that the tuning rules picked marked on it and the MAP and its peers as
reference points; :func:`prior_curves` draws one metric against ``δ``. Both draw on
matplotlib ``Axes`` (no pyplot), like :mod:`~ekfac_laplace.evaluation.plotting`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from matplotlib.axes import Axes

from ekfac_laplace.evaluation.plotting import axes_or_new, line_style

#: Axis labels of the metrics a sweep records.
SWEEP_LABELS = {
    "val_nll": "validation NLL",
    "test_nll": "test NLL",
    "test_ece": "test ECE",
    "shift_nll": "NLL under shift (mean over shifts)",
    "shift_ece": "ECE under shift (mean over shifts)",
    "ood_auroc_entropy": "OOD AUROC (entropy)",
    "log_marginal_likelihood": "log marginal likelihood",
    "test_rmse": "test RMSE",
    "test_calibration_error": "test calibration error",
}
#: Marker of the prior each tuning rule picked (filled, in the curve's colour).
RULE_MARKERS = {"validation": "D", "marglik": "*", "gridsearch": "s", "none": "v"}
#: Marker and colour of each reference point (the MAP and its peers), by the
#: start of its name.
REFERENCE_STYLES = {
    "map_ts": ("P", "dimgray"),
    "map": ("X", "black"),
    "ensemble": ("h", "saddlebrown"),
    "mc_dropout": ("p", "palevioletred"),
}


def reference_style(name: str) -> tuple[str, str]:
    """Marker and colour of a reference point (:data:`REFERENCE_STYLES`).

    Args:
        name: The reference's name, e.g. ``"map"`` or ``"ensemble5"``.

    Returns:
        ``(marker, colour)``; a grey circle for a name not listed.
    """
    for start, style in REFERENCE_STYLES.items():
        if name == start or (start not in ("map",) and name.startswith(start)):
            return style
    return ("o", "gray")


def tradeoff_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    x_metric: str,
    y_metric: str,
    marks: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    references: Mapping[str, tuple[float, float]] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    legend: bool = True,
    log_x: bool = True,
) -> Axes:
    """One curve per candidate through ``(x(δ), y(δ))``, traced by the prior ``δ``.

    Each candidate's curve has its own colour, line style and open marker
    (:func:`~ekfac_laplace.evaluation.plotting.line_style`); the end of the widest
    prior (smallest ``δ``) is annotated ``δ small``. The priors the tuning rules
    picked are filled markers in the curve's colour (:data:`RULE_MARKERS`, one
    legend entry per rule), the references (MAP, temperature scaling, ...) large
    markers of their own (:data:`REFERENCE_STYLES`).

    Args:
        curves: ``{candidate: [(x, y), ...]}`` in order of increasing ``δ``.
        x_metric: Name of the x metric (labelled by :data:`SWEEP_LABELS`).
        y_metric: Name of the y metric.
        marks: ``{candidate: {rule: (x, y)}}`` at the priors the rules picked.
        references: ``{name: (x, y)}`` of predictives without a prior.
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.
        legend: Draw the legend in the axes; ``False`` for one outside
            (:func:`~ekfac_laplace.evaluation.plotting.legend_outside`).
        log_x: A logarithmic x axis (the default: in-distribution NLL and ECE
            span orders of magnitude between the MAP and a wide prior).

    Returns:
        The axes.

    Raises:
        ValueError: If there is no curve, or one is empty.
    """
    ax = axes_or_new(ax)
    marks = marks or {}
    labelled_rules: set[str] = set()
    for name, style, xs, ys in _draw_curves(ax, curves):
        ax.annotate(
            "δ small", (xs[0], ys[0]), fontsize=6, color=style["color"], alpha=0.8
        )
        for rule, (x, y) in marks.get(name, {}).items():
            _mark_rule(ax, x, y, rule, str(style["color"]), labelled_rules)
    for name, (x, y) in (references or {}).items():
        marker, color = reference_style(name)
        ax.plot(
            [x],
            [y],
            linestyle="none",
            marker=marker,
            markersize=9,
            color=color,
            label=name,
            zorder=4,
        )
    ax.set_xscale("log" if log_x else "linear")
    ax.set(
        xlabel=SWEEP_LABELS.get(x_metric, x_metric) + (" (log scale)" if log_x else ""),
        ylabel=SWEEP_LABELS.get(y_metric, y_metric),
    )
    if legend:
        ax.legend(loc="best", fontsize=7)
    if title is not None:
        ax.set_title(title)
    return ax


def prior_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]],
    *,
    metric: str,
    marks: Mapping[str, Mapping[str, tuple[float, float]]] | None = None,
    references: Mapping[str, float] | None = None,
    ax: Axes | None = None,
    title: str | None = None,
    legend: bool = True,
) -> Axes:
    """One curve per candidate: a metric against the prior precision (log axis).

    Args:
        curves: ``{candidate: [(δ, value), ...]}``.
        metric: Name of the metric (labelled by :data:`SWEEP_LABELS`).
        marks: ``{candidate: {rule: (δ, value)}}``: the priors the rules picked
            and the metric there, filled markers in the curve's colour
            (:data:`RULE_MARKERS`) on a vertical dotted line.
        references: ``{name: value}``: horizontal lines (the MAP and its peers).
        ax: Axes to draw into; a new figure if ``None``.
        title: Axes title.
        legend: Draw the legend in the axes.

    Returns:
        The axes.

    Raises:
        ValueError: If there is no curve, or one is empty.
    """
    ax = axes_or_new(ax)
    marks = marks or {}
    labelled_rules: set[str] = set()
    for name, style, _, _ in _draw_curves(ax, curves):
        for rule, (prior, value) in marks.get(name, {}).items():
            ax.axvline(prior, color=style["color"], linestyle=":", linewidth=1)
            _mark_rule(ax, prior, value, rule, str(style["color"]), labelled_rules)
    for name, value in (references or {}).items():
        _, color = reference_style(name)
        ax.axhline(value, color=color, linestyle="--", linewidth=1, label=name)
    ax.set_xscale("log")
    if metric == "log_marginal_likelihood":  # spans orders of magnitude below 0
        ax.set_yscale("symlog", linthresh=1.0)
    ax.set(xlabel="prior precision δ", ylabel=SWEEP_LABELS.get(metric, metric))
    if legend:
        ax.legend(loc="best", fontsize=7)
    if title is not None:
        ax.set_title(title)
    return ax


def _mark_rule(
    ax: Axes, x: float, y: float, rule: str, color: str, labelled: set[str]
) -> None:
    """A filled marker where a rule's prior lands; the first of each rule labelled."""
    label = None if rule in labelled else f"prior by {rule}"
    labelled.add(rule)
    ax.plot(
        [x],
        [y],
        linestyle="none",
        marker=RULE_MARKERS.get(rule, "o"),
        markersize=9 if rule == "marglik" else 6,
        color=color,
        markeredgecolor="black",
        markeredgewidth=0.6,
        label=label,
        zorder=3,
    )


def _draw_curves(
    ax: Axes, curves: Mapping[str, Sequence[tuple[float, float]]]
) -> list[tuple[str, dict[str, object], tuple[float, ...], tuple[float, ...]]]:
    """Draw each curve in its own style; its name, style and coordinates.

    Raises:
        ValueError: If there is no curve, or one is empty.
    """
    if not curves:
        raise ValueError("curves is empty; pass {candidate: [(x, y), ...]}.")
    drawn = []
    for index, (name, points) in enumerate(curves.items()):
        if not points:
            raise ValueError(f"The curve of {name!r} is empty; give it one point.")
        style = line_style(index)
        xs, ys = zip(*points)
        ax.plot(xs, ys, label=name, **style)
        drawn.append((name, style, xs, ys))
    return drawn
