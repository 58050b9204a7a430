"""laplace-torch backends and constructor arguments as EKFAC options."""

from __future__ import annotations

import pytest
from laplace.curvature import (
    AsdlEF,
    AsdlGGN,
    AsdlHessian,
    BackPackEF,
    BackPackGGN,
    CurvlinopsEF,
    CurvlinopsGGN,
    CurvlinopsHessian,
)

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
        (AsdlGGN, {}, FisherType.TYPE2),
        (AsdlGGN, {"stochastic": True}, FisherType.MC),
        (AsdlEF, {}, FisherType.EMPIRICAL),
        (BackPackGGN, {}, FisherType.TYPE2),
        (BackPackGGN, {"stochastic": True}, FisherType.MC),
        (BackPackEF, {}, FisherType.EMPIRICAL),
    ],
)
def test_backends_stand_for_their_curvature(backend, kwargs, expected):
    assert fisher_type_of(backend, kwargs) is expected


@pytest.mark.parametrize("backend", [CurvlinopsHessian, AsdlHessian])
def test_hessian_backends_are_refused_with_the_supported_ones_named(backend):
    with pytest.raises(
        ValueError, match=f"does not support the backend {backend.__name__}.*AsdlEF"
    ):
        fisher_type_of(backend, {})


@pytest.mark.parametrize("backend", ["ggn", object, 3])
def test_non_backends_are_refused(backend):
    with pytest.raises(ValueError, match="must be a laplace.curvature backend class"):
        fisher_type_of(backend, {})


@pytest.mark.parametrize(
    ("backend", "kwargs", "match"),
    [
        (CurvlinopsEF, {"stochastic": True}, "'stochastic' is not an argument of"),
        (AsdlGGN, {"num_samples": 3}, r"takes \['stochastic'\]"),
        (CurvlinopsGGN, {"model": None}, "set by laplace-torch"),
        (BackPackGGN, {"stochastic": "yes"}, "must be True or False"),
    ],
)
def test_backend_kwargs_the_backend_does_not_take_are_refused(backend, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fisher_type_of(backend, kwargs)


def test_laplace_options_take_asdl_fisher_kwargs_first():
    options = laplace_options(
        CurvlinopsGGN,
        {"stochastic": True},
        {"kfac_approx": "reduce", "mc_samples": 4, "seed": 7},
        kfac_approx="expand",
        mc_samples=1,
        seed=3,
    )
    assert (options.fisher_type, options.kfac_approx, options.mc_samples) == (
        "mc",
        "reduce",
        4,
    )
    assert options.seed == 7
    asdl = laplace_options(AsdlGGN, {"stochastic": True}, {"n_mc_samples": 5})
    assert asdl.mc_samples == 5
    with pytest.raises(ValueError, match=r"asdl_fisher_kwargs keys \['damping'\]"):
        laplace_options(asdl_fisher_kwargs={"damping": 0.1})
    with pytest.raises(ValueError, match="both 'mc_samples' and 'n_mc_samples'"):
        laplace_options(
            AsdlGGN, {"stochastic": True}, {"mc_samples": 2, "n_mc_samples": 2}
        )
    with pytest.raises(ValueError, match="mc_samples=2 only applies"):
        laplace_options(mc_samples=2)
