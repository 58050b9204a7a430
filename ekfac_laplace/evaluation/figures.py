"""The figures of a comparison and of a sampling run, written to a folder.

Built on the single plots of :mod:`~ekfac_laplace.evaluation.plotting`: per candidate
reliability diagrams, confidence histograms and OOD entropy histograms, metric
against shift strength, and (on the 2-D and 1-D problems) confidence maps and
regression bands of the fitted candidates; for ``ekfac-laplace sample``, sample
against analytic variances and the predictives' confidence.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, TensorDataset

from ekfac_laplace.evaluation import data, plotting
from ekfac_laplace.evaluation.metrics import (
    ClassificationPredictions,
    Predictions,
    predictive_entropy,
)
from ekfac_laplace.evaluation.predictions import predict
from ekfac_laplace.evaluation.problems import Problem
from ekfac_laplace.evaluation.report import Comparison
from ekfac_laplace.evaluation.sampling import SampleCheck


def write_comparison_plots(
    comparison: Comparison, problem: Problem, out: Path
) -> list[Path]:
    """Write the figures of a comparison.

    Classification: reliability diagrams and confidence histograms per candidate,
    OOD entropy histograms, metric-vs-shift-strength curves; on ``moons`` also
    confidence maps. Regression on ``toy1d``: uncertainty bands per candidate.

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
    if isinstance(next(iter(tests.values())), ClassificationPredictions):
        fig, axes = plotting.new_figure(len(names), ncols=min(4, len(names)))
        for ax, name in zip(axes, names):
            plotting.reliability_diagram(
                tests[name].probs, tests[name].targets, ax=ax, title=name
            )
        written.append(plotting.save_figure(fig, out / "reliability.png"))
        fig, axes = plotting.new_figure(len(names), ncols=min(4, len(names)))
        for ax, name in zip(axes, names):
            plotting.confidence_histogram(
                tests[name].probs, tests[name].targets, ax=ax, title=name
            )
        written.append(plotting.save_figure(fig, out / "confidence.png"))
        if problem.ood_loader is not None:
            fig, axes = plotting.new_figure(len(names), ncols=min(4, len(names)))
            for ax, name in zip(axes, names):
                ood = comparison.predictions[name]["ood"]
                plotting.ood_histogram(
                    predictive_entropy(tests[name].probs),
                    predictive_entropy(ood.probs),
                    ax=ax,
                    title=name,
                )
            written.append(plotting.save_figure(fig, out / "ood_entropy.png"))
    for kind in problem.shift_loaders:
        fig, axes = plotting.new_figure(2, ncols=2, size=(5.0, 3.6))
        for ax, metric in zip(axes, ("nll", "ece")):
            # Strength 0 is the unshifted test set.
            curves = {
                row.candidate: {
                    0.0: row.test[metric],
                    **{s: v[metric] for s, v in row.shift[kind].items()},
                }
                for row in comparison.rows
                if row.ok
            }
            plotting.shift_curves(curves, metric=metric, shift=kind, ax=ax)
        written.append(plotting.save_figure(fig, out / f"shift_{kind}.png"))
    if comparison.fitted and problem.splits.input_shape == (2,):
        written.append(
            _confidence_maps(comparison, problem, out / "confidence_maps.png")
        )
    if comparison.fitted and problem.splits.input_shape == (1,):
        written.append(_regression_bands(comparison, problem, out / "bands.png"))
    return written


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
    return plotting.save_figure(fig, path)


def _regression_bands(comparison: Comparison, problem: Problem, path: Path) -> Path:
    names = list(comparison.fitted)
    X, y = problem.splits.train.tensors
    grid = data.regression_grid()
    fig, axes = plotting.new_figure(len(names), ncols=min(4, len(names)))
    for ax, name in zip(axes, names):
        predictions = _grid_predictions(comparison, name, grid)
        plotting.regression_bands(
            X.flatten(),
            y.flatten(),
            grid.flatten(),
            predictions.mean.flatten(),
            predictions.variance.sqrt().flatten(),
            ax=ax,
            title=name,
        )
    return plotting.save_figure(fig, path)


def write_sample_plot(
    predictions: dict[str, Predictions], check: SampleCheck, path: Path
) -> Path:
    """Plot sample vs analytic marginal variances and the predictives' confidence.

    Args:
        predictions: ``{"map", "glm", "samples"}`` test predictions.
        check: The samples against the analytic posterior.
        path: Output file.

    Returns:
        The file written.
    """
    analytic_variance = check.analytic_variance.cpu()
    sample_variance = check.sample_variance.cpu()
    fig, axes = plotting.new_figure(2, ncols=2, size=(4.4, 3.6))
    ax = axes[0]
    ax.loglog(analytic_variance.numpy(), sample_variance.numpy(), ".", ms=2, alpha=0.4)
    low = float(min(analytic_variance.min(), sample_variance.min()))
    high = float(max(analytic_variance.max(), sample_variance.max()))
    ax.plot([low, high], [low, high], "k--", lw=1, label="equal")
    ax.set_xlabel("analytic posterior variance")
    ax.set_ylabel("sample variance")
    ax.set_title("marginal variances per parameter")
    ax.legend()
    ax = axes[1]
    if isinstance(predictions["glm"], ClassificationPredictions):
        for name, prediction in predictions.items():
            ax.hist(
                prediction.probs.max(-1).values.numpy(),
                bins=20,
                range=(0, 1),
                histtype="step",
                label=name,
            )
        ax.set_xlabel("top-label confidence on test")
    else:
        for name, prediction in predictions.items():
            ax.hist(
                prediction.variance.sqrt().flatten().numpy(),
                bins=20,
                histtype="step",
                label=name,
            )
        ax.set_xlabel("predictive standard deviation on test")
    ax.set_ylabel("count")
    ax.legend()
    return plotting.save_figure(fig, path)
