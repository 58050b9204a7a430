"""Our EKFAC beside curvlinops', nngeometry's and kronfluence's: matrix, time, memory.

:func:`check_agreement` fits every installed peer (:mod:`contenders`) on the same
small bias-free float64 models, data and curvature as ours and compares each layer's
dense EKFAC ``Q diag(λ) Qᵀ`` with ours: the relative Frobenius error, which does not
depend on the choice of eigenvectors. The conventions reconciled are listed in
:mod:`contenders`.

:func:`main` times the fit on the benchmark's MLP and CNN (:func:`benchmark.build`,
batch size 256, float32) for every curvature a peer computes, ours on the same
curvature beside it: cold (the first fit in a fresh worker process) and warm (the
median of the fits after it) seconds and the peak resident memory, each contender in
its own worker, interleaved ``ours, peer, peer, …`` over ``--rounds``, with
per-round ratios peer/ours (:mod:`timing`). Peers that are not installed are rows
saying so.

Usage::

    python benchmarks/peers.py --check    # float64 agreement, seconds
    python benchmarks/peers.py            # timing, writes results/peers.{md,json}
    python benchmarks/peers.py --quick    # tiny smoke run, in one process

Peers: ``pip install ".[bench]"`` (benchmark-only).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # also when this file is imported by its path
    sys.path.insert(0, str(HERE))

import benchmark  # noqa: E402
from contenders import CONTENDERS, CURVATURES, PEERS, Problem, fit_dense  # noqa: E402
from timing import (  # noqa: E402
    THREADS,
    interleave,
    median_of,
    pin_threads,
    ratio,
    run_worker,
    spread,
    time_calls,
)

BATCH_SIZE = 256
WARM_CALLS = 2
CASES: dict[str, dict[str, Any]] = {
    "mlp": {"n_data": 8192},
    "cnn": {"n_data": 4096},
}
QUICK_CASES: dict[str, dict[str, Any]] = {
    "mlp": {"n_data": 64, "quick": True},
    "cnn": {"n_data": 32, "quick": True},
}
#: The agreement check's float64 models (bias-free: see :mod:`contenders`).
AGREEMENT_CASES = ("mlp", "cnn")


# --- agreement ----------------------------------------------------------------------


def agreement_problem(case: str, seed: int = 0) -> Problem:
    """A small bias-free float64 classification problem.

    Args:
        case: ``"mlp"`` (6-5-4-3, N = 40) or ``"cnn"`` (two ``Conv2d`` on 2×5×5,
            a ``Linear`` head, N = 24); batches of 16, the last one short.
        seed: Seed of the weights and data.

    Returns:
        The problem.

    Raises:
        ValueError: For another case.
    """
    torch.manual_seed(seed)
    if case == "mlp":
        model = nn.Sequential(
            nn.Linear(6, 5, bias=False),
            nn.Tanh(),
            nn.Linear(5, 4, bias=False),
            nn.Tanh(),
            nn.Linear(4, 3, bias=False),
        )
        inputs = torch.randn(40, 6, dtype=torch.float64)
    elif case == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3, padding=1, bias=False),
            nn.Tanh(),
            nn.Conv2d(3, 2, 3, stride=2, bias=False),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(2 * 2 * 2, 3, bias=False),
        )
        inputs = torch.randn(24, 2, 5, 5, dtype=torch.float64)
    else:
        raise ValueError(
            f"Unknown agreement case {case!r}; use one of {AGREEMENT_CASES}."
        )
    targets = torch.randint(0, 3, (len(inputs),))
    return Problem(model.to(torch.float64).eval(), inputs, targets, batch_size=16)


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep the objects alive on entry out of the garbage collector's walks.

    kronfluence calls ``gc.collect()`` six times per fit, each walking every live
    object (0.1–0.2 s in a process that imported torch and laplace-torch); frozen,
    they walk only what the block creates. Results are unchanged.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def relative_error(block: Tensor, reference: Tensor) -> float:
    """``‖block − reference‖_F / ‖reference‖_F``."""
    return float(torch.linalg.norm(block - reference) / torch.linalg.norm(reference))


def check_agreement(
    peers: Sequence[str] = PEERS,
    cases: Sequence[str] = AGREEMENT_CASES,
    curvatures: Sequence[str] = CURVATURES,
) -> list[dict[str, Any]]:
    """Every peer's dense EKFAC against ours, layer by layer, in float64.

    Args:
        peers: The peers to check.
        cases: The problems (:func:`agreement_problem`).
        curvatures: The curvatures (each peer is checked on those it computes).

    Returns:
        One row per case, curvature and peer: the relative Frobenius error of each
        layer (``layer_errors``) and their maximum, or ``status: "not installed"``.
    """
    rows = []
    with torch.random.fork_rng(devices=[]), frozen_heap():
        for case in cases:
            problem = agreement_problem(case)
            for curvature in curvatures:
                ours = fit_dense("ours", problem, curvature)
                for name in peers:
                    contender = CONTENDERS[name]
                    if curvature not in contender.curvatures:
                        continue
                    row = {"case": case, "curvature": curvature, "peer": name}
                    if not contender.installed:
                        rows.append({**row, "status": "not installed"})
                        continue
                    blocks = fit_dense(name, problem, curvature)
                    if len(blocks) != len(ours):
                        raise RuntimeError(
                            f"{name} gave {len(blocks)} blocks, ours {len(ours)}."
                        )
                    errors = [relative_error(b, o) for b, o in zip(blocks, ours)]
                    rows.append(
                        {
                            **row,
                            "version": contender.version,
                            "layer_errors": errors,
                            "max_error": max(errors),
                        }
                    )
    return rows


def agreement_table(rows: Sequence[dict[str, Any]]) -> str:
    """The agreement rows as a markdown table."""
    lines = [
        "| case | curvature | peer | max relative error | per layer |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if "status" in row:
            cells = f"{row['status']} | –"
        else:
            per_layer = ", ".join(f"{e:.1e}" for e in row["layer_errors"])
            cells = f"{row['max_error']:.1e} | {per_layer}"
        lines.append(
            f"| {row['case']} | {row['curvature']} | {row['peer']} | {cells} |"
        )
    return "\n".join(lines)


# --- timing -------------------------------------------------------------------------


def measure(
    case: str, curvature: str, contender: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """Time one contender's fit in this process (set-up untimed).

    Args:
        case: ``"mlp"`` or ``"cnn"`` (:func:`benchmark.build`).
        curvature: The curvature.
        contender: ``"ours"`` or a peer.
        spec: ``n_data``, ``quick``, ``warm`` (calls after the first), ``threads``.

    Returns:
        :func:`timing.time_calls`' result and the number of parameters.
    """
    pin_threads(spec["threads"])
    model, inputs, targets = benchmark.build(
        case, spec["n_data"], spec.get("quick", False)
    )
    problem = Problem(model, inputs, targets, BATCH_SIZE)
    with ExitStack() as stack:
        fit = CONTENDERS[contender].prepare(problem, curvature, stack)
        result = time_calls(fit, spec["warm"])
    return {"n_params": sum(p.numel() for p in model.parameters()), **result}


def measure_isolated(
    case: str, curvature: str, contender: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """:func:`measure` in a fresh worker process.

    Args:
        case: The case.
        curvature: The curvature.
        contender: The contender.
        spec: As for :func:`measure`.

    Returns:
        Its result, or ``{"error": reason}``.
    """
    payload = [case, curvature, contender, spec]
    return run_worker(Path(__file__), payload, threads=spec["threads"])


def summarise(
    results: Sequence[dict[str, Any]], case: str, curvature: str, peer: str
) -> dict[str, Any]:
    """One table row: a peer against ours on one case and curvature.

    Args:
        results: The interleaved results of this case and curvature.
        case: The case.
        curvature: The curvature.
        peer: The peer.

    Returns:
        Medians of the seconds and peaks, per-round ratios peer/ours, errors.
    """
    row: dict[str, Any] = {"case": case, "curvature": curvature, "peer": peer}
    for who in (peer, "ours"):
        for key in ("cold", "warm", "peak_mib", "growth_mib"):
            row[f"{'peer' if who == peer else 'ours'}_{key}"] = median_of(
                results, who, key
            )
    for key in ("cold", "warm", "peak_mib", "growth_mib"):
        row[f"{key}_ratio"] = ratio(results, peer, "ours", key)
    errors = {r["contender"]: r["error"] for r in results if "error" in r}
    if errors:
        row["errors"] = errors
    return row


def timing_table(rows: Sequence[dict[str, Any]]) -> str:
    """The timing rows as a markdown table."""
    lines = [
        "| case | curvature | peer | peer cold s | peer warm s | ours cold s "
        "| ours warm s | peer/ours cold | peer/ours warm | peer/ours peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def seconds(value: float) -> str:
        return "–" if math.isnan(value) else f"{value:.3f}"

    for row in rows:
        head = f"| {row['case']} | {row['curvature']} | {row['peer']} |"
        if "status" in row:
            lines.append(f"{head} {row['status']} |" + " – |" * 6)
            continue
        cells = [
            seconds(row[key])
            for key in ("peer_cold", "peer_warm", "ours_cold", "ours_warm")
        ]
        cells += [spread(row[f"{key}_ratio"]) for key in ("cold", "warm")]
        cells.append(spread(row["peak_mib_ratio"]))
        if "errors" in row:
            cells[-1] += " · failed: " + "; ".join(
                f"{who}: {reason}" for who, reason in row["errors"].items()
            )
        lines.append(head + "".join(f" {cell} |" for cell in cells))
    return "\n".join(lines)


def run_timing(
    cases: dict[str, dict[str, Any]],
    curvatures: Sequence[str],
    peers: Sequence[str],
    rounds: int,
    threads: int,
    isolated: bool,
    warm_calls: int = 2,
    once: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Interleave ours with the peers on every case and curvature.

    Args:
        cases: Case name to ``n_data`` (and ``quick``).
        curvatures: The curvatures.
        peers: The peers.
        rounds: Rounds of ``ours, peer, peer, …``.
        threads: Pinned threads per contender.
        isolated: Each measurement in a fresh worker (else in this process).
        warm_calls: Calls after the first in each worker.
        once: Peers measured by one cold call in the first round only (too slow
            to repeat: kronfluence takes 80 s a fit on the MLP here).

    Returns:
        The table rows and every raw measurement.
    """
    rows: list[dict[str, Any]] = []
    raw: list[dict[str, Any]] = []
    for case, case_spec in cases.items():
        warm = 1 if case_spec.get("quick", False) else warm_calls
        spec = {**case_spec, "warm": warm, "threads": threads}
        for curvature in curvatures:
            able = [p for p in peers if curvature in CONTENDERS[p].curvatures]
            present = [p for p in able if CONTENDERS[p].installed]
            for peer in able:
                if peer not in present:
                    row = {"case": case, "curvature": curvature, "peer": peer}
                    rows.append({**row, "status": "not installed"})
            if not present:
                continue
            run = measure_isolated if isolated else measure

            def one(contender: str, index: int) -> dict[str, Any]:
                if contender in once:  # slow: its first call, in the first round
                    if index:
                        return {"skipped": "measured once (--once)"}
                    return run(case, curvature, contender, {**spec, "warm": 0})  # noqa: B023
                return run(case, curvature, contender, spec)  # noqa: B023

            def progress(result: dict[str, Any]) -> None:
                line = {"case": case, "curvature": curvature, **result}  # noqa: B023
                print(json.dumps(line), flush=True)

            results = interleave(["ours", *present], rounds, one, progress)
            raw += [{"case": case, "curvature": curvature, **r} for r in results]
            rows += [summarise(results, case, curvature, peer) for peer in present]
    return rows, raw


def versions() -> dict[str, str | None]:
    """The installed versions of torch and every contender."""
    found = {name: c.version for name, c in CONTENDERS.items()}
    return {"torch": torch.__version__, **found}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="float64 agreement only")
    parser.add_argument("--quick", action="store_true", help="tiny run, one process")
    parser.add_argument("--cases", nargs="*", default=None)
    parser.add_argument("--curvatures", nargs="*", default=list(CURVATURES))
    parser.add_argument("--peers", nargs="*", default=list(PEERS), choices=PEERS)
    parser.add_argument("--rounds", type=int, default=None, help="3; 1 with --quick")
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument(
        "--warm", type=int, default=WARM_CALLS, help="calls after the first"
    )
    parser.add_argument(
        "--once", nargs="*", default=[], choices=PEERS, help="peers timed once, cold"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = " ".join(["python benchmarks/peers.py", *given])

    if args.worker:
        case, curvature, contender, spec = json.loads(args.worker)
        print(json.dumps(measure(case, curvature, contender, spec)))
        return 0

    args.out.mkdir(parents=True, exist_ok=True)
    machine = {**benchmark.machine(), "threads": args.threads}
    threads_before = torch.get_num_threads()
    if args.check:
        pin_threads(args.threads)
        try:
            cases = args.cases or AGREEMENT_CASES
            rows = check_agreement(args.peers, cases, args.curvatures)
        finally:
            torch.set_num_threads(threads_before)
        table = agreement_table(rows)
        print(table)
        payload = {"machine": machine, "versions": versions(), "rows": rows}
        (args.out / "peers_agreement.json").write_text(json.dumps(payload, indent=2))
        (args.out / "peers_agreement.md").write_text(
            f"Command: `{command}`\n\nVersions: {json.dumps(versions())}\n\n{table}\n"
        )
        return 0

    cases = QUICK_CASES if args.quick else CASES
    cases = {name: cases[name] for name in (args.cases or cases)}
    rounds = args.rounds or (1 if args.quick else 3)
    try:
        rows, raw = run_timing(
            cases,
            args.curvatures,
            args.peers,
            rounds,
            args.threads,
            not args.quick,
            args.warm,
            args.once,
        )
    finally:
        torch.set_num_threads(threads_before)  # --quick pins this process
    table = timing_table(rows)
    print()
    print(table)
    name = "peers_quick" if args.quick else "peers"
    payload = {
        "machine": machine,
        "versions": versions(),
        "batch_size": BATCH_SIZE,
        "rounds": rounds,
        "warm_calls": 1 if args.quick else args.warm,
        "once": args.once,
        "rows": rows,
        "measurements": raw,
    }
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=2))
    where = "in one process" if args.quick else "each in a fresh process"
    (args.out / f"{name}.md").write_text(
        f"Machine: {json.dumps(machine)}\n\nVersions: {json.dumps(versions())}\n\n"
        f"Command: `{command}` (batch size {BATCH_SIZE}, float32, rounds: {rounds}; "
        f"contenders {where}; cold: the first fit, warm: the median of the next "
        f"{payload['warm_calls']}; ratios peer/ours: the median (min–max) over the "
        f"rounds; peak: resident memory, torch's own included)\n\n{table}\n"
    )
    failed = any("errors" in row for row in rows)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
