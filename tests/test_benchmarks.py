"""The benchmark's --quick smoke run (no timing assertions: timings belong to it)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "benchmark.py"


def _module():
    spec = importlib.util.spec_from_file_location("benchmark", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(benchmark, out: Path, *arguments: str) -> dict:
    structures = ("--structures", "kron", "ekfac", "ekfac_cache")
    assert benchmark.main(["--quick", *structures, "--out", str(out), *arguments]) == 0
    return json.loads((out / "benchmark_quick.json").read_text())


def test_quick_benchmark_runs_and_writes_json(tmp_path, capsys):
    """Every phase on the MLP; the CNN's fits and the wide last layer's marglik."""
    benchmark = _module()
    payload = _run(benchmark, tmp_path, "--cases", "mlp")
    out = capsys.readouterr().out
    assert "| mlp | glm128 |" in out and "EKFAC/Kron time" in out
    assert payload["machine"]["torch"]
    phases = {row["phase"] for row in payload["rows"]}
    assert phases == set(benchmark.PHASES)
    payload = _run(
        benchmark,
        tmp_path,
        *("--cases", "cnn", "last_layer_1000"),
        *("--phases", "fit_ggn", "marglik100"),
    )
    rows = {(row["case"], row["structure"], row["phase"]) for row in payload["rows"]}
    assert ("last_layer_1000", "ekfac", "marglik100") in rows
    assert ("cnn", "ekfac_cache", "fit_ggn") in rows
    assert all(row["seconds"] >= 0 for row in payload["rows"])
    assert all(row["peak_rss_mib"] > 0 for row in payload["rows"])


def test_quick_distributed_benchmark_runs_every_way(tmp_path, capsys):
    """1x1, 1x2 and 2x1 (two gloo processes) on a small MLP; no timing assertions."""
    path = BENCHMARK.parent / "distributed.py"
    spec = importlib.util.spec_from_file_location("distributed_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "distributed_quick.json").read_text())
    assert set(payload["summary"]) == {"1x1", "1x2", "2x1"}
    for row in payload["summary"].values():
        assert row["fit"] > 0 and row["passes"] >= 0
    assert "| 2x1 |" in capsys.readouterr().out
