"""The outcome of a comparison: one row per candidate, tables, files, a choice.

:class:`ComparisonRow` holds what :func:`~ekfac_laplace.evaluation.compare` measured
for one candidate; :class:`Comparison` holds all rows and writes them as an aligned
text or Markdown table, JSON and CSV; :func:`select` picks a candidate by evidence
or by validation NLL and says why.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from laplace.baselaplace import BaseLaplace
from torch import nn

SELECTION_CRITERIA = ("evidence", "val_nll")


@dataclass
class ComparisonRow:
    """The outcome of one candidate in :func:`compare`.

    Attributes:
        candidate: The candidate's name (its spec).
        subset_of_weights: ``"last_layer"``, ``"all"`` or ``None`` (the MAP and
            its peers).
        hessian_structure: The Hessian structure or ``None`` (MAP).
        backend: ``"ggn"``, ``"mc"``, ``"ef"`` or ``None`` (MAP).
        status: ``"ok"`` or ``"failed"``.
        error: ``"<ExceptionType>: <message>"`` when the candidate failed.
        n_params: Number of parameters treated as random (all for the MAP).
        fit_seconds: Wall time of ``fit``.
        tune_seconds: Wall time of the prior tuning.
        predict_seconds: Wall time of the predictive on every evaluation set.
        sweep_seconds: Wall time of the prior sweep (on the row that ran it).
        fit_memory_mib: Growth of the process's peak resident memory during ``fit``
            over its resident memory before (freed heap is returned to the OS
            first, so earlier candidates do not hide it; ``None`` where ``/proc``
            cannot measure it).
        prior_tuning: How the prior precision was tuned (Laplace rows).
        prior_precision: Tuned prior precision: a float, or one per parameter tensor.
        log_marginal_likelihood: Laplace evidence at the tuned prior.
        temperature: The fitted temperature of ``"map_ts"`` (for regression
            ``σ_val / σ``).
        val: Validation metrics.
        test: Test metrics (with OOD detection when an OOD set was given).
        shift: ``shift[kind][strength]`` metrics on shifted test sets.
        sweep: The prior sweep (:func:`~ekfac_laplace.evaluation.priors.sweep_prior`):
            one flat record per prior precision; empty without one.
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
    sweep_seconds: float | None = None
    fit_memory_mib: float | None = None
    prior_tuning: str | None = None
    prior_precision: float | list[float] | None = None
    log_marginal_likelihood: float | None = None
    temperature: float | None = None
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    shift: dict[str, dict[float, dict[str, float]]] = field(default_factory=dict)
    sweep: list[dict[str, float]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the candidate was fitted and evaluated."""
        return self.status == "ok"

    def shift_means(self) -> dict[str, float]:
        """``shift_nll`` / ``shift_ece`` averaged over every kind of shift.

        Each kind's mean over its strengths (as in :meth:`record`), averaged over
        the kinds: the summary the prior sweep records and the trade-off figure
        draws.

        Returns:
            ``{"shift_<metric>": value}`` for the metrics the shifts have; empty
            without shifts.
        """
        means = {}
        for metric in ("nll", "ece"):
            per_kind = [
                sum(values) / len(values)
                for values in (
                    [v[metric] for v in by_strength.values() if metric in v]
                    for by_strength in self.shift.values()
                )
                if values
            ]
            if per_kind:
                means[f"shift_{metric}"] = sum(per_kind) / len(per_kind)
        return means

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
            "sweep_seconds": self.sweep_seconds,
            "fit_memory_mib": self.fit_memory_mib,
            "prior_tuning": self.prior_tuning,
            "prior_precision": prior,
            "log_marginal_likelihood": self.log_marginal_likelihood,
            "temperature": self.temperature,
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
        lines = [[format_cell(record.get(key)) for key in header] for record in records]
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
        path.write_text(
            json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n"
        )
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
    "prior_tuning",
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
            if row.ok and row.subset_of_weights is not None
        }
        if len(subsets) > 1:
            reason += (
                "; note that last-layer and all-weights evidences treat different "
                "weights as random"
            )
    return Selection(best, by, value, reason + ".")


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def format_cell(value: Any) -> str:
    """A table cell: ``-`` for missing, 4 significant digits, exponent when extreme.

    Args:
        value: A number, a string or ``None``.

    Returns:
        The text of the cell.
    """
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


def json_safe(value: Any) -> Any:
    """``value`` with non-finite floats as ``None`` (JSON has no NaN), recursively.

    Args:
        value: Numbers, strings, mappings and sequences of them.

    Returns:
        The same structure, valid for ``json.dumps(..., allow_nan=False)``.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {
            (f"{k:g}" if isinstance(k, float) else str(k)): json_safe(v)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
