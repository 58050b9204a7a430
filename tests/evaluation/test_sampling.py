"""Posterior samples against the analytic posterior."""

from __future__ import annotations

import math

import pytest
import torch
from laplace import Laplace

from ekfac_laplace.evaluation.sampling import check_samples
from tests.cases import CASES, loader


def test_check_samples_matches_the_monte_carlo_expectation():
    case = CASES[0]
    model, X, y = case.make()
    la = Laplace(model, case.likelihood, "all", "ekfac", prior_precision=0.5)
    la.fit(loader(X, y))
    samples = la.sample(400, generator=torch.Generator().manual_seed(0))
    check = check_samples(la, samples)
    expected = 0.6745 * math.sqrt(2 / 399)
    assert check.expected_median_relative_error == pytest.approx(expected)
    # 43 parameters: the median of 43 |s²/σ² − 1| is within a factor ~2 of its
    # expectation, and sample means are within a few standard errors.
    assert expected / 2 < check.median_relative_error < 2 * expected
    assert check.mean_error_in_std < 3 / math.sqrt(400)
    torch.testing.assert_close(check.analytic_variance, la.posterior_variance)
    assert check.variance_relative_std == pytest.approx(math.sqrt(2 / 399))
    assert check.expected_mean_error_in_std == pytest.approx(
        math.sqrt(2 / (math.pi * 400))
    )
    assert check.within_monte_carlo_noise()
    one = check_samples(la, samples[:1])
    assert one.expected_median_relative_error is None
    assert math.isnan(one.median_relative_error)
    assert one.variance_relative_std is None
    assert one.within_monte_carlo_noise() is None
    # Samples from a posterior twice as wide are caught.
    wide = check_samples(la, la.mean + 2 * (samples - la.mean))
    assert wide.within_monte_carlo_noise() is False
    with pytest.raises(ValueError, match=r"shape \(S, 43\)"):
        check_samples(la, samples[:, :5])
