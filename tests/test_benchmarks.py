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


def test_quick_benchmark_runs_and_writes_json(tmp_path, capsys):
    benchmark = _module()
    code = benchmark.main(
        [
            "--quick",
            "--structures",
            "kron",
            "ekfac",
            "ekfac_cache",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "| mlp | glm128 |" in out and "EKFAC/Kron time" in out
    payload = json.loads((tmp_path / "benchmark_quick.json").read_text())
    assert payload["machine"]["torch"]
    phases = {(row["case"], row["structure"], row["phase"]) for row in payload["rows"]}
    assert ("last_layer_1000", "ekfac", "marglik100") in phases
    assert ("cnn", "ekfac_cache", "fit_ggn") in phases
    assert all(row["seconds"] >= 0 for row in payload["rows"])
