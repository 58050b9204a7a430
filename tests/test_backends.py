"""laplace-torch backends and constructor arguments as EKFAC options."""

from __future__ import annotations

import pytest
from laplace.curvature import AsdlGGN, CurvlinopsEF, CurvlinopsGGN, CurvlinopsHessian

from ekfac_laplace.backends import fisher_type_of, laplace_options
from ekfac_laplace.options import FisherType


@pytest.mark.parametrize(
    ("backend", "kwargs", "expected"),
    [
        (None, {}, FisherType.TYPE2),
        (CurvlinopsGGN, {}, FisherType.TYPE2),
        (CurvlinopsGGN, {"stochastic": False}, FisherType.TYPE2),
        (CurvlinopsGGN, {"stochastic": True}, FisherType.MC),
        (CurvlinopsEF, {}, FisherType.EMPIRICAL),
    ],
)
def test_backends_stand_for_their_curvature(backend, kwargs, expected):
    assert fisher_type_of(backend, kwargs) is expected


@pytest.mark.parametrize("backend", [AsdlGGN, CurvlinopsHessian, "ggn"])
def test_other_backends_are_refused_with_the_supported_ones_named(backend):
    with pytest.raises(ValueError, match="does not support the backend.*CurvlinopsEF"):
        fisher_type_of(backend, {})


def test_laplace_options_take_asdl_fisher_kwargs_first():
    options = laplace_options(
        CurvlinopsGGN,
        {"stochastic": True},
        {"kfac_approx": "reduce", "mc_samples": 4},
        kfac_approx="expand",
        mc_samples=1,
        seed=3,
    )
    assert (options.fisher_type, options.kfac_approx, options.mc_samples) == (
        "mc",
        "reduce",
        4,
    )
    assert options.seed == 3
    with pytest.raises(ValueError, match=r"asdl_fisher_kwargs keys \['damping'\]"):
        laplace_options(asdl_fisher_kwargs={"damping": 0.1})
    with pytest.raises(ValueError, match="mc_samples=2 only applies"):
        laplace_options(mc_samples=2)
