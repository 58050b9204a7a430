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
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from laplace.baselaplace import BaseLaplace
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ekfac_laplace.evaluation.candidates import (
    DEFAULT_CANDIDATES,
    PRIOR_TUNINGS,
    Candidate,
)
from ekfac_laplace.evaluation.memory import PeakMemory
from ekfac_laplace.evaluation.peers import (
    DeepEnsemble,
    MCDropout,
    PeerTrainer,
    Predictive,
    TemperatureScaled,
    residual_noise_scale,
)
from ekfac_laplace.evaluation.priors import evaluate_sets, sweep_prior, tune_prior
from ekfac_laplace.evaluation.report import Comparison, ComparisonRow
from ekfac_laplace.evaluation.settings import (
    DEFAULT_PRIOR_GRID,
    DEFAULT_SWEEP_GRID,
    PRIOR_STRUCTURES,
    VALIDATION_TUNINGS,
    EvaluationData,
    EvaluationSettings,
)
from ekfac_laplace.factors import LIKELIHOODS

__all__ = [
    "DEFAULT_PRIOR_GRID",
    "DEFAULT_SWEEP_GRID",
    "PRIOR_STRUCTURES",
    "PRIOR_TUNINGS",
    "EvaluationData",
    "EvaluationSettings",
    "compare",
    "residual_noise_scale",
    "tune_prior",
]


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
    train_peer: PeerTrainer | None = None,
) -> Comparison:
    """Fit and evaluate every candidate on the same MAP model and data.

    Each Laplace candidate gets the same treatment: ``fit`` on ``train_loader``,
    the prior precision tuned as ``settings`` (or its ``@<tuning>``) say
    (:func:`tune_prior`), then the predictive on every evaluation set, and, when
    ``settings.sweep_grid`` is set, the same at every prior of the sweep. Candidates
    that differ only in their tuning share one fit. The MAP row evaluates the
    network itself (for regression with noise ``settings.sigma_noise``); its peers
    (:mod:`~ekfac_laplace.evaluation.peers`) are evaluated the same way, their
    ``fit_seconds`` the cost of fitting the temperature or training their extra
    networks. The model's parameters are restored after every candidate, so a
    failing candidate cannot leave them changed; torch's random generator is
    forked per candidate and restored afterwards.

    Args:
        model: The trained MAP network (left unchanged).
        likelihood: ``"classification"`` or ``"regression"``.
        train_loader: The data the MAP was trained on (``N`` = its length).
        test_loader: Held-out data for the test metrics.
        candidates: Candidate specs (see :class:`Candidate`) or objects.
        val_loader: Validation data; needed for the validation tunings, for
            ``"map_ts"`` and for ``val_*``.
        ood_loader: Out-of-distribution inputs (classification only); adds
            ``ood_*`` detection metrics.
        shift_loaders: ``{kind: {strength: loader}}`` shifted test sets.
        settings: How candidates are tuned and evaluated; the defaults if ``None``.
        train_peer: ``train_peer(seed, dropout)`` trains one more network like the
            MAP (see :data:`~ekfac_laplace.evaluation.peers.PeerTrainer`); needed by
            the ``"ensemble<M>"`` and ``"mc_dropout"`` candidates only.

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
    tunings = {_tuning(c, settings) for c in parsed if c.is_laplace}
    if settings.prior_structure != "scalar" and tunings & set(VALIDATION_TUNINGS):
        raise ValueError(
            f"The validation tunings {VALIDATION_TUNINGS} tune a scalar prior; use "
            "prior_structure='scalar' or tune those candidates by 'marglik'."
        )
    data.check(likelihood, settings, sorted(tunings))
    if likelihood == "regression" and settings.sigma_noise is None:
        noise = residual_noise_scale(model, train_loader)
        settings = replace(settings, sigma_noise=noise)
    comparison = Comparison(rows=[], config=_config(likelihood, parsed, data, settings))
    saved_state = copy.deepcopy(model.state_dict())
    shared: dict[str, _Fit] = {}
    for candidate in tqdm(parsed, desc="Candidates", disable=not settings.progress_bar):
        row = ComparisonRow(
            candidate.name,
            candidate.subset_of_weights,
            candidate.hessian_structure,
            candidate.backend,
        )
        run = _CandidateRun(candidate, row, model, likelihood, data, settings)
        try:
            with torch.random.fork_rng(devices=_rng_devices(model)):
                torch.manual_seed(settings.seed)
                predictor, predictions = run.evaluate(shared, train_peer)
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


def _tuning(candidate: Candidate, settings: EvaluationSettings) -> str:
    """The prior tuning of a Laplace candidate: its own, else the comparison's."""
    return candidate.prior_tuning or settings.prior_tuning


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
        "val_tolerance": settings.val_tolerance,
        "sweep_grid": list(settings.sweep_grid),
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


@dataclass
class _Fit:
    """A fitted Laplace object and what its fit cost, shared by its tunings."""

    la: BaseLaplace
    fit_seconds: float
    fit_memory_mib: float | None
    sweep: list[dict[str, float]] | None = None


@dataclass
class _CandidateRun:
    """Fit (or train), tune and evaluate one candidate, filling its row."""

    candidate: Candidate
    row: ComparisonRow
    model: nn.Module
    likelihood: str
    data: EvaluationData
    settings: EvaluationSettings

    def evaluate(
        self, shared: dict[str, _Fit], train_peer: PeerTrainer | None
    ) -> tuple[nn.Module | BaseLaplace | Predictive, dict[str, Any]]:
        """Build the candidate's predictor and evaluate it on every set.

        Args:
            shared: Fits of earlier candidates, by :attr:`Candidate.fit_name`.
            train_peer: Trains the extra networks of ensembles and MC dropout.

        Returns:
            The predictor (a Laplace object, the model for the MAP, or a peer) and
            its ``{"test", "ood", "shift"}`` predictions.
        """
        candidate, row, settings = self.candidate, self.row, self.settings
        options: dict[str, Any] = settings.predictive
        if candidate.is_map:
            predictor: nn.Module | BaseLaplace | Predictive = self.model
            noise = settings.sigma_noise
            options = {"likelihood": self.likelihood, "sigma_noise": noise}
            row.n_params = _n_params(self.model)
        elif candidate.is_peer:
            start = time.perf_counter()
            predictor = self._peer(train_peer)
            row.fit_seconds = time.perf_counter() - start
            row.n_params = sum(_n_params(net) for net in predictor.networks)
            options = {}
        else:
            predictor = self._laplace(shared)
        start = time.perf_counter()
        sets = evaluate_sets(predictor, self.data, options, settings.n_bins)
        row.predict_seconds = time.perf_counter() - start
        row.test, row.val, row.shift = sets.test, sets.val, sets.shift
        return predictor, sets.predictions

    def _laplace(self, shared: dict[str, _Fit]) -> BaseLaplace:
        """Fit (or take the shared fit), tune, record cost and evidence, sweep."""
        candidate, row, settings = self.candidate, self.row, self.settings
        fit = shared.get(candidate.fit_name)
        if fit is None:
            la = candidate.build(
                self.model, self.likelihood, sigma_noise=settings.sigma_noise or 1.0
            )
            with PeakMemory() as memory:
                start = time.perf_counter()
                la.fit(self.data.train_loader, progress_bar=settings.progress_bar)
                seconds = time.perf_counter() - start
            fit = _Fit(la, seconds, memory.growth_mib)
            shared[candidate.fit_name] = fit
        la = fit.la
        row.fit_seconds, row.fit_memory_mib = fit.fit_seconds, fit.fit_memory_mib
        row.n_params = int(la.n_params)
        row.prior_tuning = _tuning(candidate, settings)
        start = time.perf_counter()
        tune_prior(la, settings, self.data.val_loader, tuning=row.prior_tuning)
        row.tune_seconds = time.perf_counter() - start
        prior = la.prior_precision.detach().flatten().tolist()
        row.prior_precision = prior[0] if len(prior) == 1 else prior
        row.log_marginal_likelihood = float(la.log_marginal_likelihood())
        swept = settings.sweep_candidates
        if (
            settings.sweep_grid
            and fit.sweep is None
            and (swept is None or candidate.fit_name in swept)
        ):
            start = time.perf_counter()
            fit.sweep = sweep_prior(la, self.data, settings)
            row.sweep_seconds = time.perf_counter() - start
        row.sweep = fit.sweep or []
        # Its own object, so a later row's tuning of the shared fit leaves this
        # row's prior (in Comparison.fitted) as it was; the curvature is shared.
        return copy.copy(la)

    def _peer(self, train_peer: PeerTrainer | None) -> Predictive:
        """Fit the temperature, or train the ensemble's or MC dropout's networks."""
        candidate, settings = self.candidate, self.settings
        noise = settings.sigma_noise
        if candidate.peer == "temperature":
            if self.data.val_loader is None:
                raise ValueError(
                    "Temperature scaling fits its temperature on validation data; "
                    "pass val_loader."
                )
            scaled = TemperatureScaled.fit(
                self.model, self.data.val_loader, self.likelihood, sigma_noise=noise
            )
            self.row.temperature = scaled.temperature
            return scaled
        if train_peer is None:
            raise ValueError(
                f"{candidate.name!r} trains more networks: pass compare(..., "
                "train_peer=...), a function (seed, dropout) -> trained network "
                "(the command line passes its own)."
            )
        if candidate.peer == "ensemble":
            members = [self.model] + [
                train_peer(settings.seed + m, 0.0) for m in range(1, candidate.members)
            ]
            noises = None
            if self.likelihood == "regression":
                loader = self.data.train_loader
                noises = [residual_noise_scale(net, loader) for net in members]
            return DeepEnsemble(members, self.likelihood, noises)
        network = train_peer(settings.seed, candidate.dropout)
        if self.likelihood == "regression":
            noise = residual_noise_scale(network, self.data.train_loader)
        return MCDropout(network, self.likelihood, settings.n_samples, noise)


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
