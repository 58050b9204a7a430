"""The prior precision of a fitted Laplace object: tuning rules and the trade-off sweep.

The prior precision ``δ`` decides how wide a post-hoc Laplace posterior is, and so
how much in-distribution calibration it trades for robustness under shift and on
out-of-distribution inputs. :func:`tune_prior` sets it by one of four rules:

- ``"validation"``: the widest prior (smallest ``δ``) of a grid whose validation
  predictive NLL is within ``τ`` nats per example of the grid's best,
  ``δ* = min {δ : NLL_val(δ) ≤ min_δ' NLL_val(δ') + τ}``;
- ``"gridsearch"``: the grid's ``δ`` with the lowest validation NLL (``τ = 0``);
- ``"marglik"``: the maximum of the Laplace evidence (laplace-torch's
  ``optimize_prior_precision``);
- ``"none"``: left as it is.

:func:`sweep_prior` evaluates the predictive over a grid of priors on every set of a
comparison, which is what the trade-off figure draws.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from laplace.baselaplace import BaseLaplace
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ekfac_laplace.evaluation.metrics import Predictions, metrics_of
from ekfac_laplace.evaluation.peers import Predictive
from ekfac_laplace.evaluation.predictions import predict
from ekfac_laplace.evaluation.report import ComparisonRow
from ekfac_laplace.evaluation.settings import EvaluationData, EvaluationSettings


@dataclass
class SetMetrics:
    """A predictor's metrics and predictions on every set of a comparison.

    Attributes:
        test: Test metrics (OOD detection included when an OOD set was given).
        val: Validation metrics (empty without a validation set).
        shift: ``shift[kind][strength]`` metrics.
        predictions: ``{"test", "ood", "shift"}`` predictions, for plots.
    """

    test: dict[str, float]
    val: dict[str, float]
    shift: dict[str, dict[float, dict[str, float]]]
    predictions: dict[str, Any]


def evaluate_sets(
    predictor: BaseLaplace | nn.Module | Predictive,
    data: EvaluationData,
    options: dict[str, Any],
    n_bins: int,
) -> SetMetrics:
    """Predict on the test, OOD, validation and shifted sets and score each.

    Args:
        predictor: A fitted Laplace object, a network (the MAP) or a peer.
        data: The loaders.
        options: Keyword arguments of :func:`~ekfac_laplace.evaluation.predict`.
        n_bins: Bins of the calibration errors.

    Returns:
        The metrics and predictions.
    """
    test = predict(predictor, data.test_loader, **options)
    ood = None
    if data.ood_loader is not None:
        ood = predict(predictor, data.ood_loader, **options)
    val: dict[str, float] = {}
    if data.val_loader is not None:
        val = metrics_of(predict(predictor, data.val_loader, **options), n_bins=n_bins)
    shifted: dict[str, dict[float, Predictions]] = {}
    shift: dict[str, dict[float, dict[str, float]]] = {}
    for kind, by_strength in data.shift_loaders.items():
        shifted[kind], shift[kind] = {}, {}
        for strength, loader in sorted(by_strength.items()):
            shifted[kind][strength] = predict(predictor, loader, **options)
            shift[kind][strength] = metrics_of(shifted[kind][strength], n_bins=n_bins)
    return SetMetrics(
        test=metrics_of(test, ood, n_bins=n_bins),
        val=val,
        shift=shift,
        predictions={"test": test, "ood": ood, "shift": shifted},
    )


def tune_prior(
    la: BaseLaplace,
    settings: EvaluationSettings,
    val_loader: DataLoader | None = None,
    *,
    tuning: str | None = None,
) -> None:
    """Tune a fitted Laplace object's prior precision by one of the rules above.

    Args:
        la: A fitted Laplace object.
        settings: The evaluation settings (grid, tolerance, marglik steps,
            predictive).
        val_loader: Validation data (``"validation"`` and ``"gridsearch"``).
        tuning: The rule; ``settings.prior_tuning`` when ``None``.

    Raises:
        ValueError: For a validation rule without validation data.
        RuntimeError: If every prior of the grid gives a failed predictive.
    """
    tuning = settings.prior_tuning if tuning is None else tuning
    if tuning == "marglik":
        with warnings.catch_warnings():
            # laplace-torch reminds classification users that link_approx defaults
            # to probit even when it is passed, as here: not actionable.
            warnings.filterwarnings("ignore", message="By default `link_approx`")
            la.optimize_prior_precision(
                pred_type=settings.pred_type,
                method="marglik",
                n_steps=settings.marglik_steps,
                prior_structure=settings.prior_structure,
                link_approx=settings.link_approx,
                progress_bar=settings.progress_bar,
            )
    elif tuning in ("validation", "gridsearch"):
        if val_loader is None:
            raise ValueError(f"prior_tuning={tuning!r} needs val_loader.")
        curve = validation_curve(la, settings, val_loader)
        tolerance = settings.val_tolerance if tuning == "validation" else 0.0
        la.prior_precision = widest_within(curve, tolerance)


def validation_curve(
    la: BaseLaplace, settings: EvaluationSettings, val_loader: DataLoader
) -> dict[float, float]:
    """The validation predictive NLL at every prior of ``settings.prior_grid``.

    Priors whose predictive fails (a singular or non-finite predictive) are left
    out; the object's prior is left at the grid's last value.

    Args:
        la: A fitted Laplace object.
        settings: The evaluation settings.
        val_loader: Validation data.

    Returns:
        ``{prior precision: validation NLL}``.

    Raises:
        RuntimeError: If every prior of the grid gives a failed predictive.
    """
    curve: dict[float, float] = {}
    grid = tqdm(
        settings.prior_grid, desc="Prior grid", disable=not settings.progress_bar
    )
    for value in grid:
        la.prior_precision = float(value)
        try:
            predictions = predict(la, val_loader, **settings.predictive)
        except (RuntimeError, ValueError):  # a singular or non-finite predictive
            continue
        nll = metrics_of(predictions, n_bins=settings.n_bins)["nll"]
        if math.isfinite(nll):
            curve[float(value)] = nll
    if not curve:
        raise RuntimeError(
            "Every prior precision of the grid gave a failed or non-finite "
            "validation predictive; widen prior_grid."
        )
    return curve


def widest_within(curve: dict[float, float], tolerance: float) -> float:
    """The smallest prior precision whose NLL is within ``tolerance`` of the best.

    ``min {δ : NLL(δ) ≤ NLL* + tolerance}`` with ``NLL* = min NLL``; with
    ``tolerance = 0`` the best prior (the smallest, on ties).

    Args:
        curve: ``{prior precision: NLL}``, not empty.
        tolerance: Non-negative, in the NLL's unit (nats per example).

    Returns:
        The prior precision.

    Raises:
        ValueError: For an empty curve or a negative tolerance.
    """
    if not curve:
        raise ValueError("The validation curve is empty.")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be non-negative, got {tolerance!r}.")
    limit = min(curve.values()) + tolerance
    return min(prior for prior, nll in curve.items() if nll <= limit)


def sweep_prior(
    la: BaseLaplace,
    data: EvaluationData,
    settings: EvaluationSettings,
    grid: Sequence[float] | None = None,
) -> list[dict[str, float]]:
    """Evaluate a fitted Laplace object at every prior of a grid, on every set.

    What the trade-off figure draws: for each prior precision, the evidence and the
    validation, test, OOD and shift metrics (each shift averaged over its strengths,
    and ``shift_nll`` / ``shift_ece`` over every kind). The object's prior precision
    is restored afterwards.

    Args:
        la: A fitted Laplace object.
        data: The loaders.
        settings: The evaluation settings (predictive, bins).
        grid: Prior precisions; ``settings.sweep_grid`` when ``None``.

    Returns:
        One flat record per prior that gave a finite predictive, in grid order:
        ``prior_precision``, ``log_marginal_likelihood``, ``val_*``, ``test_*``,
        ``ood_*``, ``shift_<kind>_*``, ``shift_*``.
    """
    grid = settings.sweep_grid if grid is None else grid
    tuned = la.prior_precision.detach().clone()
    points = []
    try:
        for prior in grid:
            la.prior_precision = float(prior)
            try:
                sets = evaluate_sets(la, data, settings.predictive, settings.n_bins)
            except (RuntimeError, ValueError):  # a singular or non-finite predictive
                continue
            row = ComparisonRow("sweep", None, None, None)
            row.val, row.test, row.shift = sets.val, sets.test, sets.shift
            record = {
                key: value
                for key, value in row.record().items()
                if isinstance(value, float) and not _per_strength(key, sets.shift)
            }
            record.update(row.shift_means())
            record["prior_precision"] = float(prior)
            record["log_marginal_likelihood"] = float(la.log_marginal_likelihood())
            points.append(record)
    finally:
        la.prior_precision = tuned
    return points


def _per_strength(key: str, shift: dict[str, dict[float, Any]]) -> bool:
    """Whether a record key is one strength's metric (``shift_rotation_30_nll``)."""
    return any(
        key.startswith(f"shift_{kind}_{strength:g}_")
        for kind, strengths in shift.items()
        for strength in strengths
    )
