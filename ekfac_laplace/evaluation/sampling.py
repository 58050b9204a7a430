r"""Posterior samples checked against the analytic posterior.

Samples ``θ = θ* + Q diag((λ+δ)^{-1/2}) z`` of a Gaussian posterior should have the
posterior mean and the marginal variances ``diag(P⁻¹)``. For ``S`` Gaussian samples
the relative error of a sample variance, ``s²/σ² − 1``, has standard deviation
``sqrt(2/(S−1))``, so the median of its absolute value over many parameters is
``0.6745·sqrt(2/(S−1))``: :func:`check_samples` reports the observed median beside
that expectation, and the error of the sample mean in posterior standard deviations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from laplace.baselaplace import BaseLaplace
from torch import Tensor

#: The median of ``|N(0, 1)|``, ``Φ⁻¹(3/4)``.
HALF_NORMAL_MEDIAN = 0.6745


@dataclass
class SampleCheck:
    """Posterior samples against the analytic posterior.

    Attributes:
        n_samples: Number of samples ``S``.
        analytic_variance: Posterior marginal variances, shape ``(P,)``.
        sample_variance: Variances of the samples, shape ``(P,)`` (NaN for one
            sample).
        median_relative_error: Median over parameters of ``|s²/σ² − 1|`` (NaN for
            one sample).
        expected_median_relative_error: Its Monte-Carlo expectation,
            ``0.6745·sqrt(2/(S−1))`` (``None`` for one sample).
        mean_error_in_std: Mean over parameters of ``|mean(θ) − θ*| / σ``.
    """

    n_samples: int
    analytic_variance: Tensor
    sample_variance: Tensor
    median_relative_error: float
    expected_median_relative_error: float | None
    mean_error_in_std: float


def check_samples(la: BaseLaplace, samples: Tensor) -> SampleCheck:
    """Compare posterior samples with a Laplace object's analytic posterior.

    Args:
        la: A fitted Laplace object with ``mean`` and ``posterior_variance``.
        samples: Its samples, shape ``(S, P)``.

    Returns:
        The check.

    Raises:
        ValueError: If the samples do not have ``P`` columns.
    """
    if samples.ndim != 2 or samples.shape[1] != la.n_params:
        raise ValueError(
            f"samples must have shape (S, {la.n_params}), got {tuple(samples.shape)}."
        )
    n_samples = samples.shape[0]
    analytic = la.posterior_variance.detach()
    if n_samples > 1:
        sample_variance = samples.var(0)
    else:  # one sample has no variance
        sample_variance = torch.full_like(analytic, float("nan"))
    relative = (sample_variance / analytic - 1).abs()
    mean_error = (samples.mean(0) - la.mean).abs() / analytic.sqrt()
    expected = None
    if n_samples > 1:
        expected = HALF_NORMAL_MEDIAN * math.sqrt(2 / (n_samples - 1))
    return SampleCheck(
        n_samples=n_samples,
        analytic_variance=analytic,
        sample_variance=sample_variance,
        median_relative_error=float(relative.median()),
        expected_median_relative_error=expected,
        mean_error_in_std=float(mean_error.mean()),
    )
