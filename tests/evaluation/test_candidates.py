"""Candidates: parsing specs and building Laplace objects."""

from __future__ import annotations

import pytest
from laplace.baselaplace import BaseLaplace
from torch import nn

from ekfac_laplace import EKFACLLLaplace
from ekfac_laplace.evaluation.candidates import (
    DEFAULT_CANDIDATES,
    STRUCTURES,
    Candidate,
)


def test_candidate_parse():
    assert Candidate.parse("map").is_map
    candidate = Candidate.parse("ll_kron:mc")
    assert (candidate.subset_of_weights, candidate.hessian_structure) == (
        "last_layer",
        "kron",
    )
    assert candidate.backend == "mc"
    assert Candidate.parse("all_ekfac").backend == "ggn"
    for spec in DEFAULT_CANDIDATES:
        assert Candidate.parse(spec).name == spec
    for bad in ("all", "some_kron", "all_block", "ll_kron:hessian", "all_ekfac:"):
        with pytest.raises(ValueError, match="Unknown candidate"):
            Candidate.parse(bad)
    with pytest.raises(ValueError, match="not a Laplace approximation"):
        Candidate.parse("map").build(nn.Linear(2, 2), "classification")


@pytest.mark.parametrize("spec", ["all_lowrank", "ll_lowrank", "all_lowrank:mc"])
def test_lowrank_is_refused_naming_what_is_offered(spec):
    assert "lowrank" not in STRUCTURES
    with pytest.raises(ValueError) as error:
        Candidate.parse(spec)
    message = str(error.value)
    assert f"{spec!r} is not offered" in message and "asdfghjkl" in message
    assert "diag, kron, ekfac, full" in message


def test_build_gives_the_laplace_object_with_its_backend():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    la = Candidate.parse("ll_ekfac:mc").build(model, "classification")
    assert isinstance(la, EKFACLLLaplace) and isinstance(la, BaseLaplace)
    assert la.options.fisher_type == "mc"
    regression = Candidate.parse("all_kron:ef").build(
        model, "regression", sigma_noise=0.3
    )
    assert type(regression).__name__ == "KronLaplace"
    assert float(regression.sigma_noise) == pytest.approx(0.3)


def test_ekfac_with_exact_blocks():
    candidate = Candidate.parse("all_ekfac+exact500:mc")
    assert (candidate.hessian_structure, candidate.dense_blocks_up_to) == ("ekfac", 500)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    la = candidate.build(model, "classification")
    assert la.options.dense_blocks_up_to == 500 and la.options.fisher_type == "mc"
    assert Candidate.parse("ll_ekfac").dense_blocks_up_to == 0
    for bad in ("all_kron+exact500", "all_ekfac+exact", "all_ekfac+exact0"):
        with pytest.raises(ValueError, match="ekfac\\+exact<n>"):
            Candidate.parse(bad)


def test_ekfac_with_a_low_rank_correction_and_exact_blocks():
    candidate = Candidate.parse("all_ekfac+exact500+lr8")
    assert (candidate.dense_blocks_up_to, candidate.correction_rank) == (500, 8)
    assert Candidate.parse("all_ekfac+lr8+exact500").correction_rank == 8
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    la = Candidate.parse("all_ekfac+lr4").build(model, "classification")
    assert la.options.correction_rank == 4 and la.options.dense_blocks_up_to == 0
    for bad in ("all_kron+lr8", "all_ekfac+lr0", "all_ekfac+lr8+lr4", "all_ekfac+x"):
        with pytest.raises(ValueError, match="ekfac\\+lr<k>"):
            Candidate.parse(bad)


def test_peers_and_prior_tunings_parse():
    ts = Candidate.parse("map_ts")
    assert ts.peer == "temperature" and ts.is_peer and not ts.is_map
    assert not ts.is_laplace
    ensemble = Candidate.parse("ensemble5")
    assert (ensemble.peer, ensemble.members) == ("ensemble", 5)
    assert Candidate.parse("mc_dropout").dropout == 0.1
    assert Candidate.parse("mc_dropout:0.25").dropout == 0.25
    tuned = Candidate.parse("all_ekfac+exact500:mc@marglik")
    assert tuned.prior_tuning == "marglik" and tuned.backend == "mc"
    assert tuned.dense_blocks_up_to == 500
    assert tuned.fit_name == "all_ekfac+exact500:mc"
    assert Candidate.parse("all_ekfac").prior_tuning is None
    assert Candidate.parse("map").is_map and not Candidate.parse("map").is_peer
    for bad, match in (
        ("ensemble1", "M ≥ 2"),
        ("ensemble", "M ≥ 2"),
        ("mc_dropout:1.5", "0 < p < 1"),
        ("mc_dropout:often", "0 < p < 1"),
        ("all_ekfac@bayes", "Unknown prior tuning 'bayes'"),
    ):
        with pytest.raises(ValueError, match=match):
            Candidate.parse(bad)
    with pytest.raises(ValueError, match="'map_ts' candidate is not a Laplace"):
        ts.build(None, "classification")


def test_default_candidates_have_both_priors_for_every_laplace_candidate():
    from ekfac_laplace.evaluation.candidates import DEFAULT_CANDIDATES, DEFAULT_LAPLACE

    assert DEFAULT_CANDIDATES[:2] == ("map", "map_ts")
    for base in DEFAULT_LAPLACE:
        assert base in DEFAULT_CANDIDATES and f"{base}@marglik" in DEFAULT_CANDIDATES
