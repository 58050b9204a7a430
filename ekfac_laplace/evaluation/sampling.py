r"""Posterior samples checked against the analytic posterior.

Samples ``θ = θ* + Q diag((λ+δ)^{-1/2}) z`` of a Gaussian posterior should have the
posterior mean and the marginal variances ``diag(P⁻¹)``. For ``S`` Gaussian samples
the relative error of a sample variance, ``s²/σ² − 1``, has standard deviation
``sqrt(2/(S−1))``, so the median of its absolute value over many parameters is
``0.6745·sqrt(2/(S−1))``: :func:`check_samples` reports the observed median beside
that expectation, and the error of the sample mean in posterior standard deviations
beside its expectation ``sqrt(2/(π S))`` (the mean of ``|N(0, 1/S)|``).
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

    @property
    def variance_relative_std(self) -> float | None:
        """Standard deviation of ``s²/σ²`` for ``S`` Gaussian draws, ``sqrt(2/(S−1))``.

        ``None`` for one sample, which has no variance.
        """
        if self.n_samples < 2:
            return None
        return math.sqrt(2 / (self.n_samples - 1))

    @property
    def expected_mean_error_in_std(self) -> float:
        """Expectation of :attr:`mean_error_in_std`, ``sqrt(2/(π S))``."""
        return math.sqrt(2 / (math.pi * self.n_samples))

    def within_monte_carlo_noise(self, factor: float = 2.0) -> bool | None:
        """Whether both errors are within ``factor`` times their expectation.

        Args:
            factor: Tolerance over the Monte-Carlo expectation (the median over
                few parameters fluctuates; 2 holds for tens of parameters).

        Returns:
            The verdict, or ``None`` for one sample (no variance to check).
        """
        if self.expected_median_relative_error is None:
            return None
        return (
            self.median_relative_error <= factor * self.expected_median_relative_error
            and self.mean_error_in_std <= factor * self.expected_mean_error_in_std
        )


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
