"""The curvlinops engine: equal to ours, and its Monte-Carlo Fisher unbiased."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ekfac_laplace.batches import LaplaceBatches
from ekfac_laplace.curvlinops_engine import (
    check_curvlinops_layout,
    check_first_batch,
)
from ekfac_laplace.layout import ParameterLayout
from tests.cases import CASES, Case, fit_factors, loader
from tests.utils import assert_close, mc_fisher_moments

EXACT_CASES = [(case, ft) for case in CASES for ft in ("type2", "empirical", "mc")]
MC_CASES = [case for case in CASES if "mlp" in case.tags] + [CASES[4]]
#: Labels per example in the Monte-Carlo tests: the estimator's standard error is
#: computed exactly (tests/utils.mc_fisher_moments), so few samples suffice.
MC_SAMPLES = 128
#: |estimate − expectation| / standard error must stay below this for every
#: eigenvalue (P(|z| > 5) ≈ 6e-7 per eigenvalue for a normal z).
MAX_Z = 5.0


@pytest.mark.parametrize(
    ("case", "fisher_type"),
    EXACT_CASES,
    ids=[f"{case.name}-{ft}" for case, ft in EXACT_CASES],
)
def test_fast_engine_equals_curvlinops(case: Case, fisher_type: str):
    """Equal to rounding, the Monte-Carlo Fisher included: for the same seed both
    engines draw the same labels (one multinomial / normal draw per label sample
    and batch, re-seeded at every pass)."""
    model, X, y = case.make()
    params = list(model.parameters())
    options = {"fisher_type": fisher_type, "kfac_approx": case.kfac_approx}
    if fisher_type == "mc":
        options.update(mc_samples=3, seed=1)
    fast = fit_factors(model, params, X, y, case.likelihood, engine="fast", **options)
    reference = fit_factors(
        model, params, X, y, case.likelihood, engine="curvlinops", **options
    )
    assert_close(
        fast.to_decomposed().to_matrix(), reference.to_decomposed().to_matrix()
    )
    assert_close(fast.loss, reference.loss)


@pytest.mark.parametrize("engine", ["fast", "curvlinops"])
@pytest.mark.parametrize("case", MC_CASES, ids=[case.name for case in MC_CASES])
def test_monte_carlo_fisher_is_unbiased_with_the_exact_variance(case: Case, engine):
    """Both engines' samplers against the exact moments of the estimator.

    In a fixed eigenbasis, ``λ̂`` with ``S`` labels per example has mean ``λ`` (the
    exact GGN's corrected eigenvalues) and variance ``Var₁ / S``; every eigenvalue
    must lie within ``MAX_Z`` standard errors. Measured with seed 0: the largest
    |z| is 1.6–3.5 over these cases; a sampler 10% off would give 3.7–11.9 (20%
    off, twice that), so a wrong noise scale or label distribution fails.
    """
    model, X, y = case.make()
    params = list(model.parameters())
    first = fit_factors(
        model, params, X, y, case.likelihood, kfac_approx=case.kfac_approx
    )
    basis = first.eigenvectors
    mc = fit_factors(
        model,
        params,
        X,
        y,
        case.likelihood,
        eigenbasis=basis,
        fitted=first.layout,
        fisher_type="mc",
        mc_samples=MC_SAMPLES,
        kfac_approx=case.kfac_approx,
        seed=0,
        engine=engine,
    )
    means, variances = mc_fisher_moments(model, params, X, case.likelihood, basis)
    for estimate, mean, variance in zip(mc.eigenvalues, means, variances):
        error = (estimate.flatten() - mean).abs()
        standard_error = (variance / MC_SAMPLES).sqrt()
        degenerate = standard_error < 1e-12  # no randomness: must be exact
        assert (error[degenerate] < 1e-10).all()
        z = error[~degenerate] / standard_error[~degenerate]
        assert z.max() < MAX_Z, z.max()
    assert_close(mc.loss, fit_factors(model, params, X, y, case.likelihood).loss)


def test_curvlinops_refuses_diagonal_blocks_and_reused_modules():
    normed = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    with pytest.raises(ValueError, match="'1.weight' needs a diagonal block"):
        check_curvlinops_layout(ParameterLayout(normed, list(normed.parameters())))
    layer = nn.Linear(4, 4)
    reused = nn.Sequential(layer, nn.Tanh(), layer)
    X, y = torch.randn(6, 4), torch.randint(0, 4, (6,))
    with pytest.raises(
        ValueError, match="'0' runs more than once per forward pass; curvlinops"
    ):
        check_first_batch(
            reused,
            ParameterLayout(reused, list(reused.parameters())),
            LaplaceBatches(loader(X, y)),
        )
