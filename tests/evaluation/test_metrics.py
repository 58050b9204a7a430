"""Calibration metrics against hand-computed values, torchmetrics and theory."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    binary_roc,
    multiclass_accuracy,
    multiclass_calibration_error,
)

from ekfac_laplace.evaluation.metrics import (
    CalibrationBins,
    ClassificationPredictions,
    RegressionPredictions,
    accuracy,
    brier_score,
    calibration_bins,
    classification_metrics,
    expected_calibration_error,
    fpr_at_tpr,
    gaussian_nll,
    interval_coverage,
    maximum_calibration_error,
    metrics_of,
    negative_log_likelihood,
    ood_auroc,
    ood_scores,
    predictive_entropy,
    regression_calibration_error,
    regression_metrics,
    rmse,
)
from tests.evaluation.expected import (
    CLASSIFICATION_KEYS,
    OOD_KEYS,
    REGRESSION_KEYS,
)

F64 = torch.float64


@pytest.fixture
def hand_case() -> tuple[Tensor, Tensor]:
    """Five examples, three classes; confidence, prediction and hit per row.

    row  probs              label  conf  pred  correct
    1    (0.70 0.20 0.10)   0      0.7   0     yes
    2    (0.20 0.50 0.30)   2      0.5   1     no
    3    (0.10 0.10 0.80)   2      0.8   2     yes
    4    (0.60 0.30 0.10)   1      0.6   0     no
    5    (0.25 0.35 0.40)   2      0.4   2     yes
    """
    probs = torch.tensor(
        [
            [0.70, 0.20, 0.10],
            [0.20, 0.50, 0.30],
            [0.10, 0.10, 0.80],
            [0.60, 0.30, 0.10],
            [0.25, 0.35, 0.40],
        ],
        dtype=F64,
    )
    return probs, torch.tensor([0, 2, 2, 1, 2])


def _calibrated(n: int, n_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Labels drawn from the predicted probabilities: perfectly calibrated."""
    generator = torch.Generator().manual_seed(seed)
    logits = 2 * torch.randn(n, n_classes, generator=generator, dtype=F64)
    probs = logits.softmax(dim=1)
    targets = torch.multinomial(probs, 1, generator=generator).squeeze(1)
    return probs, targets


# --------------------------------------------------------- hand-computed values
def test_accuracy_hand(hand_case):
    probs, targets = hand_case
    assert accuracy(probs, targets) == 3 / 5  # rows 1, 3, 5 are right
    reference = multiclass_accuracy(probs, targets, 3, average="micro")
    assert accuracy(probs, targets) == pytest.approx(reference.item(), abs=1e-7)


def test_negative_log_likelihood_hand(hand_case):
    probs, targets = hand_case
    # -(log .7 + log .3 + log .8 + log .3 + log .4) / 5
    #   = (0.356675 + 1.203973 + 0.223144 + 1.203973 + 0.916291) / 5 = 0.780811
    expected = -sum(math.log(p) for p in (0.7, 0.3, 0.8, 0.3, 0.4)) / 5
    assert expected == pytest.approx(0.780811, abs=1e-6)
    assert negative_log_likelihood(probs, targets) == pytest.approx(expected, abs=1e-14)


def test_negative_log_likelihood_is_finite_for_zero_probability():
    probs = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=F64)
    value = negative_log_likelihood(probs, torch.tensor([1, 0]))
    tiny = torch.finfo(F64).tiny
    assert value == pytest.approx((-math.log(tiny) + math.log(2)) / 2)


def test_brier_score_hand(hand_case):
    probs, targets = hand_case
    # row 1: .3² + .2² + .1² = .14     row 2: .2² + .5² + .7² = .78
    # row 3: .1² + .1² + .2² = .06     row 4: .6² + .7² + .1² = .86
    # row 5: .25² + .35² + .6² = .545  mean: 2.385 / 5 = .477
    assert brier_score(probs, targets) == pytest.approx(0.477, abs=1e-12)


def test_width_bins_hand(hand_case):
    probs, targets = hand_case
    # Edges 0, .25, .5, .75, 1; bins [a, b), so conf .5 lies in [.5, .75).
    # [.25,.5): {.4 hit}          conf .4, acc 1
    # [.5,.75): {.7 hit, .5, .6}  conf .6, acc 1/3
    # [.75, 1]: {.8 hit}          conf .8, acc 1
    bins = calibration_bins(probs, targets, n_bins=4)
    assert isinstance(bins, CalibrationBins)
    torch.testing.assert_close(
        bins.edges, torch.tensor([0, 0.25, 0.5, 0.75, 1], dtype=F64)
    )
    assert bins.counts.tolist() == [0, 1, 3, 1]
    assert bins.counts.dtype == torch.long
    torch.testing.assert_close(
        bins.confidence, torch.tensor([0, 0.4, 0.6, 0.8], dtype=F64)
    )
    torch.testing.assert_close(bins.accuracy, torch.tensor([0, 1, 1 / 3, 1], dtype=F64))
    # ECE = (1·|1 - .4| + 3·|1/3 - .6| + 1·|1 - .8|) / 5 = (.6 + .8 + .2) / 5 = .32
    assert expected_calibration_error(probs, targets, n_bins=4) == pytest.approx(0.32)
    # MCE = max(.6, .2667, .2) = .6
    assert maximum_calibration_error(probs, targets, n_bins=4) == pytest.approx(0.6)


def test_mass_bins_hand(hand_case):
    probs, targets = hand_case
    # Sorted confidences .4 (hit) .5 .6 | .7 (hit) .8 (hit): sizes 3 and 2,
    # inner edge (.6 + .7) / 2 = .65.
    # bin 1: conf .5, acc 1/3, gap 1/6;  bin 2: conf .75, acc 1, gap .25
    bins = calibration_bins(probs, targets, n_bins=2, binning="mass")
    torch.testing.assert_close(bins.edges, torch.tensor([0, 0.65, 1], dtype=F64))
    assert bins.counts.tolist() == [3, 2]
    torch.testing.assert_close(bins.confidence, torch.tensor([0.5, 0.75], dtype=F64))
    torch.testing.assert_close(bins.accuracy, torch.tensor([1 / 3, 1], dtype=F64))
    # ECE = 3/5 · 1/6 + 2/5 · 1/4 = .1 + .1 = .2;  MCE = .25
    ece = expected_calibration_error(probs, targets, n_bins=2, binning="mass")
    assert ece == pytest.approx(0.2)
    mce = maximum_calibration_error(probs, targets, n_bins=2, binning="mass")
    assert mce == pytest.approx(0.25)


def test_confidence_one_goes_into_last_bin():
    probs = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.3, 0.7]], dtype=F64)
    bins = calibration_bins(probs, torch.tensor([0, 1, 1]), n_bins=2)
    # [.5, 1]: confidences 1 (hit), .9 (miss), .7 (hit)
    assert bins.counts.tolist() == [0, 3]
    assert bins.confidence[1].item() == pytest.approx((1 + 0.9 + 0.7) / 3)
    assert bins.accuracy[1].item() == pytest.approx(2 / 3)


def test_predictive_entropy_hand():
    probs = torch.tensor(
        [[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [1 / 3, 1 / 3, 1 / 3]], dtype=F64
    )
    # ln 2 (0 log 0 = 0), 0, ln 3
    expected = torch.tensor([math.log(2), 0.0, math.log(3)], dtype=F64)
    torch.testing.assert_close(predictive_entropy(probs), expected)


def test_ood_scores_hand():
    probs = torch.tensor([[0.5, 0.5, 0.0], [0.2, 0.8, 0.0]], dtype=F64)
    torch.testing.assert_close(
        ood_scores(probs, "max_prob"), torch.tensor([0.5, 0.8], dtype=F64)
    )
    # -H = Σ p log p: 2 · .5 log .5 and .2 log .2 + .8 log .8
    expected = torch.tensor(
        [math.log(0.5), 0.2 * math.log(0.2) + 0.8 * math.log(0.8)], dtype=F64
    )
    torch.testing.assert_close(ood_scores(probs, "entropy"), expected)


def test_ood_auroc_hand():
    scores_in = torch.tensor([0.9, 0.8, 0.4], dtype=F64)
    scores_out = torch.tensor([0.5, 0.3], dtype=F64)
    # pairs (in > out): .9 beats 2, .8 beats 2, .4 beats 1 -> 5 of 6
    assert ood_auroc(scores_in, scores_out) == pytest.approx(5 / 6)
    # with a tie: (.5, .5) counts 1/2, the other three pairs 1 -> 3.5 / 4
    tied = ood_auroc(torch.tensor([0.5, 0.9]), torch.tensor([0.5, 0.1]))
    assert tied == pytest.approx(0.875)


def test_ood_auroc_separated_identical_and_unbounded_scores():
    scores = torch.rand(50, dtype=F64)
    assert ood_auroc(scores + 2, scores) == 1.0
    assert ood_auroc(scores, scores + 2) == 0.0
    assert ood_auroc(torch.full((7,), 0.3), torch.full((5,), 0.3)) == 0.5
    # Scores outside [0, 1] whose sigmoid saturates in float32 keep their order.
    assert ood_auroc(torch.tensor([50.0, 60.0]), torch.tensor([40.0, 45.0])) == 1.0


def test_fpr_at_tpr_hand():
    scores_in = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
    scores_out = torch.tensor([0.25, 0.15, 0.5, 0.01])
    # tpr .8: the 8th largest in-score is .2; out-scores >= .2: .25, .5 -> 2/4
    assert fpr_at_tpr(scores_in, scores_out, tpr=0.8) == 0.5
    # tpr .95: ceil(9.5) = 10th largest, .05; .25, .15, .5 are >= .05 -> 3/4
    assert fpr_at_tpr(scores_in, scores_out) == 0.75
    # tpr .7: 0.7 · 10 = 7.000000000000001 in floating point, still the 7th (.3)
    assert fpr_at_tpr(scores_in, scores_out, tpr=0.7) == 0.25
    assert fpr_at_tpr(scores_in, scores_out, tpr=1.0) == 0.75


def test_fpr_at_tpr_matches_torchmetrics_roc():
    generator = torch.Generator().manual_seed(3)
    scores_in = torch.randn(101, generator=generator, dtype=F64).sigmoid()
    scores_out = (torch.randn(80, generator=generator, dtype=F64) - 1).sigmoid()
    labels = torch.cat([torch.ones(101), torch.zeros(80)]).long()
    fpr, tpr, _ = binary_roc(torch.cat([scores_in, scores_out]), labels)
    reference = fpr[tpr >= 0.95].min().item()  # 96/101 = .9505 is the first >= .95
    assert fpr_at_tpr(scores_in, scores_out) == pytest.approx(reference, abs=1e-7)


def test_gaussian_nll_hand():
    mean = torch.tensor([[0.0], [1.0]], dtype=F64)
    variance = torch.tensor([[1.0], [4.0]], dtype=F64)
    targets = torch.tensor([[1.0], [1.0]], dtype=F64)
    # example 1: ½ log 2π + 1/2;  example 2: ½ log 8π + 0;  mean over N = 2
    expected = (0.5 * math.log(2 * math.pi) + 0.5 + 0.5 * math.log(8 * math.pi)) / 2
    assert gaussian_nll(mean, variance, targets) == pytest.approx(expected, abs=1e-14)
    # the same entries as K = 2 outputs of one example are summed, not averaged
    assert gaussian_nll(mean.T, variance.T, targets.T) == pytest.approx(2 * expected)
    # (N,) is read as (N, 1)
    assert gaussian_nll(mean[:, 0], variance[:, 0], targets[:, 0]) == pytest.approx(
        expected
    )


def test_gaussian_nll_equals_normal_log_prob():
    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(30, 3, generator=generator, dtype=F64)
    variance = torch.rand(30, 3, generator=generator, dtype=F64) + 0.1
    targets = torch.randn(30, 3, generator=generator, dtype=F64)
    log_prob = torch.distributions.Normal(mean, variance.sqrt()).log_prob(targets)
    expected = -log_prob.sum(dim=1).mean().item()
    assert gaussian_nll(mean, variance, targets) == pytest.approx(expected, abs=1e-12)


def test_rmse_hand():
    mean = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=F64)
    targets = torch.tensor([[3.0, 0.0], [1.0, 5.0]], dtype=F64)
    # squared errors 9, 0, 0, 16 -> sqrt(25 / 4) = 2.5
    assert rmse(mean, targets) == 2.5


def test_interval_coverage_and_calibration_error_hand():
    mean = torch.zeros(4, 1, dtype=F64)
    variance = torch.ones(4, 1, dtype=F64)
    targets = torch.tensor([[0.1], [-0.5], [0.7], [-2.0]], dtype=F64)
    # z(.5) = 0.674: .1 and .5 inside -> 1/2;  z(.9) = 1.645: all but 2.0 -> 3/4
    assert interval_coverage(mean, variance, targets, 0.5) == 0.5
    assert interval_coverage(mean, variance, targets, 0.9) == 0.75
    assert interval_coverage(mean, variance, targets, 0.95) == 0.75  # z = 1.96
    # (|.5 - .5| + |.75 - .9|) / 2 = .075
    error = regression_calibration_error(mean, variance, targets, levels=(0.5, 0.9))
    assert error == pytest.approx(0.075)


# ------------------------------------------------- torchmetrics, theory, MC error
@pytest.mark.parametrize("n_bins", [1, 5, 15])
@pytest.mark.parametrize("seed", [0, 1])
def test_width_bins_agree_with_torchmetrics(n_bins, seed):
    probs, _ = _calibrated(400, 4, seed)
    targets = torch.randint(0, 4, (400,), generator=torch.Generator().manual_seed(9))
    for norm, ours in (
        ("l1", expected_calibration_error),
        ("max", maximum_calibration_error),
    ):
        reference = multiclass_calibration_error(probs, targets, 4, n_bins, norm=norm)
        # torchmetrics casts confidences to float32
        assert ours(probs, targets, n_bins) == pytest.approx(reference.item(), abs=1e-6)


def test_mass_bins_hold_equal_counts():
    probs, targets = _calibrated(150, 3, 0)
    bins = calibration_bins(probs, targets, n_bins=15, binning="mass")
    assert bins.counts.tolist() == [10] * 15
    counts = calibration_bins(probs[:100], targets[:100], 7, "mass").counts
    assert counts.sum() == 100 and counts.max() - counts.min() <= 1
    assert bins.edges[0] == 0 and bins.edges[-1] == 1
    assert (bins.edges.diff() >= 0).all()
    confidence = probs.max(dim=1).values
    inner = bins.edges[1:-1]
    assert ((confidence[:, None] < inner).sum(0) == bins.counts.cumsum(0)[:-1]).all()


@pytest.mark.parametrize("binning", ["width", "mass"])
def test_ece_of_calibrated_data_is_small(binning):
    n, n_bins = 20_000, 15
    probs, targets = _calibrated(n, 3, 5)
    # E|acc_b - conf_b| <= 1 / (2 sqrt(n_b)), so E[ECE] <= ½ sqrt(n_bins / N) = .014
    bound = 0.5 * math.sqrt(n_bins / n)
    ece = expected_calibration_error(probs, targets, n_bins, binning)
    assert ece < 3 * bound
    # sharpening the same probabilities makes them overconfident
    sharp = (probs.log() * 3).softmax(dim=1)
    assert expected_calibration_error(sharp, targets, n_bins, binning) > 10 * bound


def test_coverage_of_gaussian_data_is_level():
    generator = torch.Generator().manual_seed(2)
    n, k = 10_000, 2
    mean = torch.randn(n, k, generator=generator, dtype=F64)
    variance = torch.randn(n, k, generator=generator, dtype=F64).exp()
    targets = mean + variance.sqrt() * torch.randn(n, k, generator=generator, dtype=F64)
    for level in (0.1, 0.5, 0.9, 0.95):
        mc_error = math.sqrt(level * (1 - level) / (n * k))
        coverage = interval_coverage(mean, variance, targets, level)
        assert abs(coverage - level) < 4 * mc_error
    assert regression_calibration_error(mean, variance, targets) < 0.01
    # halving the variance makes the intervals too narrow
    assert regression_calibration_error(mean, variance / 4, targets) > 0.1


# -------------------------------------------------------------- summary dicts
def test_classification_metrics(hand_case):
    probs, targets = hand_case
    metrics = classification_metrics(
        ClassificationPredictions(probs, targets), n_bins=4
    )
    assert set(metrics) == CLASSIFICATION_KEYS
    assert metrics["accuracy"] == 0.6
    assert metrics["ece"] == pytest.approx(0.32)
    assert metrics["mce"] == pytest.approx(0.6)
    assert metrics["brier"] == pytest.approx(0.477)
    # ece_adaptive uses min(n_bins, N) bins
    assert metrics["ece_adaptive"] == pytest.approx(
        expected_calibration_error(probs, targets, 4, "mass")
    )
    ood = ClassificationPredictions(torch.full((3, 3), 1 / 3, dtype=F64), targets[:3])
    with_ood = classification_metrics(ClassificationPredictions(probs, targets), ood)
    assert set(with_ood) == CLASSIFICATION_KEYS | OOD_KEYS
    # every in-distribution input is more confident than the uniform OOD ones
    assert with_ood["ood_auroc_max_prob"] == 1.0
    assert with_ood["ood_auroc_entropy"] == 1.0
    assert with_ood["ood_fpr95_max_prob"] == 0.0


def test_regression_metrics():
    mean = torch.zeros(4, 1, dtype=F64)
    targets = torch.tensor([[0.1], [-0.5], [0.7], [-2.0]], dtype=F64)
    predictions = RegressionPredictions(mean, torch.ones(4, 1, dtype=F64), targets)
    metrics = regression_metrics(predictions)
    assert set(metrics) == REGRESSION_KEYS
    assert metrics["coverage_50"] == 0.5 and metrics["coverage_90"] == 0.75
    assert metrics["rmse"] == pytest.approx(math.sqrt((0.01 + 0.25 + 0.49 + 4) / 4))
    assert metrics["calibration_error"] == pytest.approx(
        regression_calibration_error(mean, torch.ones_like(mean), targets)
    )
    other = regression_metrics(predictions, levels=(0.25, 0.975))
    assert {"coverage_25", "coverage_97.5"} <= set(other)


# ----------------------------------------------------------------- error paths
def test_probability_errors(hand_case):
    probs, targets = hand_case
    with pytest.raises(ValueError, match=r"apply torch.softmax"):
        accuracy(probs * 4 - 1, targets)
    with pytest.raises(ValueError, match=r"rows of probs must sum to 1.*softmax"):
        brier_score(probs * 0.5, targets)
    with pytest.raises(ValueError, match=r"shape \(N, C\).*got shape \(5,\)"):
        negative_log_likelihood(probs[:, 0], targets)
    with pytest.raises(ValueError, match="NaN or infinite"):
        accuracy(torch.full_like(probs, math.nan), targets)
    with pytest.raises(ValueError, match="floating-point"):
        accuracy(torch.tensor([[1, 0], [0, 1]]), targets[:2])
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        accuracy(probs.tolist(), targets)
    with pytest.raises(ValueError, match="NaN or infinite"):
        predictive_entropy(torch.full_like(probs, math.nan))


def test_target_errors(hand_case):
    probs, targets = hand_case
    with pytest.raises(ValueError, match=r"targets must have shape \(N,\) = \(5,\)"):
        accuracy(probs, targets[:4])
    with pytest.raises(ValueError, match=r"integer class labels.*targets.long\(\)"):
        accuracy(probs, targets.double())
    with pytest.raises(ValueError, match=r"must lie in \[0, 2\].*\[0, 3\]"):
        accuracy(probs, torch.tensor([0, 1, 2, 3, 0]))


def test_binning_errors(hand_case):
    probs, targets = hand_case
    with pytest.raises(
        ValueError, match=r"Unknown binning 'quantile'.*'width', 'mass'"
    ):
        expected_calibration_error(probs, targets, binning="quantile")
    with pytest.raises(ValueError, match="n_bins must be a positive integer, got 0"):
        calibration_bins(probs, targets, n_bins=0)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        maximum_calibration_error(probs, targets, n_bins=2.5)
    with pytest.raises(ValueError, match=r"N=5 and n_bins=6; lower n_bins"):
        calibration_bins(probs, targets, n_bins=6, binning="mass")


def test_ood_errors(hand_case):
    probs, _ = hand_case
    with pytest.raises(ValueError, match=r"Unknown score 'energy'.*'max_prob'"):
        ood_scores(probs, "energy")
    with pytest.raises(ValueError, match=r"scores_out must have shape \(N,\)"):
        ood_auroc(torch.rand(3), torch.rand(0))
    with pytest.raises(ValueError, match=r"scores_in must have shape \(N,\).*\(3, 1\)"):
        fpr_at_tpr(torch.rand(3, 1), torch.rand(2))
    with pytest.raises(ValueError, match="scores_in contains NaN"):
        ood_auroc(torch.tensor([math.nan]), torch.rand(2))
    with pytest.raises(ValueError, match=r"tpr must be a number in \(0, 1\], got 0"):
        fpr_at_tpr(torch.rand(3), torch.rand(2), tpr=0)


def test_regression_errors():
    mean, variance = torch.zeros(4, 2, dtype=F64), torch.ones(4, 2, dtype=F64)
    with pytest.raises(ValueError, match=r"mean \(4, 2\), variance \(4, 2\), targets"):
        gaussian_nll(mean, variance, torch.zeros(4, 1, dtype=F64))
    with pytest.raises(ValueError, match=r"mean \(4, 2\), targets \(4,\)"):
        rmse(mean, torch.zeros(4, dtype=F64))
    with pytest.raises(ValueError, match="variance must be positive, got minimum 0"):
        gaussian_nll(mean, variance * 0, mean)
    with pytest.raises(ValueError, match=r"shape \(N, K\) or \(N,\).*\(4, 2, 1\)"):
        rmse(mean[..., None], mean[..., None])
    with pytest.raises(ValueError, match=r"level must be a number in \(0, 1\), got 1"):
        interval_coverage(mean, variance, mean, 1)
    with pytest.raises(ValueError, match=r"every level must be .*got 95"):
        regression_calibration_error(mean, variance, mean, levels=[0.5, 95])
    with pytest.raises(ValueError, match="levels must not be empty"):
        regression_metrics(RegressionPredictions(mean, variance, mean), levels=())


def test_metrics_of_dispatches_on_the_kind_of_predictions(hand_case):
    probs, targets = hand_case
    classification = ClassificationPredictions(probs, targets)
    assert metrics_of(classification) == classification_metrics(classification)
    mean = torch.zeros(4, 2, dtype=F64)
    regression = RegressionPredictions(mean, torch.ones_like(mean), mean + 0.5)
    assert metrics_of(regression) == regression_metrics(regression)
    with pytest.raises(ValueError, match="only supported for classification"):
        metrics_of(regression, ood=classification)
