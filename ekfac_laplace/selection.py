"""Compare Laplace approximations on one MAP model, and select one.

:func:`compare` fits every candidate — the MAP baseline, last-layer and all-weights
Laplace approximations with different Hessian structures — around the same trained
network on the same data, tunes each prior precision the same way, and evaluates each
predictive on the same test, out-of-distribution and shifted sets:

- ``fit_seconds``, ``fit_memory_mib``: wall time of ``fit`` and the growth of the
  process's peak resident memory during it;
- ``prior_precision``: the tuned prior precision (scalar, or one per tensor);
- ``log_marginal_likelihood``: the Laplace evidence ``log p(D)`` at that prior;
- ``test_*``, ``val_*``: :mod:`ekfac_laplace.calibration` metrics of the predictive;
- ``ood_*``: AUROC / FPR at 95% TPR of telling test from out-of-distribution inputs;
- ``shift_<kind>_*``: metrics under data-set shift, averaged over the strengths.

:func:`select` then picks one candidate by evidence or by validation NLL and says why.
A candidate that fails (an unsupported layer, out of memory) yields a row holding the
error instead of stopping the comparison.
"""

from __future__ import annotations

import copy
import csv
import ctypes
import gc
import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from laplace import Laplace
from laplace.baselaplace import BaseLaplace
from laplace.curvature import CurvlinopsEF, CurvlinopsGGN
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

import ekfac_laplace.laplace  # noqa: F401  (registers hessian_structure="ekfac")
from ekfac_laplace.calibration import (
    ClassificationPredictions,
    RegressionPredictions,
    classification_metrics,
    predict,
    regression_metrics,
)

DEFAULT_CANDIDATES = (
    "map",
    "ll_kron",
    "ll_ekfac",
    "ll_full",
    "all_diag",
    "all_kron",
    "all_ekfac",
)
SUBSETS = {"ll": "last_layer", "all": "all"}
STRUCTURES = ("diag", "kron", "ekfac", "full", "lowrank")
BACKENDS = {
    "ggn": (CurvlinopsGGN, {}),
    "mc": (CurvlinopsGGN, {"stochastic": True}),
    "ef": (CurvlinopsEF, {}),
}
PRIOR_TUNINGS = ("marglik", "gridsearch", "none")
SELECTION_CRITERIA = ("evidence", "val_nll")
DEFAULT_PRIOR_GRID = tuple(10.0 ** (k / 4) for k in range(-16, 17))

Predictions = ClassificationPredictions | RegressionPredictions


@dataclass(frozen=True)
class Candidate:
    """One Laplace approximation to compare, or the MAP baseline.

    Written as ``"<subset>_<structure>[:<backend>]"``: ``subset`` is ``ll`` (last
    layer) or ``all``; ``structure`` one of ``diag``, ``kron``, ``ekfac``, ``full``,
    ``lowrank``; ``backend`` ``ggn`` (exact GGN, default), ``mc`` (Monte-Carlo
    Fisher) or ``ef`` (empirical Fisher). ``"map"`` is the network without Laplace.

    Attributes:
        name: The spec it was parsed from, used as the row's name.
        subset_of_weights: ``"last_layer"`` or ``"all"``; ``None`` for the MAP.
        hessian_structure: laplace-torch Hessian structure; ``None`` for the MAP.
        backend: ``"ggn"``, ``"mc"`` or ``"ef"``; ``None`` for the MAP.
    """

    name: str
    subset_of_weights: str | None = None
    hessian_structure: str | None = None
    backend: str | None = None

    @classmethod
    def parse(cls, spec: str) -> Candidate:
        """Parse ``"map"`` or ``"<subset>_<structure>[:<backend>]"``.

        Args:
            spec: The candidate, e.g. ``"all_ekfac"`` or ``"ll_kron:mc"``.

        Returns:
            The candidate.

        Raises:
            ValueError: If the spec does not name a known subset, structure, backend.
        """
        spec = spec.strip()
        if spec == "map":
            return cls("map")
        head, colon, backend = spec.partition(":")
        subset, _, structure = head.partition("_")
        backend = backend if colon else "ggn"
        if (
            subset not in SUBSETS
            or structure not in STRUCTURES
            or backend not in (BACKENDS)
        ):
            raise ValueError(
                f"Unknown candidate {spec!r}: write 'map' or "
                f"'<subset>_<structure>[:<backend>]' with subset in "
                f"{tuple(SUBSETS)}, structure in {STRUCTURES} and backend in "
                f"{tuple(BACKENDS)}, e.g. 'all_ekfac' or 'll_kron:mc'."
            )
        return cls(spec, SUBSETS[subset], structure, backend)

    @property
    def is_map(self) -> bool:
        """Whether this is the MAP baseline (no Laplace approximation)."""
        return self.subset_of_weights is None

    def build(
        self, model: nn.Module, likelihood: str, *, sigma_noise: float = 1.0
    ) -> BaseLaplace:
        """Create the (unfitted) laplace-torch object for this candidate.

        Args:
            model: The MAP network.
            likelihood: ``"classification"`` or ``"regression"``.
            sigma_noise: Observation noise for regression.

        Returns:
            The Laplace approximation, ready for ``fit``.

        Raises:
            ValueError: For the MAP candidate, which has no Laplace object.
        """
        if self.is_map:
            raise ValueError("The MAP candidate has no Laplace approximation.")
        backend, backend_kwargs = BACKENDS[self.backend]
        return Laplace(
            model,
            likelihood,
            subset_of_weights=self.subset_of_weights,
            hessian_structure=self.hessian_structure,
            backend=backend,
            backend_kwargs=dict(backend_kwargs),
            sigma_noise=sigma_noise,
        )


@dataclass
class ComparisonRow:
    """The outcome of one candidate in :func:`compare`.

    Attributes:
        candidate: The candidate's name (its spec).
        subset_of_weights: ``"last_layer"``, ``"all"`` or ``None`` (MAP).
        hessian_structure: The Hessian structure or ``None`` (MAP).
        backend: ``"ggn"``, ``"mc"``, ``"ef"`` or ``None`` (MAP).
        status: ``"ok"`` or ``"failed"``.
        error: ``"<ExceptionType>: <message>"`` when the candidate failed.
        n_params: Number of parameters treated as random (all for the MAP).
        fit_seconds: Wall time of ``fit``.
        tune_seconds: Wall time of the prior tuning.
        predict_seconds: Wall time of the test-set predictive.
        fit_memory_mib: Growth of the process's peak resident memory during ``fit``
            over its resident memory before (freed heap is returned to the OS
            first, so earlier candidates do not hide it; ``None`` where ``/proc``
            cannot measure it).
        prior_precision: Tuned prior precision: a float, or one per parameter tensor.
        log_marginal_likelihood: Laplace evidence at the tuned prior.
        val: Validation metrics.
        test: Test metrics (with OOD detection when an OOD set was given).
        shift: ``shift[kind][strength]`` metrics on shifted test sets.
    """

    candidate: str
    subset_of_weights: str | None
    hessian_structure: str | None
    backend: str | None
    status: str = "ok"
    error: str | None = None
    n_params: int | None = None
    fit_seconds: float | None = None
    tune_seconds: float | None = None
    predict_seconds: float | None = None
    fit_memory_mib: float | None = None
    prior_precision: float | list[float] | None = None
    log_marginal_likelihood: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    shift: dict[str, dict[float, dict[str, float]]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the candidate was fitted and evaluated."""
        return self.status == "ok"

    def record(self) -> dict[str, Any]:
        """One flat row: scalars, ``val_*``, ``test_*``/``ood_*`` and ``shift_*``.

        Shift metrics appear per strength (``shift_rotation_30_nll``) and averaged
        over the strengths (``shift_rotation_nll``). A per-tensor prior precision is
        summarised by its geometric mean.

        Returns:
            Column name to value (``None`` where not available).
        """
        prior = self.prior_precision
        if isinstance(prior, list):
            prior = math.exp(sum(math.log(p) for p in prior) / len(prior))
        record: dict[str, Any] = {
            "candidate": self.candidate,
            "subset_of_weights": self.subset_of_weights,
            "hessian_structure": self.hessian_structure,
            "backend": self.backend,
            "status": self.status,
            "error": self.error,
            "n_params": self.n_params,
            "fit_seconds": self.fit_seconds,
            "tune_seconds": self.tune_seconds,
            "predict_seconds": self.predict_seconds,
            "fit_memory_mib": self.fit_memory_mib,
            "prior_precision": prior,
            "log_marginal_likelihood": self.log_marginal_likelihood,
        }
        record.update({f"val_{key}": value for key, value in self.val.items()})
        for key, value in self.test.items():
            record[key if key.startswith("ood_") else f"test_{key}"] = value
        for kind, by_strength in self.shift.items():
            metrics = sorted({key for values in by_strength.values() for key in values})
            for metric in metrics:
                values = [v[metric] for v in by_strength.values() if metric in v]
                record[f"shift_{kind}_{metric}"] = sum(values) / len(values)
            for strength, values in by_strength.items():
                for metric, value in values.items():
                    record[f"shift_{kind}_{strength:g}_{metric}"] = value
        return record


@dataclass
class Selection:
    """The candidate :func:`select` picked.

    Attributes:
        candidate: The chosen candidate's name.
        criterion: ``"evidence"`` or ``"val_nll"``.
        value: The chosen candidate's value of the criterion.
        reason: A sentence saying why, with the runner-up and the margin.
    """

    candidate: str
    criterion: str
    value: float
    reason: str


@dataclass
class Comparison:
    """All rows of :func:`compare`, with the predictions behind them.

    Attributes:
        rows: One :class:`ComparisonRow` per candidate, in the order given.
        predictions: ``predictions[candidate]`` holds ``"test"``, ``"ood"`` (if an OOD
            set was given) and ``"shift"`` (``[kind][strength]``) predictions, for
            plots; not written to files.
        config: The settings of the comparison (written to files).
        fitted: The fitted Laplace objects (the model for ``"map"``) when
            ``compare(..., keep_fitted=True)``; empty otherwise.
    """

    rows: list[ComparisonRow]
    predictions: dict[str, dict[str, Any]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    fitted: dict[str, nn.Module | BaseLaplace] = field(default_factory=dict)

    def row(self, candidate: str) -> ComparisonRow:
        """The row of one candidate.

        Args:
            candidate: Its name.

        Returns:
            The row.

        Raises:
            KeyError: If no candidate has that name.
        """
        for row in self.rows:
            if row.candidate == candidate:
                return row
        names = [row.candidate for row in self.rows]
        raise KeyError(f"No candidate {candidate!r}; the rows are {names}.")

    def records(self) -> list[dict[str, Any]]:
        """Flat records of every row (see :meth:`ComparisonRow.record`).

        Returns:
            One dict per row.
        """
        return [row.record() for row in self.rows]

    def table(
        self, columns: Sequence[str] | None = None, *, markdown: bool = False
    ) -> str:
        """The rows as an aligned text table (or a Markdown table).

        Args:
            columns: Record keys to show; defaults to the main columns that exist.
            markdown: Write a Markdown table instead of aligned text.

        Returns:
            The table; failed candidates show their error in the last column.
        """
        records = self.records()
        if columns is None:
            present = set().union(*(record.keys() for record in records))
            columns = [key for key in TABLE_COLUMNS if key in present]
        header = ["candidate", *columns]
        lines = [
            [_format_cell(record.get(key)) for key in header] for record in records
        ]
        failed = [record["error"] for record in records]
        if any(failed):
            header.append("error")
            for line, error in zip(lines, failed):
                line.append(error or "")
        if markdown:
            rule = ["---"] * len(header)
            return "\n".join(
                "| " + " | ".join(cells) + " |" for cells in [header, rule, *lines]
            )
        widths = [
            max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))
        ]
        return "\n".join(
            "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
            for cells in [header, *lines]
        )

    def select(self, by: str = "evidence") -> Selection:
        """Pick a candidate; see :func:`select`.

        Args:
            by: ``"evidence"`` or ``"val_nll"``.

        Returns:
            The selection.
        """
        return select(self.rows, by=by)

    def to_json(self, path: str | Path) -> Path:
        """Write the config, every row (nested metrics) and flat records as JSON.

        Non-finite numbers are written as ``null``.

        Args:
            path: Output file; parent directories are created.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "config": self.config,
            "rows": [asdict(row) for row in self.rows],
            "records": self.records(),
        }
        path.write_text(json.dumps(_json_safe(payload), indent=2) + "\n")
        return path

    def to_csv(self, path: str | Path) -> Path:
        """Write the flat records as CSV (one line per candidate).

        Args:
            path: Output file; parent directories are created.

        Returns:
            The path written.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        records = self.records()
        columns: list[str] = []
        for record in records:
            columns += [key for key in record if key not in columns]
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(records)
        return path


TABLE_COLUMNS = (
    "fit_seconds",
    "fit_memory_mib",
    "prior_precision",
    "log_marginal_likelihood",
    "val_nll",
    "test_accuracy",
    "test_nll",
    "test_ece",
    "test_brier",
    "test_rmse",
    "test_coverage_90",
    "test_calibration_error",
    "ood_auroc_entropy",
    "shift_rotation_nll",
    "shift_rotation_ece",
    "shift_noise_nll",
    "shift_noise_ece",
)


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
    prior_tuning: str = "marglik",
    prior_structure: str = "scalar",
    prior_grid: Sequence[float] = DEFAULT_PRIOR_GRID,
    marglik_steps: int = 100,
    pred_type: str = "glm",
    link_approx: str = "probit",
    n_samples: int = 100,
    sigma_noise: float | None = None,
    n_bins: int = 15,
    progress_bar: bool = False,
    keep_fitted: bool = False,
    seed: int = 0,
) -> Comparison:
    """Fit and evaluate every candidate on the same MAP model and data.

    Each candidate gets the same treatment: ``fit`` on ``train_loader``; the prior
    precision tuned by marginal likelihood (``"marglik"``: Adam on the log prior,
    laplace-torch's ``optimize_prior_precision``), by validation NLL over
    ``prior_grid`` (``"gridsearch"``: our grid search, which scores the *predictive*
    NLL — laplace-torch's own grid search scores regression by MSE, which the prior
    does not change), or not at all (``"none"``, prior precision 1); then the
    predictive on every evaluation set. The MAP row evaluates the network itself
    (for regression with noise ``sigma_noise``). The model's parameters are restored
    after every candidate, so a failing candidate cannot leave them changed.

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
        prior_tuning: ``"marglik"``, ``"gridsearch"`` or ``"none"``.
        prior_structure: ``"scalar"`` or ``"layerwise"`` (marglik only).
        prior_grid: Prior precisions tried by ``"gridsearch"``.
        marglik_steps: Adam steps of the marginal-likelihood tuning.
        pred_type: ``"glm"`` (linearised) or ``"nn"`` (sampled networks).
        link_approx: ``"probit"``, ``"bridge"``, ``"bridge_norm"`` or ``"mc"``.
        n_samples: Samples for ``"mc"`` / ``"nn"`` predictives.
        sigma_noise: Regression observation noise; estimated from the MAP's training
            residuals when ``None``.
        n_bins: Bins of the calibration errors.
        progress_bar: Show tqdm bars over candidates and fits.
        keep_fitted: Keep every fitted Laplace object in ``Comparison.fitted`` (they
            share the model; memory grows with the number of candidates).
        seed: Seed of torch's random generator at the start of every candidate
            (Monte-Carlo predictives, sampled Fisher), so rows are reproducible and
            independent of the candidates before them; the caller's generator state
            is restored afterwards.

    Returns:
        The :class:`Comparison`.

    Raises:
        ValueError: For bad settings, before any candidate is fitted.
    """
    parsed = [c if isinstance(c, Candidate) else Candidate.parse(c) for c in candidates]
    _check_compare_arguments(
        parsed,
        likelihood,
        val_loader,
        ood_loader,
        prior_tuning,
        prior_structure,
        prior_grid,
        pred_type,
    )
    if likelihood == "regression" and sigma_noise is None:
        sigma_noise = residual_noise_scale(model, train_loader)
    evaluation = {
        "pred_type": pred_type,
        "link_approx": link_approx,
        "n_samples": n_samples,
    }
    config = {
        "likelihood": likelihood,
        "candidates": [c.name for c in parsed],
        "prior_tuning": prior_tuning,
        "prior_structure": prior_structure,
        "n_train": len(train_loader.dataset),
        "n_test": len(test_loader.dataset),
        "n_val": None if val_loader is None else len(val_loader.dataset),
        "n_ood": None if ood_loader is None else len(ood_loader.dataset),
        "shifts": {k: sorted(v) for k, v in (shift_loaders or {}).items()},
        "sigma_noise": sigma_noise,
        "n_bins": n_bins,
        "seed": seed,
        **evaluation,
    }
    comparison = Comparison(rows=[], config=config)
    saved_state = copy.deepcopy(model.state_dict())
    for candidate in tqdm(parsed, desc="Candidates", disable=not progress_bar):
        row = ComparisonRow(
            candidate.name,
            candidate.subset_of_weights,
            candidate.hessian_structure,
            candidate.backend,
        )
        try:
            with torch.random.fork_rng(devices=_rng_devices(model)):
                torch.manual_seed(seed)
                predictions = _run_candidate(
                    candidate,
                    row,
                    model,
                    likelihood,
                    train_loader,
                    test_loader,
                    val_loader,
                    ood_loader,
                    shift_loaders or {},
                    prior_tuning,
                    prior_structure,
                    prior_grid,
                    marglik_steps,
                    evaluation,
                    sigma_noise,
                    n_bins,
                    progress_bar,
                )
                comparison.predictions[candidate.name] = predictions.pop("predictions")
                if keep_fitted:
                    comparison.fitted[candidate.name] = predictions["predictor"]
        except Exception as error:  # noqa: BLE001  (a failed candidate is a row)
            row.status = "failed"
            row.error = f"{type(error).__name__}: {error}".split("\n")[0]
        finally:
            model.load_state_dict(saved_state)
        comparison.rows.append(row)
    return comparison


def _rng_devices(model: nn.Module) -> list[int]:
    """CUDA devices whose generators a candidate may use (forked and restored)."""
    return sorted(
        {p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"}
    )


def select(rows: Sequence[ComparisonRow], by: str = "evidence") -> Selection:
    """Pick the candidate with the highest evidence or the lowest validation NLL.

    Evidence (the Laplace log marginal likelihood) needs no held-out data and is
    what the Laplace approximation itself optimises; it ranks Laplace candidates only
    (the MAP has none). Last-layer and all-weights evidences treat different weights
    as random, so compare them with care. Validation NLL ranks every candidate,
    including the MAP, by the quantity a calibrated predictive should minimise.

    Args:
        rows: The rows of :func:`compare` (failed rows are skipped).
        by: ``"evidence"`` or ``"val_nll"``.

    Returns:
        The chosen candidate, its value and the reason.

    Raises:
        ValueError: For an unknown criterion or when no row has the criterion.
    """
    if by not in SELECTION_CRITERIA:
        raise ValueError(
            f"Unknown selection criterion {by!r}; choose one of {SELECTION_CRITERIA}."
        )
    if by == "evidence":
        scored = [
            (row.candidate, row.log_marginal_likelihood)
            for row in rows
            if row.ok and _finite(row.log_marginal_likelihood)
        ]
        scored.sort(key=lambda item: -item[1])
        what, unit = "highest log marginal likelihood", "nats"
    else:
        scored = [
            (row.candidate, row.val.get("nll"))
            for row in rows
            if row.ok and _finite(row.val.get("nll"))
        ]
        scored.sort(key=lambda item: item[1])
        what, unit = "lowest validation NLL", "nats per example"
    if not scored:
        raise ValueError(
            f"No successful candidate has a {by!r} value: evidence needs a Laplace "
            "candidate, validation NLL needs compare(..., val_loader=...)."
        )
    best, value = scored[0]
    reason = f"{best} has the {what} ({value:.4g})"
    if len(scored) > 1:
        runner_up, runner_value = scored[1]
        margin = abs(value - runner_value)
        reason += (
            f"; runner-up {runner_up} ({runner_value:.4g}), margin {margin:.3g} {unit}"
        )
    if by == "evidence":
        subsets = {
            row.subset_of_weights
            for row in rows
            if row.ok and not row.candidate == "map"
        }
        if len(subsets) > 1:
            reason += (
                "; note that last-layer and all-weights evidences treat different "
                "weights as random"
            )
    return Selection(best, by, value, reason + ".")


def _run_candidate(
    candidate: Candidate,
    row: ComparisonRow,
    model: nn.Module,
    likelihood: str,
    train_loader: DataLoader,
    test_loader: DataLoader,
    val_loader: DataLoader | None,
    ood_loader: DataLoader | None,
    shift_loaders: Mapping[str, Mapping[float, DataLoader]],
    prior_tuning: str,
    prior_structure: str,
    prior_grid: Sequence[float],
    marglik_steps: int,
    evaluation: dict[str, Any],
    sigma_noise: float | None,
    n_bins: int,
    progress_bar: bool,
) -> dict[str, Any]:
    """Fit, tune and evaluate one candidate, filling ``row``.

    Returns ``{"predictions": ..., "predictor": the Laplace object or the model}``.
    """
    if candidate.is_map:
        predictor: nn.Module | BaseLaplace = model
        options: dict[str, Any] = {"likelihood": likelihood, "sigma_noise": sigma_noise}
        row.n_params = sum(p.numel() for p in model.parameters())
    else:
        la = candidate.build(model, likelihood, sigma_noise=sigma_noise or 1.0)
        with _PeakMemory() as memory:
            start = time.perf_counter()
            la.fit(train_loader, progress_bar=progress_bar)
            row.fit_seconds = time.perf_counter() - start
        row.fit_memory_mib = memory.growth_mib
        row.n_params = int(la.n_params)
        options = dict(evaluation)
        start = time.perf_counter()
        _tune_prior(
            la,
            prior_tuning,
            prior_structure,
            prior_grid,
            marglik_steps,
            val_loader,
            options,
            n_bins,
            progress_bar,
        )
        row.tune_seconds = time.perf_counter() - start
        prior = la.prior_precision.detach().flatten().tolist()
        row.prior_precision = prior[0] if len(prior) == 1 else prior
        row.log_marginal_likelihood = float(la.log_marginal_likelihood())
        predictor = la

    def metrics(
        predictions: Predictions, ood: Predictions | None = None
    ) -> dict[str, float]:
        if isinstance(predictions, ClassificationPredictions):
            return classification_metrics(predictions, ood, n_bins=n_bins)
        return regression_metrics(predictions)

    start = time.perf_counter()
    test = predict(predictor, test_loader, **options)
    row.predict_seconds = time.perf_counter() - start
    ood = None if ood_loader is None else predict(predictor, ood_loader, **options)
    row.test = metrics(test, ood)
    if val_loader is not None:
        row.val = metrics(predict(predictor, val_loader, **options))
    shifted: dict[str, dict[float, Predictions]] = {}
    for kind, by_strength in shift_loaders.items():
        shifted[kind], row.shift[kind] = {}, {}
        for strength, loader in sorted(by_strength.items()):
            shifted[kind][strength] = predict(predictor, loader, **options)
            row.shift[kind][strength] = metrics(shifted[kind][strength])
    return {
        "predictions": {"test": test, "ood": ood, "shift": shifted},
        "predictor": predictor,
    }


def _tune_prior(
    la: BaseLaplace,
    prior_tuning: str,
    prior_structure: str,
    prior_grid: Sequence[float],
    marglik_steps: int,
    val_loader: DataLoader | None,
    evaluation: dict[str, Any],
    n_bins: int,
    progress_bar: bool,
) -> None:
    if prior_tuning == "marglik":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="By default `link_approx`")
            la.optimize_prior_precision(
                pred_type=evaluation["pred_type"],
                method="marglik",
                n_steps=marglik_steps,
                prior_structure=prior_structure,
                link_approx=evaluation["link_approx"],
                progress_bar=progress_bar,
            )
    elif prior_tuning == "gridsearch":
        assert val_loader is not None
        best, best_nll = None, math.inf
        for value in tqdm(prior_grid, desc="Prior grid", disable=not progress_bar):
            la.prior_precision = float(value)
            try:
                predictions = predict(la, val_loader, **evaluation)
            except (RuntimeError, ValueError):  # a singular or non-finite predictive
                continue
            if isinstance(predictions, ClassificationPredictions):
                nll = classification_metrics(predictions, n_bins=n_bins)["nll"]
            else:
                nll = regression_metrics(predictions)["nll"]
            if nll < best_nll:
                best, best_nll = float(value), nll
        if best is None:
            raise RuntimeError(
                "Every prior precision of the grid gave a failed or non-finite "
                "validation predictive; widen prior_grid."
            )
        la.prior_precision = best


def _check_compare_arguments(
    candidates: Sequence[Candidate],
    likelihood: str,
    val_loader: DataLoader | None,
    ood_loader: DataLoader | None,
    prior_tuning: str,
    prior_structure: str,
    prior_grid: Sequence[float],
    pred_type: str,
) -> None:
    if not candidates:
        raise ValueError(
            "No candidates to compare; pass at least one, e.g. 'all_ekfac'."
        )
    names = [c.name for c in candidates]
    if len(set(names)) != len(names):
        raise ValueError(f"Candidates must be distinct, got {names}.")
    if likelihood not in ("classification", "regression"):
        raise ValueError(
            f"Unknown likelihood {likelihood!r}; choose 'classification' or "
            "'regression'."
        )
    if prior_tuning not in PRIOR_TUNINGS:
        raise ValueError(
            f"Unknown prior_tuning {prior_tuning!r}; choose one of {PRIOR_TUNINGS}."
        )
    if prior_structure not in ("scalar", "layerwise"):
        raise ValueError(
            f"Unknown prior_structure {prior_structure!r}; choose 'scalar' or "
            "'layerwise' (a per-parameter prior is not supported by every structure)."
        )
    if prior_tuning == "gridsearch":
        if val_loader is None:
            raise ValueError("prior_tuning='gridsearch' needs val_loader.")
        if prior_structure != "scalar":
            raise ValueError(
                "prior_tuning='gridsearch' tunes a scalar prior; use "
                "prior_structure='scalar' or prior_tuning='marglik'."
            )
        if not prior_grid or any(not (float(p) > 0) for p in prior_grid):
            raise ValueError(
                f"prior_grid must hold positive prior precisions, got {prior_grid!r}."
            )
    if pred_type not in ("glm", "nn"):
        raise ValueError(f"Unknown pred_type {pred_type!r}; choose 'glm' or 'nn'.")
    if ood_loader is not None and likelihood != "classification":
        raise ValueError("ood_loader is only used for classification.")


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
        for X, y in loader:
            output = model(X)
            squared += float(((output - y.reshape(output.shape)) ** 2).sum())
            count += output.numel()
    if count == 0:
        raise ValueError("The training loader is empty.")
    return max(math.sqrt(squared / count), 1e-6)


class _PeakMemory:
    """Growth of the process's peak resident set size (Linux ``/proc``) in a block."""

    def __enter__(self) -> _PeakMemory:
        self.growth_mib: float | None = None
        gc.collect()
        _release_free_heap()
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current RSS
            self._before = _status_kib("VmRSS")
        except OSError:
            self._before = None
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._before is not None:
            peak = _status_kib("VmHWM")
            if peak is not None:
                self.growth_mib = max(peak - self._before, 0) / 1024


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so a later peak counts anew."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _format_cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        magnitude = abs(value)
        if magnitude != 0 and (magnitude >= 1e4 or magnitude < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}" if magnitude < 10 else f"{value:.1f}"
    return str(value)


def _json_safe(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {
            (f"{k:g}" if isinstance(k, float) else str(k)): _json_safe(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
