r"""Metrics for a predictive distribution: tensors in, Python floats out.

Classification, for predictive probabilities ``p`` of shape ``(N, C)`` and labels
``y`` of shape ``(N,)``, with top-label confidence ``c_n = max_k p_{nk}`` and
prediction ``ŷ_n = argmax_k p_{nk}``:

- accuracy: ``(1/N) Σ_n 1[ŷ_n = y_n]``.
- negative log-likelihood: ``-(1/N) Σ_n log p_{n y_n}`` (probabilities clamped at the
  smallest positive normal number of their dtype, so the value is finite).
- Brier score: ``(1/N) Σ_n Σ_k (p_{nk} - 1[k = y_n])²`` (between 0 and 2).
- expected calibration error (Guo et al., 2017): the examples are binned by
  confidence into bins ``B_b``; with bin accuracy ``acc_b`` and mean confidence
  ``conf_b``, ``ECE = Σ_b (|B_b| / N) |acc_b - conf_b|``. Bins are of equal width on
  ``[0, 1]`` (``binning="width"``) or hold equally many examples
  (``binning="mass"``, the adaptive ECE of Nixon et al., 2019).
- maximum calibration error: ``MCE = max_{b : |B_b| > 0} |acc_b - conf_b|``.
- predictive entropy: ``H_n = -Σ_k p_{nk} log p_{nk}`` in nats, with ``0 log 0 = 0``.
- out-of-distribution (OOD) detection: a score that is higher in-distribution
  (the maximum probability ``c_n``, or ``-H_n``) separates in-distribution
  (positive) from OOD (negative) inputs; we report the area under the ROC curve and
  the false-positive rate on OOD inputs at 95 % true-positive rate.

Regression, for a Gaussian predictive with mean ``μ`` and variance ``σ²`` of ``y``
(observation noise included), all of shape ``(N, K)``:

- Gaussian negative log-likelihood:
  ``(1/N) Σ_n Σ_k [½ log(2π σ²_{nk}) + (y_{nk} - μ_{nk})² / (2 σ²_{nk})]``.
- root-mean-square error: ``sqrt((1/(NK)) Σ_{nk} (y_{nk} - μ_{nk})²)``.
- interval coverage at level ``α``: the fraction of entries inside the central
  interval ``μ ± z σ`` with ``z = Φ⁻¹((1 + α) / 2)``; ``α`` when calibrated.
- regression calibration error (after Kuleshov et al., 2018): the mean over levels
  ``α`` of ``|coverage(α) - α|``.

:func:`predict` runs a fitted laplace-torch ``Laplace`` object (or a plain MAP
network) over a data loader and collects the predictive; :func:`evaluate` adds the
metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Real
from typing import Any

import torch
from laplace.baselaplace import BaseLaplace
from torch import Tensor, nn
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_stat_scores,
)

LIKELIHOODS = ("classification", "regression")
PRED_TYPES = ("glm", "nn")
LINK_APPROXES = ("probit", "mc", "bridge", "bridge_norm")
BINNINGS = ("width", "mass")
OOD_SCORES = ("max_prob", "entropy")
DEFAULT_LEVELS = tuple(round(0.05 * i, 2) for i in range(1, 20))

#: Tolerance on ``0 <= p <= 1`` and on ``Σ_k p_k = 1`` (the sum is 1, so absolute
#: and relative tolerance coincide).
PROB_TOLERANCE = 1e-4


@dataclass
class ClassificationPredictions:
    """Predictive class probabilities and labels of a data set.

    Attributes:
        probs: Predictive class probabilities, shape ``(N, C)``.
        targets: Integer labels in ``[0, C)``, shape ``(N,)``.
    """

    probs: Tensor
    targets: Tensor


@dataclass
class RegressionPredictions:
    """Gaussian predictive mean and variance of a data set, and its targets.

    Attributes:
        mean: Predictive mean, shape ``(N, K)``.
        variance: Predictive variance of ``y`` (observation noise ``σ²`` included),
            shape ``(N, K)``.
        targets: Observed targets, shape ``(N, K)``.
    """

    mean: Tensor
    variance: Tensor
    targets: Tensor


@dataclass
class CalibrationBins:
    """Examples binned by top-label confidence.

    Attributes:
        edges: Bin edges in confidence, shape ``(n_bins + 1,)``.
        confidence: Mean top-label confidence per bin (0 for empty bins), shape
            ``(n_bins,)``.
        accuracy: Accuracy per bin (0 for empty bins), shape ``(n_bins,)``.
        counts: Number of examples per bin (long), shape ``(n_bins,)``.
    """

    edges: Tensor
    confidence: Tensor
    accuracy: Tensor
    counts: Tensor


# ----------------------------------------------------------------- validation
def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"Unknown {name} {value!r}; choose one of {choices}.")


def _check_tensor(name: str, value: object) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    return value


def _check_probs(probs: object, name: str = "probs") -> Tensor:
    probs = _check_tensor(name, probs)
    if probs.ndim != 2 or probs.shape[0] == 0 or probs.shape[1] < 2:
        raise ValueError(
            f"{name} must have shape (N, C) with N >= 1 examples and C >= 2 classes, "
            f"got shape {tuple(probs.shape)}."
        )
    if not probs.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {probs.dtype}.")
    if not torch.isfinite(probs).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    low, high = probs.min().item(), probs.max().item()
    if low < -PROB_TOLERANCE or high > 1 + PROB_TOLERANCE:
        raise ValueError(
            f"{name} must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
            "pass probabilities (apply torch.softmax(logits, dim=-1)), not logits."
        )
    deviation = (probs.sum(dim=1) - 1).abs().max().item()
    if deviation > PROB_TOLERANCE:
        raise ValueError(
            f"The rows of {name} must sum to 1 (tolerance {PROB_TOLERANCE}), but one "
            f"is off by {deviation:.4g}; normalise them, e.g. with "
            "torch.softmax(logits, dim=-1)."
        )
    return probs


def _check_targets(targets: object, probs: Tensor) -> Tensor:
    targets = _check_tensor("targets", targets)
    n_examples, n_classes = probs.shape
    if targets.shape != (n_examples,):
        raise ValueError(
            f"targets must have shape (N,) = ({n_examples},) to match probs of shape "
            f"{tuple(probs.shape)}, got shape {tuple(targets.shape)}."
        )
    if (
        targets.is_floating_point()
        or targets.is_complex()
        or targets.dtype == torch.bool
    ):
        raise ValueError(
            f"targets must be integer class labels, got dtype {targets.dtype}; "
            "convert them with targets.long()."
        )
    low, high = targets.min().item(), targets.max().item()
    if low < 0 or high >= n_classes:
        raise ValueError(
            f"targets must lie in [0, {n_classes - 1}] for {n_classes} classes, got "
            f"labels in [{low}, {high}]."
        )
    return targets.long().to(probs.device)


def _check_classification(probs: object, targets: object) -> tuple[Tensor, Tensor]:
    probs = _check_probs(probs)
    return probs, _check_targets(targets, probs)


def _check_n_bins(n_bins: object) -> int:
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}.")
    return n_bins


def _check_level(level: object, name: str = "level") -> float:
    if isinstance(level, bool) or not isinstance(level, Real) or not 0 < level < 1:
        raise ValueError(f"{name} must be a number in (0, 1), got {level!r}.")
    return float(level)


def _check_scores(name: str, scores: object) -> Tensor:
    scores = _check_tensor(name, scores)
    if scores.ndim != 1 or scores.numel() == 0:
        raise ValueError(
            f"{name} must have shape (N,) with N >= 1, got shape {tuple(scores.shape)}."
        )
    if not torch.isfinite(scores.double()).all():
        raise ValueError(f"{name} contains NaN or infinite values.")
    return scores


def _check_regression(**tensors: object) -> list[Tensor]:
    """Same-shape ``(N,)`` or ``(N, K)`` floating tensors, returned as ``(N, K)``."""
    checked = [_check_tensor(name, value) for name, value in tensors.items()]
    shapes = {name: tuple(value.shape) for name, value in zip(tensors, checked)}
    if len(set(shapes.values())) != 1:
        described = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"Shapes must match, got {described}.")
    shape = checked[0].shape
    if len(shape) not in (1, 2) or shape[0] == 0 or (len(shape) == 2 and not shape[1]):
        raise ValueError(
            f"Regression tensors must have shape (N, K) or (N,) with N, K >= 1, got "
            f"shape {tuple(shape)}."
        )
    for name, value in zip(tensors, checked):
        if not value.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {value.dtype}.")
        if not torch.isfinite(value).all():
            raise ValueError(f"{name} contains NaN or infinite values.")
    if "variance" in tensors:
        variance = checked[list(tensors).index("variance")]
        if (variance <= 0).any():
            raise ValueError(
                f"variance must be positive, got minimum {variance.min().item():.4g}; "
                "add the observation noise σ² to the functional variance."
            )
    return [value.reshape(shape[0], -1) for value in checked]


# ------------------------------------------------------------- classification
def accuracy(probs: Tensor, targets: Tensor) -> float:
    """Fraction of examples whose most probable class is the label.

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.
        targets: Integer labels, shape ``(N,)``.

    Returns:
        The accuracy in ``[0, 1]`` (from torchmetrics' micro-averaged
        ``multiclass_stat_scores``).

    Raises:
        ValueError: If ``probs`` are not probabilities or the shapes disagree.
    """
    probs, targets = _check_classification(probs, targets)
    # Micro-averaged stat scores are counts, [tp, fp, tn, fn, support], so the
    # ratio is exact (torchmetrics' own accuracy is rounded to float32).
    true_positives, *_, support = multiclass_stat_scores(
        probs, targets, num_classes=probs.shape[1], average="micro", top_k=1
    ).tolist()
    return true_positives / support


def negative_log_likelihood(probs: Tensor, targets: Tensor) -> float:
    """Mean negative log predictive probability of the labels, ``-mean log p(y)``.

    Args:
        probs: Predictive probabilities, shape ``(N, C)``; clamped at
            ``torch.finfo(probs.dtype).tiny`` so the result is finite.
        targets: Integer labels, shape ``(N,)``.

    Returns:
        The mean NLL in nats.

    Raises:
        ValueError: If ``probs`` are not probabilities or the shapes disagree.
    """
    probs, targets = _check_classification(probs, targets)
    label_probs = probs.gather(1, targets[:, None]).squeeze(1)
    tiny = torch.finfo(probs.dtype).tiny
    return float(-label_probs.clamp_min(tiny).log().mean())


def brier_score(probs: Tensor, targets: Tensor) -> float:
    """Mean over examples of ``Σ_c (p_c - 1[c = y])²``.

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.
        targets: Integer labels, shape ``(N,)``.

    Returns:
        The Brier score in ``[0, 2]``.

    Raises:
        ValueError: If ``probs`` are not probabilities or the shapes disagree.
    """
    probs, targets = _check_classification(probs, targets)
    one_hot = torch.nn.functional.one_hot(targets, probs.shape[1]).to(probs.dtype)
    return float((probs - one_hot).square().sum(dim=1).mean())


def calibration_bins(
    probs: Tensor, targets: Tensor, n_bins: int = 15, binning: str = "width"
) -> CalibrationBins:
    """Bin the examples by top-label confidence.

    ``binning="width"``: ``n_bins`` bins of equal width on ``[0, 1]``, closed on the
    left and open on the right, ``[e_b, e_{b+1})``, as torchmetrics bins them; the
    last bin is closed, so a confidence of exactly 1 falls into it (torchmetrics
    instead gives it an extra bin of its own).

    ``binning="mass"`` (adaptive): the examples, sorted by confidence (stably), are
    split into ``n_bins`` contiguous groups whose sizes differ by at most one; the
    outer edges are 0 and 1, the inner ones the midpoints between neighbouring
    groups (examples tied at a boundary are split by their order).

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.
        targets: Integer labels, shape ``(N,)``.
        n_bins: Number of bins (for ``"mass"`` at most ``N``).
        binning: ``"width"`` or ``"mass"``.

    Returns:
        Edges, mean confidence, accuracy and counts per bin.

    Raises:
        ValueError: For an unknown ``binning``, a bad ``n_bins``, or bad inputs.
    """
    _check_choice("binning", binning, BINNINGS)
    n_bins = _check_n_bins(n_bins)
    probs, targets = _check_classification(probs, targets)
    confidence, prediction = probs.max(dim=1)
    correct = (prediction == targets).to(probs.dtype)
    n_examples = confidence.numel()
    if binning == "width":
        edges = torch.linspace(0, 1, n_bins + 1, dtype=probs.dtype, device=probs.device)
        index = torch.bucketize(confidence, edges, right=True) - 1
        index = index.clamp(0, n_bins - 1)
    else:
        if n_examples < n_bins:
            raise ValueError(
                f"Equal-mass binning needs at least n_bins examples, got N="
                f"{n_examples} and n_bins={n_bins}; lower n_bins."
            )
        sorted_confidence, order = torch.sort(confidence, stable=True)
        sizes = [
            n_examples // n_bins + (b < n_examples % n_bins) for b in range(n_bins)
        ]
        index = torch.empty_like(order)
        index[order] = torch.repeat_interleave(
            torch.arange(n_bins, device=probs.device),
            torch.as_tensor(sizes, device=probs.device),
        )
        starts = torch.as_tensor(sizes[:-1], device=probs.device).cumsum(0)
        inner = (sorted_confidence[starts - 1] + sorted_confidence[starts]) / 2
        edges = torch.cat([inner.new_zeros(1), inner, inner.new_ones(1)])
    counts = torch.bincount(index, minlength=n_bins)
    safe_counts = counts.clamp_min(1).to(probs.dtype)
    confidence_sum = probs.new_zeros(n_bins).index_add_(0, index, confidence)
    correct_sum = probs.new_zeros(n_bins).index_add_(0, index, correct)
    return CalibrationBins(
        edges=edges,
        confidence=confidence_sum / safe_counts,
        accuracy=correct_sum / safe_counts,
        counts=counts,
    )


def expected_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15, binning: str = "width"
) -> float:
    """Expected calibration error ``Σ_b (|B_b| / N) |acc_b - conf_b|``.

    Computed from :func:`calibration_bins`, so it is the number a reliability
    diagram shows. For ``binning="width"`` it equals torchmetrics'
    ``multiclass_calibration_error(norm="l1")`` up to float32 rounding, except when
    a confidence is exactly 1 (see :func:`calibration_bins`).

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.
        targets: Integer labels, shape ``(N,)``.
        n_bins: Number of bins.
        binning: ``"width"`` (equal width) or ``"mass"`` (equal mass, adaptive ECE).

    Returns:
        The ECE in ``[0, 1]``.

    Raises:
        ValueError: For an unknown ``binning``, a bad ``n_bins``, or bad inputs.
    """
    bins = calibration_bins(probs, targets, n_bins=n_bins, binning=binning)
    weights = bins.counts.to(bins.accuracy.dtype) / bins.counts.sum()
    return float((weights * (bins.accuracy - bins.confidence).abs()).sum())


def maximum_calibration_error(
    probs: Tensor, targets: Tensor, n_bins: int = 15, binning: str = "width"
) -> float:
    """Maximum calibration error ``max_{b : |B_b| > 0} |acc_b - conf_b|``.

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.
        targets: Integer labels, shape ``(N,)``.
        n_bins: Number of bins.
        binning: ``"width"`` or ``"mass"``.

    Returns:
        The MCE in ``[0, 1]`` (torchmetrics' ``norm="max"`` for ``"width"``).

    Raises:
        ValueError: For an unknown ``binning``, a bad ``n_bins``, or bad inputs.
    """
    bins = calibration_bins(probs, targets, n_bins=n_bins, binning=binning)
    gaps = (bins.accuracy - bins.confidence).abs()[bins.counts > 0]
    return float(gaps.max())


def predictive_entropy(probs: Tensor) -> Tensor:
    """Entropy ``-Σ_k p_k log p_k`` of each predictive, in nats (``0 log 0 = 0``).

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.

    Returns:
        Entropies, shape ``(N,)``.

    Raises:
        ValueError: If ``probs`` are not probabilities.
    """
    probs = _check_probs(probs)
    return torch.special.entr(probs.clamp_min(0)).sum(dim=1)


def ood_scores(probs: Tensor, score: str = "max_prob") -> Tensor:
    """In-distribution scores: higher means more in-distribution.

    Args:
        probs: Predictive probabilities, shape ``(N, C)``.
        score: ``"max_prob"`` (``max_k p_k``) or ``"entropy"`` (minus the
            predictive entropy).

    Returns:
        Scores, shape ``(N,)``.

    Raises:
        ValueError: For an unknown ``score`` or if ``probs`` are not probabilities.
    """
    _check_choice("score", score, OOD_SCORES)
    if score == "max_prob":
        return _check_probs(probs).max(dim=1).values
    return -predictive_entropy(probs)


def ood_auroc(scores_in: Tensor, scores_out: Tensor) -> float:
    """Area under the ROC curve of in-distribution (positive) vs. OOD inputs.

    Equals the probability that a random in-distribution score exceeds a random OOD
    score, ties counting one half.

    Args:
        scores_in: Scores of in-distribution inputs (higher = more
            in-distribution), shape ``(N_in,)``.
        scores_out: Scores of OOD inputs, shape ``(N_out,)``.

    Returns:
        The AUROC in ``[0, 1]`` (torchmetrics ``binary_auroc``, which computes in
        float32).

    Raises:
        ValueError: If either set of scores is empty, not 1-D, or not finite.
    """
    scores_in = _check_scores("scores_in", scores_in)
    scores_out = _check_scores("scores_out", scores_out).to(scores_in.device)
    scores = torch.cat([scores_in.double(), scores_out.double()])
    # AUROC depends only on the order of the scores. torchmetrics reads scores
    # outside [0, 1] as logits and squashes them through a sigmoid, which can create
    # ties; dense ranks scaled into [0, 1] keep the order and ties exactly.
    distinct, rank = torch.unique(scores, return_inverse=True)
    ranked = rank.double() / max(distinct.numel() - 1, 1)
    labels = torch.cat(
        [
            torch.ones(scores_in.numel(), dtype=torch.long),
            torch.zeros(scores_out.numel(), dtype=torch.long),
        ]
    ).to(ranked.device)
    return float(binary_auroc(ranked, labels))


def fpr_at_tpr(scores_in: Tensor, scores_out: Tensor, tpr: float = 0.95) -> float:
    """False-positive rate on OOD inputs at a true-positive rate of ``tpr``.

    Inputs with score ``>= t`` are called in-distribution. The threshold ``t`` is
    the largest one whose true-positive rate on ``scores_in`` is at least ``tpr``
    (the first reached when lowering it), i.e. the ``ceil(tpr · N_in)``-th largest
    in-distribution score; the result is the fraction of ``scores_out`` ``>= t``.

    Args:
        scores_in: Scores of in-distribution inputs (higher = more
            in-distribution), shape ``(N_in,)``.
        scores_out: Scores of OOD inputs, shape ``(N_out,)``.
        tpr: Target true-positive rate in ``(0, 1]``.

    Returns:
        The false-positive rate in ``[0, 1]``.

    Raises:
        ValueError: For bad scores or a ``tpr`` outside ``(0, 1]``.
    """
    scores_in = _check_scores("scores_in", scores_in)
    scores_out = _check_scores("scores_out", scores_out).to(scores_in.device)
    if isinstance(tpr, bool) or not isinstance(tpr, Real) or not 0 < tpr <= 1:
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}.")
    n_in = scores_in.numel()
    # Rounding first keeps e.g. 0.7 * 10 = 7.000000000000001 from becoming 8.
    rank = min(max(math.ceil(round(float(tpr) * n_in, 9)), 1), n_in)
    threshold = torch.sort(scores_in.double(), descending=True).values[rank - 1]
    return float((scores_out.double() >= threshold).double().mean())


# ----------------------------------------------------------------- regression
def gaussian_nll(mean: Tensor, variance: Tensor, targets: Tensor) -> float:
    """Gaussian negative log-likelihood, summed over outputs, averaged over examples.

    Args:
        mean: Predictive mean, shape ``(N, K)`` (or ``(N,)``).
        variance: Predictive variance of ``y``, positive, same shape.
        targets: Targets, same shape.

    Returns:
        ``(1/N) Σ_n Σ_k [½ log(2π σ²_{nk}) + (y_{nk} - μ_{nk})² / (2 σ²_{nk})]``.

    Raises:
        ValueError: If the shapes differ or a variance is not positive.
    """
    mean, variance, targets = _check_regression(
        mean=mean, variance=variance, targets=targets
    )
    per_entry = 0.5 * torch.log(2 * math.pi * variance) + (targets - mean).square() / (
        2 * variance
    )
    return float(per_entry.sum(dim=1).mean())


def rmse(mean: Tensor, targets: Tensor) -> float:
    """Root-mean-square error over all ``N · K`` entries.

    Args:
        mean: Predictive mean, shape ``(N, K)`` (or ``(N,)``).
        targets: Targets, same shape.

    Returns:
        ``sqrt(mean((y - μ)²))``.

    Raises:
        ValueError: If the shapes differ.
    """
    mean, targets = _check_regression(mean=mean, targets=targets)
    return float((targets - mean).square().mean().sqrt())


def _coverage(mean: Tensor, variance: Tensor, targets: Tensor, level: float) -> float:
    z = torch.distributions.Normal(0.0, 1.0).icdf(
        torch.tensor((1 + level) / 2, dtype=torch.float64)
    )
    inside = (targets - mean).abs().double() <= z.item() * variance.double().sqrt()
    return float(inside.double().mean())


def interval_coverage(
    mean: Tensor, variance: Tensor, targets: Tensor, level: float
) -> float:
    """Fraction of entries inside the central Gaussian interval of probability level.

    The interval is ``μ ± Φ⁻¹((1 + level) / 2) σ``.

    Args:
        mean: Predictive mean, shape ``(N, K)`` (or ``(N,)``).
        variance: Predictive variance of ``y``, positive, same shape.
        targets: Targets, same shape.
        level: Probability of the interval, in ``(0, 1)``.

    Returns:
        The empirical coverage in ``[0, 1]``.

    Raises:
        ValueError: For bad shapes, a nonpositive variance or a level outside (0, 1).
    """
    level = _check_level(level)
    mean, variance, targets = _check_regression(
        mean=mean, variance=variance, targets=targets
    )
    return _coverage(mean, variance, targets, level)


def _check_levels(levels: Iterable[float] | None) -> tuple[float, ...]:
    levels = DEFAULT_LEVELS if levels is None else tuple(levels)
    if not levels:
        raise ValueError("levels must not be empty; pass e.g. (0.5, 0.9, 0.95).")
    return tuple(_check_level(level, "every level") for level in levels)


def regression_calibration_error(
    mean: Tensor,
    variance: Tensor,
    targets: Tensor,
    levels: Sequence[float] | None = None,
) -> float:
    """Mean absolute miscalibration of the central predictive intervals.

    ``(1/L) Σ_α |coverage(α) - α|`` over the levels ``α``: a calibrated regressor's
    ``α``-intervals hold a fraction ``α`` of the targets (Kuleshov, Fenner and
    Ermon, 2018, "Accurate Uncertainties for Deep Learning Using Calibrated
    Regression", who use one-sided quantiles; we use central intervals).

    Args:
        mean: Predictive mean, shape ``(N, K)`` (or ``(N,)``).
        variance: Predictive variance of ``y``, positive, same shape.
        targets: Targets, same shape.
        levels: Interval probabilities in ``(0, 1)``; default 0.05, 0.10, ..., 0.95.

    Returns:
        The calibration error in ``[0, 1)``.

    Raises:
        ValueError: For bad shapes, a nonpositive variance or a bad level.
    """
    levels = _check_levels(levels)
    mean, variance, targets = _check_regression(
        mean=mean, variance=variance, targets=targets
    )
    errors = [abs(_coverage(mean, variance, targets, a) - a) for a in levels]
    return sum(errors) / len(errors)


# ------------------------------------------------------------------ summaries
def classification_metrics(
    predictions: ClassificationPredictions,
    ood: ClassificationPredictions | None = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """All classification metrics of a predictive, and OOD detection if given.

    Args:
        predictions: In-distribution probabilities ``(N, C)`` and labels ``(N,)``.
        ood: Predictions on OOD inputs (their targets are not used).
        n_bins: Number of bins of the calibration errors.

    Returns:
        ``accuracy``, ``nll``, ``ece`` (equal width), ``ece_adaptive`` (equal
        mass, ``min(n_bins, N)`` bins), ``mce`` (equal width) and ``brier``;
        with ``ood`` also ``ood_auroc_max_prob``, ``ood_fpr95_max_prob``,
        ``ood_auroc_entropy`` and ``ood_fpr95_entropy``.

    Raises:
        ValueError: For bad inputs (see the single metrics).
    """
    probs, targets = predictions.probs, predictions.targets
    metrics = {
        "accuracy": accuracy(probs, targets),
        "nll": negative_log_likelihood(probs, targets),
        "ece": expected_calibration_error(probs, targets, n_bins, "width"),
        "ece_adaptive": expected_calibration_error(
            probs, targets, min(n_bins, probs.shape[0]), "mass"
        ),
        "mce": maximum_calibration_error(probs, targets, n_bins, "width"),
        "brier": brier_score(probs, targets),
    }
    if ood is not None:
        for score in OOD_SCORES:
            scores_in = ood_scores(probs, score)
            scores_out = ood_scores(_check_probs(ood.probs, "ood.probs"), score)
            metrics[f"ood_auroc_{score}"] = ood_auroc(scores_in, scores_out)
            metrics[f"ood_fpr95_{score}"] = fpr_at_tpr(scores_in, scores_out, 0.95)
    return metrics


def _level_name(level: float) -> str:
    return f"coverage_{round(level * 100, 6):g}"


def regression_metrics(
    predictions: RegressionPredictions,
    levels: Sequence[float] = (0.5, 0.9, 0.95),
) -> dict[str, float]:
    """All regression metrics of a Gaussian predictive.

    Args:
        predictions: Predictive mean and variance and targets, each ``(N, K)``.
        levels: Levels of the reported interval coverages.

    Returns:
        ``nll``, ``rmse``, ``coverage_<100·level>`` per level (``coverage_50``,
        ``coverage_90``, ``coverage_95`` by default) and ``calibration_error``
        (over the levels 0.05, ..., 0.95).

    Raises:
        ValueError: For bad shapes, a nonpositive variance or a bad level.
    """
    levels = _check_levels(levels)
    mean, variance, targets = _check_regression(
        mean=predictions.mean,
        variance=predictions.variance,
        targets=predictions.targets,
    )
    metrics = {
        "nll": gaussian_nll(mean, variance, targets),
        "rmse": rmse(mean, targets),
    }
    for level in levels:
        metrics[_level_name(level)] = _coverage(mean, variance, targets, level)
    metrics["calibration_error"] = regression_calibration_error(mean, variance, targets)
    return metrics


# ------------------------------------------------------------------ predicting
def _resolve_likelihood(predictor: object, likelihood: str | None) -> str:
    if isinstance(predictor, BaseLaplace):
        own = str(getattr(predictor.likelihood, "value", predictor.likelihood))
        if own not in LIKELIHOODS:
            raise ValueError(
                f"Only Laplace objects with likelihood in {LIKELIHOODS} can be "
                f"evaluated, got {own!r}."
            )
        if likelihood is not None and likelihood != own:
            raise ValueError(
                f"likelihood={likelihood!r} disagrees with the Laplace object's "
                f"likelihood {own!r}; leave likelihood=None."
            )
        return own
    if isinstance(predictor, nn.Module):
        if likelihood is None:
            raise ValueError(
                "A plain nn.Module needs likelihood='classification' or "
                "'regression' (a Laplace object carries its own)."
            )
        _check_choice("likelihood", likelihood, LIKELIHOODS)
        return likelihood
    raise TypeError(
        "predictor must be a fitted laplace-torch Laplace object or an nn.Module, "
        f"got {type(predictor).__name__}."
    )


def _check_sigma_noise(
    predictor: object, likelihood: str, sigma_noise: float | None
) -> None:
    """A Laplace object has its own σ; a MAP regressor needs one; classifiers none."""
    if isinstance(predictor, BaseLaplace):
        if sigma_noise is not None:
            raise ValueError(
                "sigma_noise is read from the Laplace object (la.sigma_noise); leave "
                f"sigma_noise=None, got {sigma_noise!r}."
            )
        return
    if likelihood == "classification":
        return  # σ plays no role in a classifier's predictive: ignored
    if (
        isinstance(sigma_noise, bool)
        or not isinstance(sigma_noise, Real)
        or not 0 < sigma_noise < math.inf
    ):
        raise ValueError(
            "A plain nn.Module regressor needs the observation noise: pass "
            f"sigma_noise as a float > 0, got {sigma_noise!r}."
        )


def _device(module: nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _to_device(x: Any, device: torch.device) -> Any:
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, Mapping):
        return {
            key: value.to(device) if isinstance(value, Tensor) else value
            for key, value in x.items()
        }
    return x


def _split_batch(batch: Any, key_y: str) -> tuple[Any, Tensor]:
    """``(x, y)`` of a batch; a dict batch is passed whole as ``x``, as laplace does."""
    if isinstance(batch, Mapping):
        if key_y not in batch:
            raise ValueError(
                f"Dict batch has no target key {key_y!r} (keys: {sorted(batch)}); "
                "set dict_key_y on the Laplace object or rename the key."
            )
        return batch, batch[key_y]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise ValueError(
        "Loader batches must be (x, y) tuples/lists or dicts with inputs and "
        f"targets, got {type(batch).__name__}."
    )


def _laplace_forward(
    la: BaseLaplace,
    likelihood: str,
    pred_type: str,
    link_approx: str,
    n_samples: int,
) -> Callable[[Any], Tensor | tuple[Tensor, Tensor]]:
    # laplace-torch's "nn" predictive always averages Monte-Carlo samples.
    link = "mc" if pred_type == "nn" else link_approx

    def forward(x: Any) -> Tensor | tuple[Tensor, Tensor]:
        out = la(x, pred_type=pred_type, link_approx=link, n_samples=n_samples)
        if likelihood == "classification":
            return out
        f_mu, f_var = out
        if f_var.ndim == 3:  # GLM: (B, K, K) output covariance
            f_var = torch.diagonal(f_var, dim1=-2, dim2=-1)
        sigma_noise = torch.as_tensor(la.sigma_noise).detach().to(f_var)
        return f_mu, f_var + sigma_noise.square()

    return forward


def _module_forward(
    model: nn.Module, likelihood: str, sigma_noise: float | None
) -> Callable[[Any], Tensor | tuple[Tensor, Tensor]]:
    def forward(x: Any) -> Tensor | tuple[Tensor, Tensor]:
        out = model(x)
        if likelihood == "classification":
            return torch.softmax(out, dim=-1)
        return out, torch.full_like(out, float(sigma_noise) ** 2)

    return forward


def predict(
    predictor: BaseLaplace | nn.Module,
    loader: Iterable[Any],
    *,
    likelihood: str | None = None,
    pred_type: str = "glm",
    link_approx: str = "probit",
    n_samples: int = 100,
    sigma_noise: float | None = None,
) -> ClassificationPredictions | RegressionPredictions:
    """Collect the predictive of a Laplace object or a MAP network over a loader.

    A fitted laplace-torch ``Laplace`` object (laplace-torch's or
    :class:`~ekfac_laplace.EKFACLaplace` / :class:`~ekfac_laplace.EKFACLLLaplace`)
    is called as ``la(x, pred_type, link_approx, n_samples)``; for regression the
    predictive variance is the diagonal of the functional (co)variance plus
    ``la.sigma_noise²``. A plain ``nn.Module`` is the MAP predictive (in its current
    train/eval mode): softmax of its outputs, or its outputs with variance
    ``sigma_noise²``. Inputs are moved to the device of the model's parameters;
    results are returned on the CPU.

    Args:
        predictor: A fitted Laplace object or a plain network.
        loader: Batches ``(x, y)``, or dicts (Hugging Face style) passed whole to
            the model as laplace-torch does, with targets under ``la.dict_key_y``
            (``"labels"`` for a plain network).
        likelihood: ``"classification"`` or ``"regression"``; required for a plain
            network, read from a Laplace object.
        pred_type: ``"glm"`` or ``"nn"``; ignored for a plain network.
        link_approx: ``"probit"``, ``"mc"``, ``"bridge"`` or ``"bridge_norm"`` for
            GLM classification; ``pred_type="nn"`` always uses ``"mc"``.
        n_samples: Monte-Carlo samples (``"mc"`` link or ``"nn"`` predictive).
        sigma_noise: Observation noise of a plain network regressor (float > 0);
            ignored for classification, and must be ``None`` for a Laplace object.

    Returns:
        Probabilities ``(N, C)`` and labels ``(N,)`` (not range-checked, so an OOD
        set may carry any labels), or mean, variance and targets
        ``(N, K)`` (targets of shape ``(N,)`` become ``(N, 1)``).

    Raises:
        ValueError: For an unknown option, a missing likelihood or sigma_noise, an
            empty loader, bad batches or predictions of the wrong shape.
        TypeError: If ``predictor`` is neither a Laplace object nor a network.
    """
    _check_choice("pred_type", pred_type, PRED_TYPES)
    _check_choice("link_approx", link_approx, LINK_APPROXES)
    likelihood = _resolve_likelihood(predictor, likelihood)
    _check_sigma_noise(predictor, likelihood, sigma_noise)
    min_samples = 2 if (pred_type, likelihood) == ("nn", "regression") else 1
    if isinstance(n_samples, bool) or not isinstance(n_samples, int):
        raise ValueError(f"n_samples must be an integer, got {n_samples!r}.")
    if isinstance(predictor, BaseLaplace) and n_samples < min_samples:
        raise ValueError(
            f"n_samples must be >= {min_samples} for pred_type={pred_type!r} and "
            f"{likelihood}, got {n_samples}."
        )
    if isinstance(predictor, BaseLaplace):
        model = predictor.model
        key_y = predictor.dict_key_y
        forward = _laplace_forward(
            predictor, likelihood, pred_type, link_approx, n_samples
        )
    else:
        model, key_y = predictor, "labels"
        forward = _module_forward(predictor, likelihood, sigma_noise)
    device = _device(model)

    outputs: list[tuple[Tensor, ...]] = []
    with torch.no_grad():
        for batch in loader:
            x, y = _split_batch(batch, key_y)
            out = forward(_to_device(x, device))
            out = (out,) if isinstance(out, Tensor) else tuple(out)
            outputs.append(tuple(o.detach().cpu() for o in out) + (y.detach().cpu(),))
    if not outputs:
        raise ValueError("The loader yielded no batches; pass a non-empty loader.")

    if likelihood == "classification":
        # Labels are checked by the metrics, not here: those of an OOD set may lie
        # outside the model's classes.
        probs = _check_probs(torch.cat([_batch_probs(p, y) for p, y in outputs]))
        targets = torch.cat([y.reshape(-1) for _, y in outputs])
        return ClassificationPredictions(probs=probs, targets=targets)
    means, variances, targets = zip(*(_batch_regression(*o) for o in outputs))
    mean, variance, target = _check_regression(
        mean=torch.cat(means), variance=torch.cat(variances), targets=torch.cat(targets)
    )
    return RegressionPredictions(mean=mean, variance=variance, targets=target)


def _batch_probs(probs: Tensor, targets: Tensor) -> Tensor:
    if probs.ndim != 2 or targets.numel() != probs.shape[0]:
        raise ValueError(
            f"Predicted probabilities of shape {tuple(probs.shape)} do not match "
            f"targets of shape {tuple(targets.shape)}; expected (B, C) and (B,)."
        )
    return probs


def _batch_regression(
    mean: Tensor, variance: Tensor, targets: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    batch = targets.shape[0] if targets.ndim else 0
    mean, variance = mean.reshape(batch, -1), variance.reshape(batch, -1)
    targets = targets.reshape(batch, -1).to(mean.dtype)
    if targets.shape != mean.shape:
        raise ValueError(
            f"Predictive mean of shape {tuple(mean.shape)} does not match targets "
            f"of shape {tuple(targets.shape)}; expected (B, K) for both."
        )
    return mean, variance, targets


def evaluate(
    predictor: BaseLaplace | nn.Module,
    loader: Iterable[Any],
    *,
    likelihood: str | None = None,
    pred_type: str = "glm",
    link_approx: str = "probit",
    n_samples: int = 100,
    ood_loader: Iterable[Any] | None = None,
    n_bins: int = 15,
    sigma_noise: float | None = None,
) -> dict[str, float]:
    """Predict over a loader and compute the metrics of :func:`predict`'s result.

    Args:
        predictor: A fitted Laplace object or a plain network.
        loader: In-distribution test batches (see :func:`predict`).
        likelihood: Required for a plain network.
        pred_type: ``"glm"`` or ``"nn"``.
        link_approx: Link approximation for GLM classification.
        n_samples: Monte-Carlo samples.
        ood_loader: Out-of-distribution batches (classification only).
        n_bins: Number of bins of the calibration errors.
        sigma_noise: Observation noise of a plain network regressor.

    Returns:
        :func:`classification_metrics` (with OOD keys when ``ood_loader`` is given)
        or :func:`regression_metrics`.

    Raises:
        ValueError: As :func:`predict`, and for ``ood_loader`` with regression.
    """
    resolved = _resolve_likelihood(predictor, likelihood)
    if ood_loader is not None and resolved == "regression":
        raise ValueError(
            "ood_loader is only supported for classification; drop it for regression."
        )
    _check_n_bins(n_bins)
    options = {
        "likelihood": likelihood,
        "pred_type": pred_type,
        "link_approx": link_approx,
        "n_samples": n_samples,
        "sigma_noise": sigma_noise,
    }
    predictions = predict(predictor, loader, **options)
    if isinstance(predictions, RegressionPredictions):
        return regression_metrics(predictions)
    ood = None if ood_loader is None else predict(predictor, ood_loader, **options)
    return classification_metrics(predictions, ood=ood, n_bins=n_bins)
