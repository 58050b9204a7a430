"""Time and memory of EKFACLaplace against laplace-torch's KronLaplace and DiagLaplace.

Every (case, structure, phase) runs in a fresh Python subprocess, so that one
measurement's allocations cannot hide in another's peak. Inside the subprocess the
model and data are built from a seed, the Laplace approximation is fitted (untimed,
unless the phase is the fit), the kernel's peak-RSS counter is reset
(``/proc/self/clear_refs``), and the phase is timed. We report wall seconds, the
peak RSS during the phase and the growth over the RSS before it.

Usage::

    python benchmarks/benchmark.py                 # full run, writes results/*.json
    python benchmarks/benchmark.py --quick          # tiny smoke run, in one process
    python benchmarks/benchmark.py --scaling        # fit vs N, GLM vs batch size

Timings are only comparable within one run: the script prints ratios EKFAC/Kron.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")

# "diag" (laplace-torch's DiagLaplace, for context) is available with --structures;
# it is not in the default run: its exact diagonal GGN takes minutes per fit at these
# sizes and every phase needs a fit.
STRUCTURES = ("kron", "ekfac", "ekfac_cache")
ALL_STRUCTURES = (*STRUCTURES, "diag")
FIT_ONLY = {"ekfac_cache"}  # the cache only changes the fit
PHASES = ("fit_ggn", "fit_mc", "glm32", "glm128", "sample100", "nn100", "marglik100")

CASES: dict[str, dict[str, Any]] = {
    "mlp": {"n_data": 8192, "subset": "all"},
    "cnn": {"n_data": 4096, "subset": "all"},
    # laplace-torch's diagonal GGN needs 1,000 backward passes per batch here.
    "last_layer_1000": {"n_data": 4096, "subset": "last_layer", "skip": ["diag"]},
}
# Dense (batch, classes, parameters) Jacobians larger than this are not attempted.
JACOBIAN_LIMIT_BYTES = 6 * 2**30
QUICK_CASES: dict[str, dict[str, Any]] = {
    "mlp": {"n_data": 64, "subset": "all", "quick": True},
    "cnn": {"n_data": 32, "subset": "all", "quick": True},
    "last_layer_1000": {"n_data": 64, "subset": "last_layer", "quick": True},
}


def build(case: str, n_data: int, quick: bool = False, seed: int = 0):
    """Model and inputs of a case (random data: timing does not depend on it)."""
    torch.manual_seed(seed)
    if case == "mlp":
        width = 32 if quick else 512
        model = nn.Sequential(
            nn.Linear(784, width),
            nn.ReLU(),
            nn.Linear(width, width),
            nn.ReLU(),
            nn.Linear(width, 10),
        )
        X = torch.randn(n_data, 784)
        classes = 10
    elif case == "cnn":
        channels, side = (4, 16) if quick else (16, 32)
        model = nn.Sequential(
            nn.Conv2d(3, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(2 * channels * (side // 4) ** 2, 10),
        )
        X = torch.randn(n_data, 3, side, side)
        classes = 10
    elif case == "last_layer_1000":
        classes, width = (50, 16) if quick else (1000, 512)
        model = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, classes)
        )
        X = torch.randn(n_data, 64)
    else:
        raise ValueError(f"unknown case {case!r}")
    y = torch.randint(0, classes, (n_data,))
    return model.eval(), X, y


def measure(case: str, structure: str, phase: str, spec: dict[str, Any]) -> dict:
    """One measurement in this process."""
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    import ekfac_laplace  # noqa: F401
    from ekfac_laplace.evaluation.memory import PeakMemory

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    model, X, y = build(case, spec["n_data"], spec.get("quick", False))
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    stochastic = phase == "fit_mc"
    options = {"cache_budget_bytes": 2**31} if structure == "ekfac_cache" else {}
    la = Laplace(
        model,
        "classification",
        subset_of_weights=spec["subset"],
        hessian_structure=structure.removesuffix("_cache"),
        backend=CurvlinopsGGN,
        backend_kwargs={"stochastic": stochastic},
        **options,
    )
    generator = torch.Generator().manual_seed(0)
    batch = {"glm32": 32, "glm128": 128, "glm512": 512}.get(phase)
    if batch and structure in ("kron", "diag"):
        classes = int(y.max()) + 1
        modules = [m for m in model.modules() if isinstance(m, nn.Linear)]
        owner = model if spec["subset"] == "all" else modules[-1]
        n_params = sum(p.numel() for p in owner.parameters())
        jacobian_bytes = batch * classes * n_params * X.element_size()
        if jacobian_bytes > JACOBIAN_LIMIT_BYTES:
            return {
                "case": case,
                "structure": structure,
                "phase": phase,
                "skipped": f"dense Jacobians need {jacobian_bytes / 2**30:.0f} GiB",
            }
    if not phase.startswith("fit"):
        la.fit(loader)
    actions = {
        "fit_ggn": lambda: la.fit(loader),
        "fit_mc": lambda: la.fit(loader),
        "glm32": lambda: la(X[:32], pred_type="glm", link_approx="probit"),
        "glm128": lambda: la(X[:128], pred_type="glm", link_approx="probit"),
        "glm512": lambda: la(X[:512], pred_type="glm", link_approx="probit"),
        "sample100": lambda: la.sample(100, generator=generator),
        "nn100": lambda: la(X[:128], pred_type="nn", link_approx="mc", n_samples=100),
        "marglik100": lambda: la.optimize_prior_precision(
            method="marglik", n_steps=100
        ),
    }
    # Short phases are noisy: take the best of up to three runs within ~10 s (one
    # run in the --quick smoke test, which checks that everything runs).
    max_runs = 1 if spec.get("quick", False) else 3
    runs: list[float] = []
    with PeakMemory() as memory:
        while len(runs) < max_runs and (not runs or sum(runs) < 10.0):
            start = time.perf_counter()
            actions[phase]()
            runs.append(time.perf_counter() - start)
    seconds = min(runs)
    return {
        "case": case,
        "structure": structure,
        "phase": phase,
        "n_data": spec["n_data"],
        "n_params": la.n_params,
        "seconds": seconds,
        "runs": len(runs),
        "peak_rss_mib": memory.peak_mib,
        "phase_growth_mib": memory.peak_mib - memory.before_mib,
        "peak_is_exact": memory.exact,
    }


def run_isolated(case: str, structure: str, phase: str, spec: dict[str, Any]) -> dict:
    """Run :func:`measure` in a fresh interpreter and parse its JSON line."""
    command = [
        sys.executable,
        __file__,
        "--worker",
        json.dumps([case, structure, phase, spec]),
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:]
        reason = tail[0] if tail else f"exit code {completed.returncode}"
        if completed.returncode in (-9, 137):
            reason = "killed (out of memory)"
        return {"case": case, "structure": structure, "phase": phase, "error": reason}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def markdown_table(rows: list[dict]) -> str:
    """Seconds and peak memory per phase, with EKFAC/Kron ratios."""
    index = {(r["case"], r["structure"], r["phase"]): r for r in rows}
    cases = sorted({r["case"] for r in rows}, key=list(CASES).index)
    phases = [p for p in PHASES + ("glm512",) if any(r["phase"] == p for r in rows)]
    lines = [
        "| case | phase | Kron s | EKFAC s | Diag s | EKFAC/Kron time "
        "| Kron peak MiB | EKFAC peak MiB | EKFAC/Kron peak "
        "| EKFAC+cache/Kron time | EKFAC+cache peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(row: dict | None, key: str, fmt: str = "{:.2f}") -> str:
        if row is None:
            return "–"
        if "error" in row:
            return f"failed: {row['error']}"
        if "skipped" in row:
            return f"skipped ({row['skipped']})"
        return fmt.format(row[key])

    def usable(row: dict | None) -> bool:
        return row is not None and "error" not in row and "skipped" not in row

    for case in cases:
        for phase in phases:
            kron = index.get((case, "kron", phase))
            ekfac = index.get((case, "ekfac", phase))
            diag = index.get((case, "diag", phase))
            cached = index.get((case, "ekfac_cache", phase))
            ratio = growth = cached_ratio = "–"
            if usable(kron) and usable(cached):
                cached_ratio = f"{cached['seconds'] / kron['seconds']:.3f}"
            if usable(kron) and usable(ekfac):
                ratio = f"{ekfac['seconds'] / kron['seconds']:.3f}"
                growth = f"{ekfac['peak_rss_mib'] / kron['peak_rss_mib']:.2f}"
            lines.append(
                f"| {case} | {phase} | {cell(kron, 'seconds')} | "
                f"{cell(ekfac, 'seconds')} | {cell(diag, 'seconds')} | {ratio} | "
                f"{cell(kron, 'peak_rss_mib', '{:.0f}')} | "
                f"{cell(ekfac, 'peak_rss_mib', '{:.0f}')} | {growth} | "
                f"{cached_ratio} | {cell(cached, 'peak_rss_mib', '{:.0f}')} |"
            )
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": int(os.environ.get("BENCH_THREADS", "2")),
        "device": "cpu",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--scaling", action="store_true", help="scaling runs only")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of cases")
    parser.add_argument(
        "--structures", nargs="*", default=list(STRUCTURES), choices=ALL_STRUCTURES
    )
    parser.add_argument("--phases", nargs="*", default=list(PHASES))
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        case, structure, phase, spec = json.loads(args.worker)
        print(json.dumps(measure(case, structure, phase, spec)))
        return 0

    cases = QUICK_CASES if args.quick else CASES
    selected = args.cases or list(cases)
    rows = []
    if args.scaling:
        for n_data in (4096, 8192, 16384):
            spec = {"n_data": n_data, "subset": "all"}
            for structure in ("kron", "ekfac"):
                rows.append(run_isolated("mlp", structure, "fit_ggn", spec))
                print(json.dumps(rows[-1]), flush=True)
        for phase in ("glm32", "glm128", "glm512"):
            rows.append(run_isolated("mlp", "ekfac", phase, CASES["mlp"]))
            print(json.dumps(rows[-1]), flush=True)
    else:
        run = measure if args.quick else run_isolated
        for case in selected:
            for phase in args.phases:
                for structure in args.structures:
                    if structure in FIT_ONLY and not phase.startswith("fit"):
                        continue
                    if structure in cases[case].get("skip", []):
                        continue
                    rows.append(run(case, structure, phase, cases[case]))
                    print(json.dumps(rows[-1]), flush=True)
        print()
        print(markdown_table(rows))
    args.out.mkdir(parents=True, exist_ok=True)
    name = "benchmark_scaling" if args.scaling else "benchmark"
    if args.quick:
        name += "_quick"
    payload = {"machine": machine(), "rows": rows}
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    if not args.scaling:
        command = "python benchmarks/benchmark.py" + (" --quick" if args.quick else "")
        report = (
            f"Machine: {json.dumps(payload['machine'])}\n\n"
            f"Command: `{command}`\n\n{markdown_table(rows)}\n"
        )
        (args.out / f"{name}.md").write_text(report)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
