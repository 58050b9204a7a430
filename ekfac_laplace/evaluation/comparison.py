"""Compare Laplace approximations on one MAP model: fit, tune, evaluate each.

:func:`compare` fits every candidate (:mod:`~ekfac_laplace.evaluation.candidates`) —
the MAP baseline, last-layer and all-weights Laplace approximations with different
Hessian structures — around the same trained network on the same data, tunes each
prior precision the same way (:func:`tune_prior`), and evaluates each predictive on
the same test, out-of-distribution and shifted sets:

- ``fit_seconds``, ``fit_memory_mib``: wall time of ``fit`` and the growth of the
  process's peak resident memory during it;
- ``prior_precision``: the tuned prior precision (scalar, or one per tensor);
- ``log_marginal_likelihood``: the Laplace evidence ``log p(D)`` at that prior;
- ``test_*``, ``val_*``: :mod:`~ekfac_laplace.evaluation.metrics` of the predictive;
- ``ood_*``: AUROC / FPR at 95% TPR of telling test from out-of-distribution inputs;
- ``shift_<kind>_*``: metrics under data-set shift, averaged over the strengths.

How each candidate is tuned and evaluated is one :class:`EvaluationSettings`; the
data sets are one :class:`EvaluationData`. A candidate that fails (an unsupported
layer, out of memory) yields a row holding the error instead of stopping the
comparison. The result is a :class:`~ekfac_laplace.evaluation.report.Comparison`.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from laplace.baselaplace import BaseLaplace
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ekfac_laplace.batches import split_batch
from ekfac_laplace.evaluation.candidates import DEFAULT_CANDIDATES, Candidate
from ekfac_laplace.evaluation.memory import PeakMemory
from ekfac_laplace.evaluation.metrics import Predictions, metrics_of
from ekfac_laplace.evaluation.predictions import LINK_APPROXES, PRED_TYPES, predict
from ekfac_laplace.evaluation.report import Comparison, ComparisonRow
from ekfac_laplace.factors import LIKELIHOODS

PRIOR_TUNINGS = ("marglik", "gridsearch", "none")
PRIOR_STRUCTURES = ("scalar", "layerwise")
DEFAULT_PRIOR_GRID = tuple(10.0 ** (k / 4) for k in range(-16, 17))


@dataclass(frozen=True)
class EvaluationSettings:
    """How every candidate of a comparison is tuned and evaluated.

    Attributes:
        prior_tuning: ``"marglik"`` (Adam on the log prior, laplace-torch's
            ``optimize_prior_precision``), ``"gridsearch"`` (our grid search on the
            validation *predictive* NLL — laplace-torch's own scores regression by
            MSE, which the prior does not change) or ``"none"`` (prior precision 1).
        prior_structure: ``"scalar"`` or ``"layerwise"`` (marglik only).
        prior_grid: Prior precisions tried by ``"gridsearch"``.
        marglik_steps: Adam steps of the marginal-likelihood tuning.
        pred_type: ``"glm"`` (linearised) or ``"nn"`` (sampled networks).
        link_approx: ``"probit"``, ``"bridge"``, ``"bridge_norm"`` or ``"mc"``.
        n_samples: Samples for ``"mc"`` / ``"nn"`` predictives.
        sigma_noise: Regression observation noise; estimated from the MAP's training
            residuals when ``None``.
        n_bins: Bins of the calibration errors.
        seed: Seed of torch's random generator at the start of every candidate
            (Monte-Carlo predictives, sampled Fisher), so rows are reproducible and
            independent of the candidates before them.
        progress_bar: Show progress bars over candidates and fits.
        keep_fitted: Keep every fitted Laplace object in ``Comparison.fitted``
            (they share the model; memory grows with the number of candidates).

    Raises:
        ValueError: For an unknown choice or a bad grid, when constructed.
    """

    prior_tuning: str = "marglik"
    prior_structure: str = "scalar"
    prior_grid: Sequence[float] = DEFAULT_PRIOR_GRID
    marglik_steps: int = 100
    pred_type: str = "glm"
    link_approx: str = "probit"
    n_samples: int = 100
    sigma_noise: float | None = None
    n_bins: int = 15
    seed: int = 0
    progress_bar: bool = False
    keep_fitted: bool = False

    def __post_init__(self) -> None:
        if self.prior_tuning not in PRIOR_TUNINGS:
            raise ValueError(
                f"Unknown prior_tuning {self.prior_tuning!r}; choose one of "
                f"{PRIOR_TUNINGS}."
            )
        if self.prior_structure not in PRIOR_STRUCTURES:
            raise ValueError(
                f"Unknown prior_structure {self.prior_structure!r}; choose 'scalar' "
                "or 'layerwise' (a per-parameter prior is not supported by every "
                "structure)."
            )
        if self.prior_tuning == "gridsearch":
            if self.prior_structure != "scalar":
                raise ValueError(
                    "prior_tuning='gridsearch' tunes a scalar prior; use "
                    "prior_structure='scalar' or prior_tuning='marglik'."
                )
            grid = self.prior_grid
            if not grid or any(not (float(p) > 0) for p in grid):
                raise ValueError(
                    f"prior_grid must hold positive prior precisions, got {grid!r}."
                )
        if self.pred_type not in PRED_TYPES:
            raise ValueError(
                f"Unknown pred_type {self.pred_type!r}; choose 'glm' or 'nn'."
            )
        if self.link_approx not in LINK_APPROXES:
            raise ValueError(
                f"Unknown link_approx {self.link_approx!r}; choose one of "
                f"{LINK_APPROXES}."
            )

    @property
    def predictive(self) -> dict[str, Any]:
        """The keyword arguments of a Laplace object's predictive."""
        return {
            "pred_type": self.pred_type,
            "link_approx": self.link_approx,
            "n_samples": self.n_samples,
        }


@dataclass
class EvaluationData:
    """The data sets of a comparison.

    Attributes:
        train_loader: The data the MAP was trained on (``N`` = its length).
        test_loader: Held-out data for the test metrics.
        val_loader: Validation data; needed for ``"gridsearch"`` and for ``val_*``.
        ood_loader: Out-of-distribution inputs (classification only).
        shift_loaders: ``{kind: {strength: loader}}`` shifted test sets.
    """

    train_loader: DataLoader
    test_loader: DataLoader
    val_loader: DataLoader | None = None
    ood_loader: DataLoader | None = None
    shift_loaders: Mapping[str, Mapping[float, DataLoader]] = field(
        default_factory=dict
    )

    def check(self, likelihood: str, settings: EvaluationSettings) -> None:
        """Refuse data that the likelihood or the settings cannot use.

        Args:
            likelihood: ``"classification"`` or ``"regression"``.
            settings: The evaluation settings.

        Raises:
            ValueError: For grid search without validation data, or OOD data with
                regression.
        """
        if settings.prior_tuning == "gridsearch" and self.val_loader is None:
            raise ValueError("prior_tuning='gridsearch' needs val_loader.")
        if self.ood_loader is not None and likelihood != "classification":
            raise ValueError("ood_loader is only used for classification.")


def compare(
    model: nn.Module,
    likelihood: str,
    train_loader: DataLoader,
    test_loader: DataLoader,
    *,
    candidates: Iterable[str | Candidate] = DEFAULT_CANDIDATES,
    val_loader: DataLoader | None = None,
    ood_loader: DataLoader | None = None,
    shift_loaders: Mapping[str, Mapping[float, DataLoader]] | None = None,
    settings: EvaluationSettings | None = None,
) -> Comparison:
    """Fit and evaluate every candidate on the same MAP model and data.

    Each candidate gets the same treatment: ``fit`` on ``train_loader``, the prior
    precision tuned as ``settings`` say (:func:`tune_prior`), then the predictive on
    every evaluation set. The MAP row evaluates the network itself (for regression
    with noise ``settings.sigma_noise``). The model's parameters are restored after
    every candidate, so a failing candidate cannot leave them changed; torch's
    random generator is forked per candidate and restored afterwards.

    Args:
        model: The trained MAP network (left unchanged).
        likelihood: ``"classification"`` or ``"regression"``.
        train_loader: The data the MAP was trained on (``N`` = its length).
        test_loader: Held-out data for the test metrics.
        candidates: Candidate specs (see :class:`Candidate`) or objects.
        val_loader: Validation data; needed for ``"gridsearch"`` and for ``val_*``.
        ood_loader: Out-of-distribution inputs (classification only); adds
            ``ood_*`` detection metrics.
        shift_loaders: ``{kind: {strength: loader}}`` shifted test sets.
        settings: How candidates are tuned and evaluated; the defaults (marglik,
            GLM probit) if ``None``.

    Returns:
        The :class:`~ekfac_laplace.evaluation.report.Comparison`.

    Raises:
        ValueError: For bad settings, before any candidate is fitted.
    """
    settings = EvaluationSettings() if settings is None else settings
    data = EvaluationData(
        train_loader, test_loader, val_loader, ood_loader, shift_loaders or {}
    )
    parsed = _parse_candidates(candidates)
    if likelihood not in LIKELIHOODS:
        raise ValueError(
            f"Unknown likelihood {likelihood!r}; choose 'classification' or "
            "'regression'."
        )
    data.check(likelihood, settings)
    if likelihood == "regression" and settings.sigma_noise is None:
        noise = residual_noise_scale(model, train_loader)
        settings = replace(settings, sigma_noise=noise)
    comparison = Comparison(rows=[], config=_config(likelihood, parsed, data, settings))
    saved_state = copy.deepcopy(model.state_dict())
    for candidate in tqdm(parsed, desc="Candidates", disable=not settings.progress_bar):
        row = ComparisonRow(
            candidate.name,
            candidate.subset_of_weights,
            candidate.hessian_structure,
            candidate.backend,
        )
        try:
            with torch.random.fork_rng(devices=_rng_devices(model)):
                torch.manual_seed(settings.seed)
                predictor, predictions = _run_candidate(
                    candidate, row, model, likelihood, data, settings
                )
            comparison.predictions[candidate.name] = predictions
            if settings.keep_fitted:
                comparison.fitted[candidate.name] = predictor
        except Exception as error:  # noqa: BLE001  (a failed candidate is a row)
            row.status = "failed"
            row.error = f"{type(error).__name__}: {error}".split("\n")[0]
        finally:
            model.load_state_dict(saved_state)
        comparison.rows.append(row)
    return comparison


def _parse_candidates(candidates: Iterable[str | Candidate]) -> list[Candidate]:
    parsed = [c if isinstance(c, Candidate) else Candidate.parse(c) for c in candidates]
    if not parsed:
        raise ValueError(
            "No candidates to compare; pass at least one, e.g. 'all_ekfac'."
        )
    names = [c.name for c in parsed]
    if len(set(names)) != len(names):
        raise ValueError(f"Candidates must be distinct, got {names}.")
    return parsed


def _config(
    likelihood: str,
    candidates: list[Candidate],
    data: EvaluationData,
    settings: EvaluationSettings,
) -> dict[str, Any]:
    """The settings of a comparison, as written to its files."""

    def size(loader: DataLoader | None) -> int | None:
        return None if loader is None else len(loader.dataset)

    return {
        "likelihood": likelihood,
        "candidates": [c.name for c in candidates],
        "prior_tuning": settings.prior_tuning,
        "prior_structure": settings.prior_structure,
        "n_train": size(data.train_loader),
        "n_test": size(data.test_loader),
        "n_val": size(data.val_loader),
        "n_ood": size(data.ood_loader),
        "shifts": {k: sorted(v) for k, v in data.shift_loaders.items()},
        "sigma_noise": settings.sigma_noise,
        "n_bins": settings.n_bins,
        "seed": settings.seed,
        **settings.predictive,
    }


def _rng_devices(model: nn.Module) -> list[int]:
    """CUDA devices whose generators a candidate may use (forked and restored)."""
    return sorted(
        {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    )


def _run_candidate(
    candidate: Candidate,
    row: ComparisonRow,
    model: nn.Module,
    likelihood: str,
    data: EvaluationData,
    settings: EvaluationSettings,
) -> tuple[nn.Module | BaseLaplace, dict[str, Any]]:
    """Fit, tune and evaluate one candidate, filling ``row``.

    Returns:
        The predictor (the Laplace object, or the model for the MAP) and its
        ``{"test", "ood", "shift"}`` predictions.
    """
    if candidate.is_map:
        predictor: nn.Module | BaseLaplace = model
        options: dict[str, Any] = {
            "likelihood": likelihood,
            "sigma_noise": settings.sigma_noise,
        }
        row.n_params = sum(p.numel() for p in model.parameters())
    else:
        predictor = _fit_and_tune(candidate, row, model, likelihood, data, settings)
        options = settings.predictive
    start = time.perf_counter()
    test = predict(predictor, data.test_loader, **options)
    row.predict_seconds = time.perf_counter() - start
    ood = None
    if data.ood_loader is not None:
        ood = predict(predictor, data.ood_loader, **options)
    row.test = metrics_of(test, ood, n_bins=settings.n_bins)
    if data.val_loader is not None:
        val = predict(predictor, data.val_loader, **options)
        row.val = metrics_of(val, n_bins=settings.n_bins)
    shifted: dict[str, dict[float, Predictions]] = {}
    for kind, by_strength in data.shift_loaders.items():
        shifted[kind], row.shift[kind] = {}, {}
        for strength, loader in sorted(by_strength.items()):
            shifted[kind][strength] = predict(predictor, loader, **options)
            row.shift[kind][strength] = metrics_of(
                shifted[kind][strength], n_bins=settings.n_bins
            )
    return predictor, {"test": test, "ood": ood, "shift": shifted}


def _fit_and_tune(
    candidate: Candidate,
    row: ComparisonRow,
    model: nn.Module,
    likelihood: str,
    data: EvaluationData,
    settings: EvaluationSettings,
) -> BaseLaplace:
    """Build, fit and tune a Laplace candidate, recording cost and evidence."""
    la = candidate.build(model, likelihood, sigma_noise=settings.sigma_noise or 1.0)
    with PeakMemory() as memory:
        start = time.perf_counter()
        la.fit(data.train_loader, progress_bar=settings.progress_bar)
        row.fit_seconds = time.perf_counter() - start
    row.fit_memory_mib = memory.growth_mib
    row.n_params = int(la.n_params)
    start = time.perf_counter()
    tune_prior(la, settings, data.val_loader)
    row.tune_seconds = time.perf_counter() - start
    prior = la.prior_precision.detach().flatten().tolist()
    row.prior_precision = prior[0] if len(prior) == 1 else prior
    row.log_marginal_likelihood = float(la.log_marginal_likelihood())
    return la


def tune_prior(
    la: BaseLaplace,
    settings: EvaluationSettings,
    val_loader: DataLoader | None = None,
) -> None:
    """Tune a fitted Laplace object's prior precision as the settings say.

    ``"marglik"`` maximises the evidence with laplace-torch's
    ``optimize_prior_precision`` (``settings.prior_structure``,
    ``settings.marglik_steps``); ``"gridsearch"`` picks the prior of
    ``settings.prior_grid`` with the lowest validation predictive NLL; ``"none"``
    leaves the prior as it is.

    Args:
        la: A fitted Laplace object.
        settings: The evaluation settings.
        val_loader: Validation data (``"gridsearch"`` only).

    Raises:
        ValueError: For ``"gridsearch"`` without validation data.
        RuntimeError: If every prior of the grid gives a failed predictive.
    """
    if settings.prior_tuning == "marglik":
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
    elif settings.prior_tuning == "gridsearch":
        if val_loader is None:
            raise ValueError("prior_tuning='gridsearch' needs val_loader.")
        la.prior_precision = _grid_search(la, settings, val_loader)


def _grid_search(
    la: BaseLaplace, settings: EvaluationSettings, val_loader: DataLoader
) -> float:
    """The prior of the grid with the lowest validation predictive NLL."""
    best, best_nll = None, math.inf
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
        if nll < best_nll:
            best, best_nll = float(value), nll
    if best is None:
        raise RuntimeError(
            "Every prior precision of the grid gave a failed or non-finite "
            "validation predictive; widen prior_grid."
        )
    return best


def residual_noise_scale(model: nn.Module, loader: DataLoader) -> float:
    """Root-mean-square residual of the MAP: a plug-in regression noise scale.

    Args:
        model: The regression network.
        loader: Batches ``(X, y)``, usually the training data.

    Returns:
        ``sqrt(mean((f(x) - y)²))``, at least ``1e-6``.

    Raises:
        ValueError: If the loader is empty.
    """
    squared, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            X, y = split_batch(batch)
            output = model(X)
            squared += float(((output - y.reshape(output.shape)) ** 2).sum())
            count += output.numel()
    if count == 0:
        raise ValueError("The training loader is empty.")
    return max(math.sqrt(squared / count), 1e-6)
