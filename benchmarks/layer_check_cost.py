"""What the layer check costs: the check alone against a whole exact-GGN fit.

Every fit checks its layers on (at most 32 examples of) the first batch
(:mod:`ekfac_laplace.layer_check`): two forward and two backward passes. This
times the check and the fit in one process on the benchmark's cases, the median of
``--checks`` checks and ``--fits`` fits, and reports the check's share of the fit
(the round-four budget: under 2%). Run it with ``PYTHONPATH`` set to another
checkout to time that version.

Usage::

    python benchmarks/layer_check_cost.py --cases mlp cnn
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import benchmark  # noqa: E402

from ekfac_laplace import EKFACLaplace  # noqa: E402
from ekfac_laplace.layer_check import CHECK_EXAMPLES, checked_layout  # noqa: E402
from ekfac_laplace.layout import ParameterLayout  # noqa: E402


def measure(case: str, quick: bool, checks: int, fits: int) -> dict[str, float]:
    """The median seconds of the layer check and of a fit of one case.

    Args:
        case: A :data:`benchmark.CASES` key.
        quick: The small sizes of :data:`benchmark.QUICK_CASES`.
        checks: Checks to time.
        fits: Fits to time.

    Returns:
        ``check_s``, ``fit_s`` and ``share`` (check / fit).
    """
    cases = benchmark.QUICK_CASES if quick else benchmark.CASES
    model, X, y = benchmark.build(case, cases[case]["n_data"], quick=quick)
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    layout = ParameterLayout(model, list(model.parameters()))
    check_times, fit_times = [], []
    for _ in range(checks):
        start = time.perf_counter()
        checked_layout(model, layout, X[:CHECK_EXAMPLES])
        check_times.append(time.perf_counter() - start)
    for _ in range(fits):
        la = EKFACLaplace(model, "classification")
        start = time.perf_counter()
        la.fit(loader)
        fit_times.append(time.perf_counter() - start)
    check, fit = statistics.median(check_times), statistics.median(fit_times)
    return {"check_s": check, "fit_s": fit, "share": check / fit}


def main(argv: list[str] | None = None) -> int:
    """Time the cases and print a table (and write ``layer_check_cost.json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="*", default=["mlp", "cnn"])
    parser.add_argument("--checks", type=int, default=7)
    parser.add_argument("--fits", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {
        case: measure(case, args.quick, args.checks, args.fits) for case in args.cases
    }
    print("| case | check ms | fit s | check / fit |")
    print("|---|---|---|---|")
    for case, row in rows.items():
        print(
            f"| {case} | {row['check_s'] * 1e3:.1f} | {row['fit_s']:.2f} | "
            f"{row['share']:.2%} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "layer_check_cost_quick.json" if args.quick else "layer_check_cost.json"
    (args.out / name).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
