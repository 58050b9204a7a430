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

:func:`metrics_of` is the one place that picks the metrics of a predictive by its
kind (classification or regression).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Real

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_auroc,
    multiclass_stat_scores,
)

from ekfac_laplace.evaluation.checks import (
    check_choice,
    check_classification,
    check_level,
    check_levels,
    check_n_bins,
    check_probs,
    check_regression,
    check_scores,
)

BINNINGS = ("width", "mass")
OOD_SCORES = ("max_prob", "entropy")


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
    probs, targets = check_classification(probs, targets)
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
    probs, targets = check_classification(probs, targets)
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
    probs, targets = check_classification(probs, targets)
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
    check_choice("binning", binning, BINNINGS)
    n_bins = check_n_bins(n_bins)
    probs, targets = check_classification(probs, targets)
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
    probs = check_probs(probs)
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
    check_choice("score", score, OOD_SCORES)
    if score == "max_prob":
        return check_probs(probs).max(dim=1).values
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
    scores_in = check_scores("scores_in", scores_in)
    scores_out = check_scores("scores_out", scores_out).to(scores_in.device)
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
    scores_in = check_scores("scores_in", scores_in)
    scores_out = check_scores("scores_out", scores_out).to(scores_in.device)
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
    mean, variance, targets = check_regression(
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
    mean, targets = check_regression(mean=mean, targets=targets)
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
    level = check_level(level)
    mean, variance, targets = check_regression(
        mean=mean, variance=variance, targets=targets
    )
    return _coverage(mean, variance, targets, level)


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
    levels = check_levels(levels)
    mean, variance, targets = check_regression(
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
            scores_out = ood_scores(check_probs(ood.probs, "ood.probs"), score)
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
    levels = check_levels(levels)
    mean, variance, targets = check_regression(
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


Predictions = ClassificationPredictions | RegressionPredictions


def metrics_of(
    predictions: Predictions,
    ood: ClassificationPredictions | None = None,
    n_bins: int = 15,
) -> dict[str, float]:
    """The metrics of a predictive, chosen by its kind.

    Args:
        predictions: Classification or regression predictions.
        ood: Predictions on OOD inputs (classification only).
        n_bins: Number of bins of the calibration errors (classification).

    Returns:
        :func:`classification_metrics` or :func:`regression_metrics`.

    Raises:
        ValueError: For OOD predictions with regression, or bad inputs.
    """
    if isinstance(predictions, ClassificationPredictions):
        return classification_metrics(predictions, ood, n_bins=n_bins)
    if ood is not None:
        raise ValueError(
            "ood_loader is only supported for classification; drop it for regression."
        )
    return regression_metrics(predictions)
