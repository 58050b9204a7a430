"""How a comparison tunes and evaluates, and on which data: two values.

:class:`EvaluationSettings` says how every candidate's prior precision is tuned
(:mod:`~ekfac_laplace.evaluation.priors`), which predictive is evaluated and over
which priors the trade-off sweep runs; :class:`EvaluationData` holds the loaders.
Both are checked when built, so a bad choice fails before any fit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import DataLoader

from ekfac_laplace.evaluation.candidates import PRIOR_TUNINGS
from ekfac_laplace.evaluation.predictions import LINK_APPROXES, PRED_TYPES

#: Tunings that read the validation set.
VALIDATION_TUNINGS = ("validation", "gridsearch")

PRIOR_STRUCTURES = ("scalar", "layerwise")
DEFAULT_PRIOR_GRID = tuple(10.0 ** (k / 4) for k in range(-16, 17))
#: The priors of the trade-off sweep: decades from 1e-3 to 1e4 (each prior costs
#: a predictive on every set).
DEFAULT_SWEEP_GRID = tuple(10.0**k for k in range(-3, 5))
#: The validation rule's tolerance: a prior's validation NLL may exceed the best by
#: this many nats per example (chosen by ``benchmarks/prior_rules.py``).
DEFAULT_VAL_TOLERANCE = 0.005


@dataclass(frozen=True)
class EvaluationSettings:
    """How every candidate of a comparison is tuned and evaluated.

    Attributes:
        prior_tuning: ``"validation"`` (the default: the widest prior of
            ``prior_grid`` whose validation predictive NLL is within
            ``val_tolerance`` nats per example of the best),
            ``"marglik"`` (Adam on the log prior, laplace-torch's
            ``optimize_prior_precision``), ``"gridsearch"`` (the prior of
            ``prior_grid`` with the lowest validation *predictive* NLL —
            laplace-torch's own grid search scores regression by MSE, which the
            prior does not change) or ``"none"`` (prior precision 1). A candidate
            written ``<spec>@<tuning>`` uses its own.
        prior_structure: ``"scalar"`` or ``"layerwise"`` (marglik only).
        prior_grid: Prior precisions tried by ``"validation"`` and ``"gridsearch"``.
        val_tolerance: How much worse than the best, in nats per example of
            validation NLL, the ``"validation"`` rule's prior may be.
        sweep_grid: Prior precisions at which every Laplace candidate is also
            evaluated (``ComparisonRow.sweep``, the trade-off figure); empty for no
            sweep.
        sweep_candidates: The candidates swept, by name without their
            ``@<tuning>``; every Laplace candidate when ``None``.
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

    prior_tuning: str = "validation"
    prior_structure: str = "scalar"
    prior_grid: Sequence[float] = DEFAULT_PRIOR_GRID
    val_tolerance: float = DEFAULT_VAL_TOLERANCE
    sweep_grid: Sequence[float] = ()
    sweep_candidates: Sequence[str] | None = None
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
        if self.prior_tuning in VALIDATION_TUNINGS:
            if self.prior_structure != "scalar":
                raise ValueError(
                    f"prior_tuning={self.prior_tuning!r} tunes a scalar prior; use "
                    "prior_structure='scalar' or prior_tuning='marglik'."
                )
        for name in ("prior_grid", "sweep_grid"):
            grid = getattr(self, name)
            if any(not (0 < float(p) < math.inf) for p in grid) or (
                name == "prior_grid" and not grid
            ):
                raise ValueError(
                    f"{name} must hold positive finite prior precisions, got {grid!r}."
                )
        if not 0 <= self.val_tolerance < math.inf:
            raise ValueError(
                f"val_tolerance must be a non-negative number of nats, got "
                f"{self.val_tolerance!r}."
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
        val_loader: Validation data; needed for ``"validation"``,
            ``"gridsearch"``, temperature scaling and ``val_*``.
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

    def check(
        self, likelihood: str, settings: EvaluationSettings, tunings: Sequence[str]
    ) -> None:
        """Refuse data that the likelihood or the settings cannot use.

        Args:
            likelihood: ``"classification"`` or ``"regression"``.
            settings: The evaluation settings.
            tunings: Every prior tuning the candidates use.

        Raises:
            ValueError: For a validation tuning without validation data, or OOD
                data with regression.
        """
        for tuning in tunings:
            if tuning in VALIDATION_TUNINGS and self.val_loader is None:
                raise ValueError(
                    f"prior_tuning={tuning!r} needs val_loader (or tune by "
                    "'marglik', which needs no held-out data)."
                )
        if self.ood_loader is not None and likelihood != "classification":
            raise ValueError("ood_loader is only used for classification.")
