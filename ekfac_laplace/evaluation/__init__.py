"""Evaluating, comparing and choosing Laplace approximations.

The evaluation side of ``ekfac_laplace``; the core (the Laplace classes and their
curvature) imports nothing from here. One concern per module:

- :mod:`~ekfac_laplace.evaluation.checks`: validation of the inputs below;
- :mod:`~ekfac_laplace.evaluation.metrics`: calibration and accuracy metrics;
- :mod:`~ekfac_laplace.evaluation.predictions`: running a predictor over a loader
  (:func:`predict`, :func:`evaluate`);
- :mod:`~ekfac_laplace.evaluation.candidates`: the candidates of a comparison;
- :mod:`~ekfac_laplace.evaluation.settings`: how a comparison tunes and evaluates,
  and on which data;
- :mod:`~ekfac_laplace.evaluation.peers`: temperature scaling, deep ensembles, MC
  dropout — the predictives Laplace is compared with;
- :mod:`~ekfac_laplace.evaluation.priors`: the prior rules (:func:`tune_prior`) and
  the prior sweep;
- :mod:`~ekfac_laplace.evaluation.comparison`: fit, tune, evaluate each
  (:func:`compare`);
- :mod:`~ekfac_laplace.evaluation.report`: its rows, tables, files and
  :func:`select`;
- :mod:`~ekfac_laplace.evaluation.structures`: each tensor's block (diagonal, EKFAC
  or exact) within a memory budget (:func:`select_structures`);
- :mod:`~ekfac_laplace.evaluation.memory`: peak-memory measurement;
- :mod:`~ekfac_laplace.evaluation.sampling`: samples against the analytic posterior;
- :mod:`~ekfac_laplace.evaluation.data`, :mod:`~ekfac_laplace.evaluation.problems`:
  bundled offline data sets (scikit-learn), loaders by name;
- :mod:`~ekfac_laplace.evaluation.models`: reference networks and MAP training;
- :mod:`~ekfac_laplace.evaluation.plotting`,
  :mod:`~ekfac_laplace.evaluation.regression_plots`,
  :mod:`~ekfac_laplace.evaluation.prior_plots`,
  :mod:`~ekfac_laplace.evaluation.figures`: single classification, regression and
  prior trade-off plots (matplotlib) and the figures of a run;
- :mod:`~ekfac_laplace.evaluation.user_inputs`: a user's own model function and
  data file for the command line;
- :mod:`~ekfac_laplace.evaluation.cli`, :mod:`~ekfac_laplace.evaluation.sample_command`,
  :mod:`~ekfac_laplace.evaluation.command_steps`: the ``ekfac-laplace`` command, its
  ``sample`` command, and what both commands share.

Importing this package loads the metrics and the comparison harness; scikit-learn
and matplotlib load with the data, plotting and command-line modules.
"""

from __future__ import annotations

from ekfac_laplace.evaluation.candidates import Candidate
from ekfac_laplace.evaluation.comparison import (
    EvaluationData,
    EvaluationSettings,
    compare,
    residual_noise_scale,
    tune_prior,
)
from ekfac_laplace.evaluation.metrics import (
    ClassificationPredictions,
    RegressionPredictions,
    classification_metrics,
    metrics_of,
    regression_metrics,
)
from ekfac_laplace.evaluation.peers import DeepEnsemble, MCDropout, TemperatureScaled
from ekfac_laplace.evaluation.predictions import evaluate, predict
from ekfac_laplace.evaluation.priors import sweep_prior
from ekfac_laplace.evaluation.report import Comparison, ComparisonRow, Selection, select
from ekfac_laplace.evaluation.structures import StructureSelection, select_structures

__all__ = [
    "Candidate",
    "ClassificationPredictions",
    "Comparison",
    "ComparisonRow",
    "DeepEnsemble",
    "EvaluationData",
    "EvaluationSettings",
    "MCDropout",
    "RegressionPredictions",
    "Selection",
    "StructureSelection",
    "TemperatureScaled",
    "classification_metrics",
    "compare",
    "evaluate",
    "metrics_of",
    "predict",
    "regression_metrics",
    "residual_noise_scale",
    "select",
    "select_structures",
    "sweep_prior",
    "tune_prior",
]
