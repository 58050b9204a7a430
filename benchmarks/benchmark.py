"""Time and memory of EKFACLaplace against laplace-torch's KronLaplace (and Diag).

Measured the way :mod:`timing` describes: threads pinned, every measurement in a
fresh worker process, the contenders interleaved ``Kron EKFAC Kron EKFAC …`` over
``--rounds`` rounds, the first call in the worker (``cold``) apart from the median
of ``--warm`` calls after it (``warm``), and each ratio EKFAC/Kron reported as the
median over the rounds with its spread (min–max). A worker measures one fit
(``fit_ggn``: the exact GGN, ``fit_mc``: one Monte-Carlo label) or, after an
untimed Monte-Carlo fit, every other phase in turn (``glm32``, ``sample100``,
``nn100``, ``marglik100``; ``glm128`` on request, in a worker of its own); the peak
resident memory is reset before each phase.

Usage::

    python benchmarks/benchmark.py                  # full run, writes results/*
    python benchmarks/benchmark.py --quick          # tiny smoke run, one process
    python benchmarks/benchmark.py --device cuda    # on a GPU (see docs)

Timings are comparable only within one run: compare the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py, as a worker

# "diag" (laplace-torch's DiagLaplace, for context) is available with --structures;
# it is not in the default run: its exact diagonal GGN takes minutes per fit at these
# sizes and every phase needs a fit.
STRUCTURES = ("kron", "ekfac")
#: EKFAC with other options: a larger cache, exact blocks of the tensors up to 500
#: entries, of every tensor up to the MLP's output weight (10 × 512).
VARIANTS = {
    "ekfac_cache": {"cache_budget_bytes": 2**31},
    "ekfac_dense500": {"dense_blocks_up_to": 500},
    "ekfac_dense5120": {"dense_blocks_up_to": 5120},
    **{f"ekfac_lr{k}": {"correction_rank": k} for k in (4, 8, 16, 32)},
}
ALL_STRUCTURES = (*STRUCTURES, *VARIANTS, "diag")
FIT_ONLY = {"ekfac_cache"}  # the cache only changes the fit
PHASES = ("fit_ggn", "fit_mc", "glm32", "sample100", "nn100", "marglik100")
# laplace-torch's GLM at batch 128 takes half a minute a call on the MLP (dense
# Jacobians) and was killed for memory on the CNN: available with --phases.
ALL_PHASES = (*PHASES, "glm128")

CASES: dict[str, dict[str, Any]] = {
    "mlp": {"n_data": 8192, "subset": "all"},
    "cnn": {"n_data": 4096, "subset": "all"},
    # laplace-torch's GGN needs 1,000 backward passes per batch here (37 s a fit at
    # N = 1,024); its diagonal GGN as many, per parameter group.
    "last_layer_1000": {"n_data": 1024, "subset": "last_layer", "skip": ["diag"]},
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


FIT_PHASES = ("fit_ggn", "fit_mc")
# The phases after a fit, by worker: laplace-torch's GLM at batch 128 alone, since
# it can be killed for memory (it was on the CNN, on a 24 GiB machine), which
# would lose the other phases' numbers of that worker.
POST_GROUPS = {
    "post": ("glm32", "sample100", "nn100", "marglik100"),
    "glm128": ("glm128",),
}


def make_laplace(model: nn.Module, case: str, structure: str, stochastic: bool, spec):
    """The Laplace object of a contender (laplace-torch's curvlinops backend)."""
    from laplace import Laplace
    from laplace.curvature import CurvlinopsGGN

    import ekfac_laplace  # noqa: F401

    options = VARIANTS.get(structure, {})
    return Laplace(
        model,
        "classification",
        subset_of_weights=spec["subset"],
        hessian_structure=structure.split("_")[0],
        backend=CurvlinopsGGN,
        backend_kwargs={"stochastic": stochastic},
        **options,
    )


def too_large(case: str, structure: str, phase: str, spec, model, X, y) -> str | None:
    """Why laplace-torch's dense-Jacobian GLM is not attempted, if it is not."""
    batch = {"glm32": 32, "glm128": 128}.get(phase)
    if not batch or structure not in ("kron", "diag"):
        return None
    classes = int(y.max()) + 1
    modules = [m for m in model.modules() if isinstance(m, nn.Linear)]
    owner = model if spec["subset"] == "all" else modules[-1]
    n_params = sum(p.numel() for p in owner.parameters())
    jacobian_bytes = batch * classes * n_params * X.element_size()
    if jacobian_bytes > JACOBIAN_LIMIT_BYTES:
        return f"dense Jacobians need {jacobian_bytes / 2**30:.0f} GiB"
    return None


def measure(
    case: str,
    structure: str,
    group: str,
    spec: dict[str, Any],
    warm: int,
    device: str = "cpu",
) -> dict[str, Any]:
    """One worker's measurements: a fit phase, or every phase after a fit.

    Args:
        case: The model and data.
        structure: ``kron``, ``ekfac``, ``ekfac_cache`` or ``diag``.
        group: ``fit_ggn``, ``fit_mc``, or a group of phases after a fit
            (:data:`POST_GROUPS`).
        spec: The case's size and subset.
        warm: Calls after the first.
        device: ``cpu`` or ``cuda``.

    Returns:
        ``{"phases": {phase: timing}}`` (a timing is :func:`timing.time_calls`'s,
        or ``{"skipped": reason}``) and the number of parameters.
    """
    from timing import pin_threads, time_calls

    pin_threads()
    model, X, y = build(case, spec["n_data"], spec.get("quick", False))
    model, X, y = model.to(device), X.to(device), y.to(device)
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    la = make_laplace(model, case, structure, group == "fit_mc", spec)
    if group in FIT_PHASES:
        phases = {group: time_calls(lambda: la.fit(loader), warm, device)}
        return {"phases": phases, "n_params": la.n_params}
    stochastic = make_laplace(model, case, structure, True, spec)
    stochastic.fit(loader)  # the phases' cost does not depend on the curvature type:
    la = stochastic  # the cheaper Monte-Carlo fit (Kron's GGN fit can take minutes)
    generator = torch.Generator(device=device).manual_seed(0)
    actions = {
        "glm32": lambda: la(X[:32], pred_type="glm", link_approx="probit"),
        "glm128": lambda: la(X[:128], pred_type="glm", link_approx="probit"),
        "sample100": lambda: la.sample(100, generator=generator),
        "nn100": lambda: la(X[:128], pred_type="nn", link_approx="mc", n_samples=100),
        "marglik100": lambda: la.optimize_prior_precision(
            method="marglik", n_steps=100
        ),
    }
    phases: dict[str, Any] = {}
    for phase in POST_GROUPS[group]:
        if phase not in spec.get("phases", PHASES):
            continue
        reason = too_large(case, structure, phase, spec, model, X, y)
        if reason:
            phases[phase] = {"skipped": reason}
            continue
        phases[phase] = time_calls(actions[phase], warm, device)
    return {"phases": phases, "n_params": la.n_params}


def groups(phases: list[str]) -> list[str]:
    """The workers needed for the phases: one per fit phase, one per post group."""
    needed = [p for p in FIT_PHASES if p in phases]
    needed += [g for g, members in POST_GROUPS.items() if set(members) & set(phases)]
    return needed


def flatten(case: str, group: str, results: list[dict[str, Any]]) -> list[dict]:
    """One row per (contender, round, phase) from the workers' results."""
    rows = []
    for result in results:
        base = {
            "case": case,
            "contender": result["contender"],
            "round": result["round"],
        }
        if "error" in result:  # every phase of the worker failed with it
            for phase in POST_GROUPS.get(group, (group,)):
                rows.append({**base, "phase": phase, "error": result["error"]})
            continue
        for phase, timing in result["phases"].items():
            rows.append({**base, "phase": phase, **timing})
    return rows


def markdown_table(rows: list[dict]) -> str:
    """Seconds, peak memory and X/Kron ratios: median (min–max) over the rounds."""
    from timing import median_of, ratio, spread

    lines = [
        "| case | phase | X | Kron cold s | X cold s | X/Kron cold "
        "| Kron warm s | X warm s | X/Kron warm "
        "| Kron peak MiB | X peak MiB | X/Kron peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    cases = list(dict.fromkeys(r["case"] for r in rows))
    phases = [p for p in ALL_PHASES if any(r["phase"] == p for r in rows)]
    others = [c for c in ALL_STRUCTURES if c != "kron"]
    for case in cases:
        for phase in phases:
            subset = [r for r in rows if r["case"] == case and r["phase"] == phase]
            present = {r["contender"] for r in subset}

            def value(contender: str, key: str, digits: int, subset=subset) -> str:
                found = median_of(subset, contender, key)
                return "–" if found != found else f"{found:.{digits}f}"

            for other in [c for c in others if c in present]:
                note = ""
                skipped = [r for r in subset if "skipped" in r]
                errors = [r for r in subset if "error" in r]
                if skipped:
                    note = f" (Kron skipped: {skipped[0]['skipped']})"
                if errors:
                    note += f" (failed: {errors[0]['error']})"
                name = {"ekfac": "EKFAC", "ekfac_cache": "EKFAC+cache"}.get(
                    other, other
                )
                lines.append(
                    f"| {case} | {phase}{note} | {name} | {value('kron', 'cold', 3)} | "
                    f"{value(other, 'cold', 3)} | "
                    f"{spread(ratio(subset, other, 'kron', 'cold'))} | "
                    f"{value('kron', 'warm', 3)} | {value(other, 'warm', 3)} | "
                    f"{spread(ratio(subset, other, 'kron', 'warm'))} | "
                    f"{value('kron', 'peak_mib', 0)} | {value(other, 'peak_mib', 0)} | "
                    f"{spread(ratio(subset, other, 'kron', 'peak_mib'))} |"
                )
    return "\n".join(lines)


def run_to_run(first: list[dict], second: list[dict]) -> str:
    """Two runs' EKFAC/Kron ratios side by side, and how far apart they are.

    Args:
        first: The rows of one run's JSON.
        second: The rows of another.

    Returns:
        A markdown table: per case and phase, the median ratio (cold, warm, peak)
        of each run and ``second / first − 1``.
    """
    from timing import ratio

    lines = [
        "| case | phase | cold: run 1 | run 2 | change | warm: run 1 | run 2 "
        "| change | peak: run 1 | run 2 | change |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = list(dict.fromkeys((r["case"], r["phase"]) for r in first))
    for case, phase in keys:
        cells = []
        for key in ("cold", "warm", "peak_mib"):
            found = []
            for rows in (first, second):
                subset = [r for r in rows if r["case"] == case and r["phase"] == phase]
                found.append(ratio(subset, "ekfac", "kron", key))
            if None in found:
                cells += ["–", "–", "–"]
                continue
            a, b = found[0]["median"], found[1]["median"]
            cells += [f"{a:.3f}", f"{b:.3f}", f"{100 * (b / a - 1):+.1f}%"]
        lines.append(f"| {case} | {phase} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine(device: str = "cpu") -> dict[str, Any]:
    """What the numbers were measured on."""
    from timing import THREADS

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "threads": THREADS,
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--cases", nargs="*", default=None, help="subset of cases")
    parser.add_argument(
        "--structures", nargs="*", default=list(STRUCTURES), choices=ALL_STRUCTURES
    )
    parser.add_argument(
        "--phases", nargs="*", default=list(PHASES), choices=list(ALL_PHASES)
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--warm", type=int, default=2, help="calls after the first")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default=None, help="file name of the results")
    parser.add_argument(
        "--compare",
        nargs=2,
        type=Path,
        metavar=("RUN1", "RUN2"),
        help="print two runs' ratios side by side (their JSON files) and exit",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from timing import interleave, run_worker

    if args.worker:
        print(json.dumps(measure(*json.loads(args.worker))))
        return 0
    if args.compare:
        first, second = (json.loads(path.read_text())["rows"] for path in args.compare)
        print(run_to_run(first, second))
        return 0

    cases = QUICK_CASES if args.quick else CASES
    rounds, warm = (1, 1) if args.quick else (args.rounds, args.warm)
    rows: list[dict] = []
    for case in args.cases or list(cases):
        spec = {**cases[case], "phases": args.phases}
        contenders = [s for s in args.structures if s not in spec.get("skip", [])]
        for group in groups(args.phases):
            entrants = [
                c for c in contenders if group in FIT_PHASES or c not in FIT_ONLY
            ]

            def one(
                contender: str, _round: int, group=group, case=case, spec=spec
            ) -> dict[str, Any]:
                payload = [case, contender, group, spec, warm, args.device]
                if args.quick:
                    return measure(*payload)
                return run_worker(Path(__file__), payload)

            results = interleave(
                entrants,
                rounds,
                one,
                lambda r, case=case, group=group: print(
                    json.dumps({"case": case, "group": group, **r}), flush=True
                ),
            )
            rows.extend(flatten(case, group, results))
    table = markdown_table(rows)
    print()
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    name = args.name or ("benchmark_quick" if args.quick else "benchmark")
    payload = {
        "machine": machine(args.device),
        "rounds": rounds,
        "warm": warm,
        "rows": rows,
    }
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    command = "python benchmarks/benchmark.py" + " ".join(
        [""] + (argv if argv is not None else sys.argv[1:])
    )
    (args.out / f"{name}.md").write_text(
        f"Machine: {json.dumps(payload['machine'])}\n\nCommand: `{command}`\n\n"
        f"Rounds: {rounds}, warm calls: {warm}.\n\n{table}\n"
    )
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
