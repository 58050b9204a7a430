"""Which prior precision should ``compare`` use by default? Measured, not assumed.

For each bundled image problem (digits MLP, digits CNN, noisy digits MLP) and seed,
train the MAP network as ``ekfac-laplace compare`` does, fit the Laplace candidates,
and evaluate each at every prior precision of the validation grid (the sweep of
:func:`ekfac_laplace.evaluation.priors.sweep_prior`). Then apply every prior rule to
the sweep's validation NLL — the marginal likelihood, the best validation NLL, and
the widest prior within a tolerance of it (relative, a fraction of the best, or
absolute, in nats per example) — and report, per rule, the test NLL
/ ECE, the shift NLL and the OOD AUROC at the prior it picks, averaged over seeds,
beside the MAP and the temperature-scaled MAP.

    python benchmarks/prior_rules.py                 # 3 problems × 3 seeds (~30 min)
    python benchmarks/prior_rules.py --seeds 0 --problems digits:mlp

Writes ``benchmarks/results/prior_rules.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ekfac_laplace.evaluation.comparison import compare
from ekfac_laplace.evaluation.models import build_model, train_map
from ekfac_laplace.evaluation.priors import widest_within
from ekfac_laplace.evaluation.problems import load_problem
from ekfac_laplace.evaluation.settings import (
    DEFAULT_PRIOR_GRID,
    DEFAULT_VAL_TOLERANCE,
    EvaluationSettings,
)

PROBLEMS = ("digits:mlp", "digits:cnn", "noisy-digits:mlp")
LAPLACE = ("ll_ekfac", "all_ekfac", "all_ekfac+exact1000")
#: The validation grid from 1e-2 up: no rule picks a wider prior on these problems
#: (checked on digits MLP, seed 0, with the whole grid), and each prior costs a
#: predictive on every set.
SWEEP_GRID = tuple(p for p in DEFAULT_PRIOR_GRID if p >= 0.99e-2)
#: Relative tolerances (a fraction of the best validation NLL) ...
RELATIVE = (0.02, 0.05, 0.1)
#: ... and absolute ones (nats per example) of the validation rule.
ABSOLUTE = (0.002, 0.005, 0.01, 0.02)
METRICS = ("test_nll", "test_ece", "shift_nll", "ood_auroc_entropy")
RESULTS = Path(__file__).parent / "results"
#: Where the docs include the summaries from.
DOCS_RESULTS = Path(__file__).parents[1] / "docs" / "results"
SHORT = {
    "test_nll": "test NLL",
    "test_ece": "test ECE",
    "shift_nll": "shift NLL",
    "ood_auroc_entropy": "OOD AUROC",
}


def run_one(problem_name: str, model_name: str, seed: int) -> dict[str, Any]:
    """Train the MAP, compare with a sweep at the validation grid; flat results."""
    torch.manual_seed(seed)
    problem = load_problem(problem_name, seed)
    splits = problem.splits
    model = build_model(model_name, splits.input_shape, splits.n_outputs, seed=seed)
    train_map(model, problem.train_loader, splits.likelihood, epochs=60, seed=seed)
    settings = EvaluationSettings(
        prior_tuning="marglik", sweep_grid=SWEEP_GRID, seed=seed
    )
    comparison = compare(
        model,
        splits.likelihood,
        problem.train_loader,
        problem.test_loader,
        candidates=("map", "map_ts", *LAPLACE),
        val_loader=problem.val_loader,
        ood_loader=problem.ood_loader,
        shift_loaders=problem.shift_loaders,
        settings=settings,
    )
    out: dict[str, Any] = {}
    for row in comparison.rows:
        if not row.ok:
            raise RuntimeError(f"{row.candidate} failed: {row.error}")
        record = row.record() | row.shift_means()
        if not row.sweep:
            out[row.candidate] = {key: record[key] for key in METRICS}
            continue
        curve = {point["prior_precision"]: point for point in row.sweep}
        val = {prior: point["val_nll"] for prior, point in curve.items()}
        best = min(val.values())
        rules = {"marglik": {**{key: record[key] for key in METRICS}}}
        rules["marglik"]["prior"] = row.prior_precision
        limits = {"val_best": best}
        limits |= {f"val_rel{t:g}": best * (1 + t) for t in RELATIVE}
        limits |= {f"val_abs{t:g}": best + t for t in ABSOLUTE}
        for rule, limit in limits.items():
            prior = min(p for p, nll in val.items() if nll <= limit)
            rules[rule] = {
                "prior": prior,
                **{key: curve[prior][key] for key in METRICS},
            }
        rules["sweep"] = row.sweep
        out[row.candidate] = rules
    return out


def summarise(runs: dict[str, list[dict[str, Any]]]) -> str:
    """A Markdown table per problem: mean ± sd over seeds of each metric."""

    def cell(values: list[float]) -> str:
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{mean:.3f} ± {sd:.3f}"

    lines = []
    for problem, seeds in runs.items():
        lines += [
            f"\n### {problem} ({len(seeds)} seeds)\n",
            "| candidate | prior rule | prior | " + " | ".join(METRICS) + " |",
            "|---|---|---|" + "---|" * len(METRICS),
        ]
        for candidate, entry in seeds[0].items():
            if "test_nll" in entry:
                values = [[run[candidate][m] for run in seeds] for m in METRICS]
                lines.append(
                    f"| {candidate} | - | - | " + " | ".join(map(cell, values)) + " |"
                )
                continue
            for rule in (r for r in entry if r != "sweep"):
                values = [[run[candidate][rule][m] for run in seeds] for m in METRICS]
                priors = [run[candidate][rule]["prior"] for run in seeds]
                geo = math.exp(statistics.fmean(math.log(p) for p in priors))
                lines.append(
                    f"| {candidate} | {rule} | {geo:.3g} | "
                    + " | ".join(map(cell, values))
                    + " |"
                )
    return "\n".join(lines) + "\n"


def _cell(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def _at_default(run: dict[str, Any], candidate: str) -> dict[str, float]:
    """The metrics at the package's default rule, from the stored sweep."""
    sweep = {point["prior_precision"]: point for point in run[candidate]["sweep"]}
    val = {prior: point["val_nll"] for prior, point in sweep.items()}
    prior = widest_within(val, DEFAULT_VAL_TOLERANCE)
    return {"prior": prior, **{key: sweep[prior][key] for key in METRICS}}


def docs_tables(runs: dict[str, list[dict[str, Any]]]) -> dict[str, str]:
    """The two tables of the calibration guide.

    Which posterior for what, and the default rule's choice among the tolerances
    (all-weights EKFAC).
    """
    header = "| problem | predictive | prior | " + " | ".join(SHORT[m] for m in METRICS)
    summary = [header + " |", "|---|---|---|" + "---|" * len(METRICS)]
    choice = [header + " |", "|---|---|---|" + "---|" * len(METRICS)]
    for problem, seeds in runs.items():
        rows: list[tuple[str, str, list[dict[str, float]]]] = [
            ("MAP", "-", [run["map"] for run in seeds]),
            ("MAP, temperature-scaled", "-", [run["map_ts"] for run in seeds]),
        ]
        for candidate in ("ll_ekfac", "all_ekfac"):
            rows.append(
                (candidate, "default", [_at_default(run, candidate) for run in seeds])
            )
            rows.append(
                (candidate, "marglik", [run[candidate]["marglik"] for run in seeds])
            )
        for name, prior, entries in rows:
            cells = [_cell([entry[m] for entry in entries]) for m in METRICS]
            summary.append(
                f"| {problem} | {name} | {prior} | " + " | ".join(cells) + " |"
            )
        rules = [r for r in seeds[0]["all_ekfac"] if r != "sweep"]
        for rule in rules:
            entries = [run["all_ekfac"][rule] for run in seeds]
            cells = [_cell([entry[m] for entry in entries]) for m in METRICS]
            geo = math.exp(statistics.fmean(math.log(e["prior"]) for e in entries))
            label = rule.replace("val_abs", "val, τ = ").replace(
                "val_rel", "val, τ% = "
            )
            choice.append(
                f"| {problem} | all_ekfac | {label} (δ ≈ {geo:.3g}) | "
                + " | ".join(cells)
                + " |"
            )
    return {
        "calibration_summary.md": "\n".join(summary) + "\n",
        "prior_rules_choice.md": "\n".join(choice) + "\n",
    }


def main() -> None:
    """Run the problems and seeds, write JSON and Markdown."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problems", nargs="+", default=list(PROBLEMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", default=str(RESULTS / "prior_rules"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--from-json",
        action="store_true",
        help="only rewrite the tables from the JSON of an earlier run",
    )
    args = parser.parse_args()
    out = Path(args.out)
    if args.from_json:
        runs = json.loads(out.with_suffix(".json").read_text())["runs"]
        _write_tables(runs, out)
        return
    torch.set_num_threads(args.threads)
    runs: dict[str, list[dict[str, Any]]] = {}
    for spec in args.problems:
        problem, model = spec.split(":")
        for seed in args.seeds:
            start = time.perf_counter()
            runs.setdefault(spec, []).append(run_one(problem, model, seed))
            print(
                f"{spec} seed {seed}: {time.perf_counter() - start:.0f} s", flush=True
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "seeds": args.seeds,
        "relative": RELATIVE,
        "absolute": ABSOLUTE,
        "runs": runs,
    }
    out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    _write_tables(runs, out)


def _write_tables(runs: dict[str, list[dict[str, Any]]], out: Path) -> None:
    table = summarise(runs)
    out.with_suffix(".md").write_text(table)
    print(table)
    if set(runs) == set(PROBLEMS):  # the docs show the full run only
        for name, text in docs_tables(runs).items():
            (DOCS_RESULTS / name).write_text(text)
            print(text)


if __name__ == "__main__":
    main()
