"""The figures of a comparison and of a sampling run, written to a folder.

Built on the single plots of :mod:`~ekfac_laplace.evaluation.plotting` and
:mod:`~ekfac_laplace.evaluation.regression_plots`. Classification:
per-candidate reliability diagrams, confidence histograms and OOD entropy histograms,
metrics against shift strength, and on the 2-D problem confidence maps. Regression:
interval coverage against nominal level, standardised residuals, and on the 1-D
problem uncertainty bands. For ``ekfac-laplace sample``: sample against analytic
variances with the expected Monte-Carlo band, and the predictives' confidence. Every
figure's title names the data it shows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace.evaluation import data, plotting, prior_plots, regression_plots
from ekfac_laplace.evaluation.checks import DEFAULT_LEVELS
from ekfac_laplace.evaluation.metrics import (
    ClassificationPredictions,
    Predictions,
    RegressionPredictions,
    interval_coverage,
    predictive_entropy,
)
from ekfac_laplace.evaluation.predictions import predict
from ekfac_laplace.evaluation.problems import Problem
from ekfac_laplace.evaluation.report import Comparison
from ekfac_laplace.evaluation.sampling import SampleCheck

#: What the out-of-distribution set of a bundled problem is, for titles and legends.
OOD_SETS = dict.fromkeys(
    ("digits", "noisy-digits"),
    ("photo patches", "8×8 patches of two photographs (scikit-learn's sample images)"),
)
#: What a shift of the digits test set does, for titles.
SHIFT_TITLES = {
    "rotation": "rotated",
    "noise": "with Gaussian pixel noise",
}
#: Legend names of the predictives of ``ekfac-laplace sample``.
SAMPLE_PREDICTIVES = {
    "map": "MAP network",
    "glm": "GLM (linearised) predictive",
    "samples": "sampled networks (nn)",
}


def write_comparison_plots(
    comparison: Comparison, problem: Problem, out: Path
) -> list[Path]:
    """Write the figures of a comparison.

    Classification: ``reliability.png`` and ``confidence.png`` (one panel per
    candidate), ``ood_entropy.png`` (with an OOD set), ``shift_<kind>.png`` (NLL and
    ECE against shift strength), ``confidence_maps.png`` (2-D inputs). Regression:
    ``coverage.png`` (interval coverage against nominal level), ``residuals.png``
    (standardised residuals per candidate), ``bands.png`` (1-D inputs). With a
    prior sweep, :func:`prior_figures`. Failed candidates are left out.

    Args:
        comparison: The comparison.
        problem: The data it was computed on.
        out: Output folder.

    Returns:
        The files written.
    """
    names = [row.candidate for row in comparison.rows if row.ok]
    written: list[Path] = []
    if not names:
        return written
    tests = {name: comparison.predictions[name]["test"] for name in names}
    split = f"{problem.name} test set ({len(problem.test_loader.dataset):,} examples)"
    if isinstance(next(iter(tests.values())), ClassificationPredictions):
        written += _classification_figures(comparison, problem, tests, split, out)
    else:
        written += _regression_figures(tests, split, out)
    for kind in problem.shift_loaders:
        written.append(_shift_figure(comparison, problem, kind, out))
    written += prior_figures(comparison, problem, out)
    if comparison.fitted and problem.splits.input_shape == (2,):
        written.append(
            _confidence_maps(comparison, problem, out / "confidence_maps.png")
        )
    if comparison.fitted and problem.splits.input_shape == (1,):
        written.append(_regression_bands(comparison, problem, out / "bands.png"))
    return written


def _candidate_panels(n_panels: int) -> tuple[Any, list[Axes]]:
    return plotting.new_figure(n_panels, ncols=min(4, n_panels))


def _classification_figures(
    comparison: Comparison,
    problem: Problem,
    tests: dict[str, ClassificationPredictions],
    split: str,
    out: Path,
) -> list[Path]:
    """Reliability diagrams, confidence histograms, OOD entropy histograms."""
    written = []
    n_bins = int(comparison.config.get("n_bins", 15))
    fig, axes = _candidate_panels(len(tests))
    for ax, (name, test) in zip(axes, tests.items()):
        plotting.reliability_diagram(
            test.probs, test.targets, n_bins=n_bins, ax=ax, title=name
        )
    fig.suptitle(f"Reliability diagrams: {split}, {n_bins} equal-width bins")
    written.append(plotting.save_figure(fig, out / "reliability.png"))
    fig, axes = _candidate_panels(len(tests))
    for ax, (name, test) in zip(axes, tests.items()):
        plotting.confidence_histogram(test.probs, test.targets, ax=ax, title=name)
    fig.suptitle(f"Top-label confidence: {split}")
    written.append(plotting.save_figure(fig, out / "confidence.png"))
    if problem.ood_loader is None:
        return written
    short, long = OOD_SETS.get(
        problem.name, ("OOD inputs", "out-of-distribution inputs")
    )
    n_ood = len(problem.ood_loader.dataset)
    fig, axes = _candidate_panels(len(tests))
    for ax, (name, test) in zip(axes, tests.items()):
        auroc = comparison.row(name).test.get("ood_auroc_entropy")
        plotting.ood_histogram(
            predictive_entropy(test.probs),
            predictive_entropy(comparison.predictions[name]["ood"].probs),
            ax=ax,
            title=name if auroc is None else f"{name}: AUROC {auroc:.3f}",
            xlabel="predictive entropy (nats)",
            in_label=f"{problem.name} test set",
            out_label=f"{short} (OOD)",
        )
    fig.suptitle(
        f"Predictive entropy: {split} vs {n_ood:,} out-of-distribution inputs, {long}"
    )
    written.append(plotting.save_figure(fig, out / "ood_entropy.png"))
    return written


def _regression_figures(
    tests: dict[str, RegressionPredictions], split: str, out: Path
) -> list[Path]:
    """Interval coverage against nominal level, standardised residuals."""
    curves = {
        name: {
            level: interval_coverage(test.mean, test.variance, test.targets, level)
            for level in DEFAULT_LEVELS
        }
        for name, test in tests.items()
    }
    n_targets = next(iter(tests.values())).targets.numel()
    fig, axes = plotting.new_figure(2, ncols=2, size=(4.2, 3.6))
    for ax, deviation in zip(axes, (False, True)):
        regression_plots.coverage_curves(
            curves,
            n_examples=n_targets,
            deviation=deviation,
            ax=ax,
            legend=False,
            title="coverage − nominal" if deviation else "coverage",
        )
    plotting.legend_outside(fig, axes[0], loc="outside lower center", ncols=3)
    fig.suptitle(f"Central predictive intervals: {split}")
    written = [plotting.save_figure(fig, out / "coverage.png")]
    fig, axes = _candidate_panels(len(tests))
    for ax, (name, test) in zip(axes, tests.items()):
        regression_plots.residual_histogram(
            test.mean, test.variance, test.targets, ax=ax, title=name
        )
    fig.suptitle(f"Standardised residuals: {split}")
    written.append(plotting.save_figure(fig, out / "residuals.png"))
    return written


def _shift_figure(
    comparison: Comparison, problem: Problem, kind: str, out: Path
) -> Path:
    """NLL and ECE against shift strength, strength 0 being the clean test set."""
    fig, axes = plotting.new_figure(2, ncols=2, size=(4.2, 3.4))
    for ax, metric in zip(axes, ("nll", "ece")):
        curves = {
            row.candidate: {
                0.0: row.test[metric],
                **{s: v[metric] for s, v in row.shift[kind].items()},
            }
            for row in comparison.rows
            if row.ok
        }
        plotting.shift_curves(curves, metric=metric, shift=kind, ax=ax, legend=False)
    plotting.legend_outside(fig, axes[0])
    shift = SHIFT_TITLES.get(kind, f"under {kind} shift")
    fig.suptitle(f"{problem.name} test set, {shift} shift (0 is the clean test set)")
    return plotting.save_figure(fig, out / f"shift_{kind}.png")


#: The in-distribution (x) and robustness (y) metrics of the trade-off figure.
TRADEOFF_AXES = (("test_nll", "test_ece"), ("shift_nll", "ood_auroc_entropy"))
#: The metrics drawn against the prior precision.
SWEEP_METRICS = (
    "val_nll",
    "test_nll",
    "test_ece",
    "shift_nll",
    "ood_auroc_entropy",
    "log_marginal_likelihood",
)


def prior_figures(comparison: Comparison, problem: Problem, out: Path) -> list[Path]:
    """The prior trade-off of every swept Laplace candidate, as two figures.

    ``prior_tradeoff.png`` (with a shift or an OOD set): one panel per pair of an
    in-distribution metric (test NLL, ECE) and a robustness metric (NLL under
    shift, OOD AUROC), each candidate a curve traced by the prior precision, the
    priors its rows were tuned to marked by rule, the MAP and its peers as points.
    ``prior_sweep.png``: each metric against the prior precision. Nothing when no
    row has a sweep.

    Args:
        comparison: The comparison (rows with ``sweep``).
        problem: The data it was computed on.
        out: Output folder.

    Returns:
        The files written.
    """
    sweeps: dict[str, list[dict[str, float]]] = {}
    marks: dict[str, dict[str, dict[str, float]]] = {}
    references: dict[str, dict[str, float]] = {}
    for row in comparison.rows:
        if not row.ok:
            continue
        record = {k: v for k, v in row.record().items() if isinstance(v, float)}
        record.update(row.shift_means())
        if row.sweep:
            name = row.candidate.partition("@")[0]
            sweeps.setdefault(name, sorted(row.sweep, key=_prior))
            marks.setdefault(name, {})[row.prior_tuning or "?"] = record
        elif row.subset_of_weights is None:
            references[row.candidate] = record
    if not sweeps:
        return []
    written = []
    first = next(iter(sweeps.values()))[0]
    x_metrics = [m for m in TRADEOFF_AXES[0] if m in first]
    y_metrics = [m for m in TRADEOFF_AXES[1] if m in first]
    if x_metrics and y_metrics:
        pairs = [(x, y) for y in y_metrics for x in x_metrics]
        fig, axes = plotting.new_figure(len(pairs), ncols=len(x_metrics))
        for ax, (x, y) in zip(axes, pairs):
            prior_plots.tradeoff_curves(
                {n: _points(s, x, y) for n, s in sweeps.items()},
                x_metric=x,
                y_metric=y,
                marks={
                    n: {r: (rec[x], rec[y]) for r, rec in m.items() if x in rec}
                    for n, m in marks.items()
                },
                references={n: (r[x], r[y]) for n, r in references.items() if x in r},
                ax=ax,
                legend=False,
            )
        plotting.legend_outside(fig, axes[0])
        fig.suptitle(
            f"The prior trade-off on {problem.name}\neach curve traced by the "
            "prior precision δ, from a wide posterior (δ small) to the MAP"
        )
        written.append(plotting.save_figure(fig, out / "prior_tradeoff.png"))
    metrics = [m for m in SWEEP_METRICS if m in first]
    fig, axes = plotting.new_figure(len(metrics), ncols=min(3, len(metrics)))
    for ax, metric in zip(axes, metrics):
        prior_plots.prior_curves(
            {n: [(_prior(p), p[metric]) for p in s] for n, s in sweeps.items()},
            metric=metric,
            marks={
                n: {
                    r: (_prior(rec), rec[metric])
                    for r, rec in m.items()
                    if metric in rec
                }
                for n, m in marks.items()
            },
            references={n: r[metric] for n, r in references.items() if metric in r},
            ax=ax,
            legend=False,
        )
    plotting.legend_outside(fig, axes[0])
    fig.suptitle(f"Metrics against the prior precision on {problem.name}")
    written.append(plotting.save_figure(fig, out / "prior_sweep.png"))
    return written


def _prior(record: dict[str, Any]) -> float:
    return float(record["prior_precision"])


def _points(sweep: list[dict[str, float]], x: str, y: str) -> list[tuple[float, float]]:
    return [(point[x], point[y]) for point in sweep if x in point and y in point]


def _predictor_options(comparison: Comparison, name: str) -> dict[str, Any]:
    if name == "map":
        return {
            "likelihood": comparison.config["likelihood"],
            "sigma_noise": comparison.config["sigma_noise"],
        }
    return {
        key: comparison.config[key] for key in ("pred_type", "link_approx", "n_samples")
    }


def _grid_predictions(
    comparison: Comparison, name: str, inputs: torch.Tensor
) -> Predictions:
    dummy = torch.zeros(len(inputs), dtype=torch.long)
    if comparison.config["likelihood"] == "regression":
        dummy = torch.zeros(len(inputs), 1)
    loader = DataLoader(TensorDataset(inputs, dummy), batch_size=512)
    return predict(
        comparison.fitted[name], loader, **_predictor_options(comparison, name)
    )


def _confidence_maps(comparison: Comparison, problem: Problem, path: Path) -> Path:
    names = list(comparison.fitted)
    X, y = problem.splits.train.tensors
    fig, axes = plotting.new_figure(len(names), ncols=min(4, len(names)))
    for ax, name in zip(axes, names):
        plotting.confidence_map(
            lambda grid, name=name: _grid_predictions(comparison, name, grid).probs,
            X,
            y,
            ax=ax,
            title=name,
        )
    fig.suptitle(
        f"Maximum predictive probability on a grid; points: the {problem.name} "
        f"training set ({len(X):,} examples)"
    )
    return plotting.save_figure(fig, path)


def _regression_bands(comparison: Comparison, problem: Problem, path: Path) -> Path:
    names = list(comparison.fitted)
    X, y = problem.splits.train.tensors
    grid = data.regression_grid()
    fig, axes = plotting.new_figure(len(names), ncols=min(4, len(names)))
    for ax, name in zip(axes, names):
        predictions = _grid_predictions(comparison, name, grid)
        regression_plots.regression_bands(
            X.flatten(),
            y.flatten(),
            grid.flatten(),
            predictions.mean.flatten(),
            predictions.variance.sqrt().flatten(),
            ax=ax,
            title=name,
        )
    fig.suptitle(
        f"Predictive mean ± 2 std on a grid; points: the {problem.name} training set "
        f"({len(X):,} examples)"
    )
    return plotting.save_figure(fig, path)


def write_sample_plot(
    predictions: dict[str, Predictions], check: SampleCheck, path: Path
) -> Path:
    """Plot sample vs analytic marginal variances and the predictives' confidence.

    Left: each parameter's sample variance against its analytic posterior variance
    on log axes, with the band where a sample variance of ``S`` Gaussian draws falls
    by chance: ±2 standard deviations, ``σ²(1 ± 2·sqrt(2/(S−1)))``. Right: the test
    predictives' top-label confidence (classification) or standard deviation
    (regression).

    Args:
        predictions: ``{"map", "glm", "samples"}`` test predictions.
        check: The samples against the analytic posterior.
        path: Output file.

    Returns:
        The file written.
    """
    fig, axes = plotting.new_figure(2, ncols=2, size=(4.6, 4.2))
    _variance_panel(axes[0], check)
    ax = axes[1]
    classification = isinstance(predictions["glm"], ClassificationPredictions)
    values = {}
    for name, prediction in predictions.items():
        if classification:
            values[name] = prediction.probs.max(-1).values.detach().cpu().numpy()
        else:
            values[name] = prediction.variance.sqrt().flatten().detach().cpu().numpy()
    if classification:
        edges = np.linspace(0, 1, 21)
    else:  # shared bins, so the histograms compare
        edges = np.histogram_bin_edges(np.concatenate(list(values.values())), 20)
    for index, (name, shown) in enumerate(values.items()):
        ax.hist(
            shown,
            bins=edges,
            histtype="step",
            linewidth=1.4,
            linestyle=("-", "--", ":")[index % 3],
            color=f"C{index}",
            label=SAMPLE_PREDICTIVES.get(name, name),
        )
    what = "top-label confidence" if classification else "predictive std"
    ax.set_xlabel(f"{what} on the test set")
    ax.set_ylabel("number of test examples")
    ax.set_title(f"Test predictive: {what}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    return plotting.save_figure(fig, path)


def _variance_panel(ax: Axes, check: SampleCheck) -> None:
    """Sample against analytic variances, the identity and the Monte-Carlo band."""
    analytic = check.analytic_variance.detach().cpu().double().numpy()
    sampled = check.sample_variance.detach().cpu().double().numpy()
    ax.set_title(
        f"{check.n_samples} samples vs analytic posterior\n"
        f"marginal variance of each of {len(analytic):,} parameters",
        fontsize=10,
    )
    ax.set_xlabel("analytic posterior variance")
    ax.set_ylabel("sample variance")
    relative_std = check.variance_relative_std
    if relative_std is None:
        ax.text(
            0.5,
            0.5,
            "one sample has no variance;\ndraw more (--n-samples)",
            transform=ax.transAxes,
            ha="center",
            va="center",
        )
        return
    low = float(min(analytic.min(), sampled.min()))
    high = float(max(analytic.max(), sampled.max()))
    line = np.geomspace(low / 1.2, high * 1.2, 50)
    lower, upper = 1 - 2 * relative_std, 1 + 2 * relative_std
    ratio = sampled / analytic
    inside = float(np.mean((ratio >= lower) & (ratio <= upper)))
    ax.fill_between(
        line,
        max(lower, 1e-12) * line,  # below zero for S < 10: the band reaches down
        upper * line,
        color="0.85",
        linewidth=0,
        label=f"Monte-Carlo spread σ²(1 ± 2·sqrt(2/(S−1))); {inside:.0%} inside",
        zorder=1,
    )
    ax.loglog(analytic, sampled, ".", ms=2, alpha=0.4, label="parameters", zorder=2)
    ax.plot(line, line, "k--", lw=1, label="sample = analytic", zorder=3)
    ax.set(xlim=(line[0], line[-1]), ylim=(line[0], line[-1]))
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=1)
