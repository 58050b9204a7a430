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
    assert "| mlp | glm32 | EKFAC |" in out and "X/Kron warm" in out
    assert payload["machine"]["torch"] and payload["rounds"] == 1
    phases = {row["phase"] for row in payload["rows"]}
    assert phases == set(benchmark.PHASES)
    payload = _run(
        benchmark,
        tmp_path,
        *("--cases", "cnn", "last_layer_1000"),
        *("--phases", "fit_ggn", "marglik100", "glm128"),  # glm128: on request
    )
    rows = {(r["case"], r["contender"], r["phase"]) for r in payload["rows"]}
    assert ("last_layer_1000", "ekfac", "marglik100") in rows
    assert ("cnn", "ekfac_cache", "fit_ggn") in rows
    assert ("cnn", "ekfac_cache", "marglik100") not in rows  # the cache: fits only
    assert ("cnn", "kron", "glm128") in rows
    for row in payload["rows"]:
        assert row["cold"] >= 0 and row["warm"] >= 0 and len(row["calls"]) == 2
        assert row["peak_mib"] > 0


def test_two_runs_are_compared_ratio_by_ratio(tmp_path, capsys):
    benchmark = _module()

    def rows(kron: float, ekfac: float) -> list[dict]:
        return [
            {"case": "cnn", "phase": "fit_ggn", "contender": c, "round": 0,
             "cold": t, "warm": t, "peak_mib": 100.0}
            for c, t in (("kron", kron), ("ekfac", ekfac))
        ]  # fmt: skip

    for name, (kron, ekfac) in {"a": (2.0, 2.0), "b": (2.0, 2.2)}.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"rows": rows(kron, ekfac)}))
    assert (
        benchmark.main(
            ["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "| cnn | fit_ggn | 1.000 | 1.100 | +10.0% | 1.000 | 1.100 | +10.0% |" in out


def test_interleaved_ratios_are_paired_by_round():
    """Timing helpers: A B A B order, per-round ratios, median and spread."""
    import sys

    sys.path.insert(0, str(BENCHMARK.parent))
    from timing import interleave, ratio, spread

    order = []

    def measure(contender: str, index: int) -> dict:
        order.append(contender)
        return {"warm": {"a": [2.0, 3.0, 8.0], "b": [1.0, 1.0, 2.0]}[contender][index]}

    results = interleave(["a", "b"], 3, measure)
    assert order == ["a", "b", "b", "a", "a", "b"]  # the order turns every round
    summary = ratio(results, "a", "b", "warm")
    assert summary == {"median": 3.0, "min": 2.0, "max": 4.0, "rounds": 3}
    assert spread(summary) == "3.00 (2.00–4.00)"
    assert ratio(results, "a", "c", "warm") is None and spread(None) == "–"


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


def test_quick_scaling_benchmark_writes_every_axis_phase_and_plot(tmp_path):
    """Every axis, phase and the floor at tiny sizes; a PNG per axis; no timings."""
    import sys

    spec = importlib.util.spec_from_file_location(
        "scaling_benchmark", BENCHMARK.parent / "scaling.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    arguments = ["--quick", "--threads", "1", "--out", str(tmp_path)]
    assert module.main([*arguments, "--plots", str(tmp_path / "plots")]) == 0
    payload = json.loads((tmp_path / "scaling_quick.json").read_text())
    assert set(payload["axes"]) == set(module.AXES)
    for name, result in payload["axes"].items():
        assert len(result["points"]) >= 2
        # The tokens axis also times the bare products of its exact fit.
        phases = {*module.PHASES, module.FLOOR}
        phases |= {module.PRODUCTS} if name == "tokens" else set()
        for point in result["points"]:
            for phase in phases:
                assert point[phase]["seconds"] > 0, (name, point["x"], phase)
        assert set(result["exponents"]) == phases
        assert all(p is not None for p in result["exponents"].values())
        png = tmp_path / "plots" / f"scaling_quick_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "scaling_quick.md").read_text()
    assert all(f"### {name}:" in markdown for name in module.AXES)
    assert markdown.count("fit / (floor + products)") == 1


def test_quick_token_rates_count_the_products_flops(tmp_path):
    """Plumbing and the flop counts (``B T d²`` products over the data set)."""
    import sys

    sys.path.insert(0, str(BENCHMARK.parent))
    spec = importlib.util.spec_from_file_location(
        "token_rates", BENCHMARK.parent / "token_rates.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arguments = ["--quick", "--tokens", "4", "8", "--threads", "1"]
    assert module.main([*arguments, "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "token_rates_quick.json").read_text())
    assert payload["peak_gflops"] > 0
    for row in payload["rows"]:
        unit = 2 * 2 * 8 * row["tokens"] * 8**2  # 2 batches of 8, d = 8
        assert row["grams"]["flops"] == 10 * unit  # one leaf: the whole Gram
        if row["tokens"] < 8:  # the gradients rotated first
            assert row["rotations"]["flops"] == 10 * unit
            assert row["per_example"]["flops"] == 9 * unit
        else:  # the per-example product rotated after: + 2 B d³ per pass, batch
            assert row["rotations"]["flops"] == unit
            assert row["per_example"]["flops"] == 9 * (unit + 2 * 2 * 8 * 8**3)
        assert row["floor_s"] > 0
    assert (
        "bound: (floor + products at peak) / floor"
        in (tmp_path / "token_rates_quick.md").read_text()
    )


def test_quick_fidelity_benchmark_writes_every_structure(tmp_path, capsys):
    """Plumbing only (128 images, one epoch): every structure is scored; the
    exact blocks come closer to the full Laplace than EKFAC even here."""
    spec = importlib.util.spec_from_file_location(
        "fidelity_benchmark", BENCHMARK.parent / "fidelity.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--out", str(tmp_path)]) == 0
    payload = json.loads((tmp_path / "fidelity.json").read_text())
    (errors,) = [model["errors"] for model in payload["models"].values()]
    assert set(errors) == set(module.STRUCTURES)
    exact = errors["exact blocks (block-diagonal GGN)"][0]
    assert 0 <= exact < errors["EKFAC"][0]
    assert "| EKFAC |" in (tmp_path / "fidelity.md").read_text()


def test_quick_lora_gpt2_benchmark_measures_every_phase_and_the_floor(tmp_path):
    """Plumbing only: a one-layer GPT-2 of width 32 with LoRA, in this process."""
    import sys

    spec = importlib.util.spec_from_file_location(
        "lora_gpt2_benchmark", BENCHMARK.parent / "lora_gpt2.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    arguments = ["--quick", "--rounds", "1", "--warm", "0", "--out", str(tmp_path)]
    assert module.main([*arguments, "--plot", str(tmp_path / "lora.png")]) == 0
    rows = json.loads((tmp_path / "lora_gpt2_quick.json").read_text())
    measured = {(row["contender"], row["phase"]) for row in rows}
    expected = {(c, p) for c in ("kron", "ekfac") for p in module.PHASES}
    expected |= {("floor", p) for p in module.FLOOR_PHASES}
    assert measured == expected
    assert all(row["cold"] > 0 and row["n_params"] == 1024 for row in rows)
    table = (tmp_path / "lora_gpt2_quick.md").read_text()
    assert "| quick | glm8 |" in table and "EKFAC/floor" in table
    assert (tmp_path / "lora.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_layer_check_cost_times_the_check_and_the_fit(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "layer_check_cost", BENCHMARK.parent / "layer_check_cost.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    arguments = ["--quick", "--cases", "mlp", "--checks", "1", "--fits", "1"]
    assert module.main([*arguments, "--out", str(tmp_path)]) == 0
    assert "| mlp |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "layer_check_cost_quick.json").read_text())
    assert 0 < rows["mlp"]["check_s"] and 0 < rows["mlp"]["share"] < 1


def test_prior_rules_tables_apply_the_default_rule_to_the_stored_sweep():
    """The guide's tables from a run: the default rule read off each sweep."""
    spec = importlib.util.spec_from_file_location(
        "prior_rules", BENCHMARK.parent / "prior_rules.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = dict.fromkeys(module.METRICS, 0.5)

    def laplace(shift: float) -> dict:
        sweep = [
            {"prior_precision": p, "val_nll": v, **metrics, "shift_nll": p + shift}
            for p, v in ((0.1, 0.40), (1.0, 0.303), (10.0, 0.30), (100.0, 0.30))
        ]
        return {"marglik": {"prior": 1.0, **metrics}, "sweep": sweep}

    run = {"map": metrics, "map_ts": metrics}
    runs = {problem: [run | {"ll_ekfac": laplace(0), "all_ekfac": laplace(s)}
                      for s in (0.0, 1.0)] for problem in module.PROBLEMS}  # fmt: skip
    # the widest prior within 0.005 nats of the best (0.30): 1.0 (0.303)
    assert module._at_default(runs["digits:mlp"][0], "all_ekfac")["prior"] == 1.0
    tables = module.docs_tables(runs)
    summary = tables["calibration_summary.md"].splitlines()
    assert summary[0].startswith("| problem | predictive | prior | test NLL |")
    assert len(summary) == 2 + 6 * len(module.PROBLEMS)
    default = next(row for row in summary if "all_ekfac | default" in row)
    assert "1.500 ± 0.707" in default  # shift NLL at δ = 1: 1 and 2 over the seeds
    assert "MAP, temperature-scaled" in tables["calibration_summary.md"]
