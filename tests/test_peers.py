"""benchmarks/peers.py: every installed peer computes our EKFAC; the timing plumbing.

The agreement check fits ours and a peer on the same small float64 models, data and
curvature and compares each layer's dense ``Q diag(λ) Qᵀ``. Measured: at most
2e-14 (relative Frobenius) for every peer, curvature and layer, so the bound below
leaves four orders of magnitude for other BLAS / eigensolvers while any convention
slip (a factor N, a missed bias, other Monte-Carlo labels) is 1e-1 or more.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import sys
from pathlib import Path

import pytest

PEERS_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"
TOLERANCE = 1e-10


@pytest.fixture(scope="module")
def peers():
    spec = importlib.util.spec_from_file_location("peers", PEERS_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["peers"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("peers", None)


@pytest.mark.parametrize("peer", ["curvlinops", "nngeometry", "kronfluence"])
def test_peer_computes_our_ekfac(peers, peer):
    pytest.importorskip(peer)
    rows = peers.check_agreement([peer])
    expected = {
        (case, curvature)
        for case in peers.AGREEMENT_CASES
        for curvature in peers.CONTENDERS[peer].curvatures
    }
    assert {(row["case"], row["curvature"]) for row in rows} == expected
    for row in rows:
        assert len(row["layer_errors"]) == 3
        assert row["max_error"] < TOLERANCE, row


def test_agreement_sees_other_monte_carlo_labels(peers, monkeypatch):
    """Not vacuous: the same sampler with another seed is far from ours."""
    problem = peers.agreement_problem("mlp")
    ours = peers.fit_dense("ours", problem, "mc")
    monkeypatch.setattr(sys.modules["contenders"], "SEED", 1)
    other = peers.fit_dense("curvlinops", problem, "mc")
    errors = [peers.relative_error(b, o) for b, o in zip(other, ours)]
    assert min(errors) > 0.1


def test_quick_timing_writes_table_and_json(peers, tmp_path, capsys):
    """Every peer on the CNN (float32, biases); the MLP is the worker test's."""
    arguments = ["--quick", "--threads", "1", "--out", str(tmp_path), "--cases", "cnn"]
    assert peers.main([*arguments, "--curvatures", "type2", "empirical"]) == 0
    out = capsys.readouterr().out
    assert "| peer/ours cold |" in out
    payload = json.loads((tmp_path / "peers_quick.json").read_text())
    assert payload["versions"]["torch"]
    installed = [p for p in peers.PEERS if peers.CONTENDERS[p].installed]
    expected = {
        (case, curvature, peer)
        for case in ("cnn",)
        for curvature in ("type2", "empirical")
        for peer in peers.PEERS
        if curvature in peers.CONTENDERS[peer].curvatures
    }
    rows = payload["rows"]
    assert {(r["case"], r["curvature"], r["peer"]) for r in rows} == expected
    for row in rows:
        if row["peer"] in installed:
            assert "errors" not in row, row
            assert row["cold_ratio"]["median"] > 0 and row["warm_ratio"]["rounds"] == 1
            assert row["ours_peak_mib"] > 0
        else:
            assert row["status"] == "not installed"
    markdown = (tmp_path / "peers_quick.md").read_text()
    assert "| cnn | type2 | curvlinops |" in markdown


def test_missing_peer_is_a_row_not_an_error(peers, tmp_path, monkeypatch):
    missing = dataclasses.replace(
        peers.CONTENDERS["kronfluence"], package="no_such_package_for_peers"
    )
    monkeypatch.setitem(peers.CONTENDERS, "kronfluence", missing)
    arguments = ["--quick", "--threads", "1", "--out", str(tmp_path)]
    selection = ["--cases", "mlp", "--curvatures", "mc", "--peers", "kronfluence"]
    assert peers.main([*arguments, *selection]) == 0
    rows = json.loads((tmp_path / "peers_quick.json").read_text())["rows"]
    assert rows == [
        {
            "case": "mlp",
            "curvature": "mc",
            "peer": "kronfluence",
            "status": "not installed",
        }
    ]
    assert peers.check_agreement(["kronfluence"], ["mlp"], ["mc"])[0]["status"] == (
        "not installed"
    )


def test_worker_runs_in_a_fresh_process(peers):
    spec = {"n_data": 64, "quick": True, "warm": 1, "threads": 1}
    result = peers.measure_isolated("mlp", "empirical", "ours", spec)
    assert "error" not in result, result
    assert result["cold"] > 0 and len(result["calls"]) == 2
