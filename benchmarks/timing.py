"""How the benchmarks time things: pinned threads, fresh processes, interleaving.

On a shared machine one timing means little: another process, a frequency change or
the page cache moves it by tens of percent. Every benchmark here therefore

* pins the thread count (``OMP_NUM_THREADS``, ``MKL_NUM_THREADS`` and
  ``torch.set_num_threads``, one inter-op thread) in every worker process;
* runs each contender's measurement in a fresh worker process, so that neither its
  allocations nor its warm caches leak into another's;
* interleaves the contenders, ``A B, B A, …``, for ``rounds`` rounds, so that a slow
  spell of the machine hits all of them alike;
* times the first call in the process (``cold``: lazy initialisation, first-touch
  allocations, kernel selection) apart from the median of the calls after it
  (``warm``), with the objects alive before the first call frozen out of the
  garbage collector (:func:`gc.freeze`);
* reports each ratio as the median over the rounds of the per-round ratios, with
  their minimum and maximum (the spread).

A worker is ``python <script> --worker '<json>'``; it prints one JSON line last.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

THREADS = int(os.environ.get("BENCH_THREADS", "2"))


def pin_threads(threads: int = THREADS) -> None:
    """Pin this process's thread pools (call before any work).

    Args:
        threads: Intra-op threads.
    """
    import torch

    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set, or work already ran
        pass


def worker_env(threads: int = THREADS) -> dict[str, str]:
    """The environment of a worker process, with its thread pools pinned.

    Args:
        threads: Intra-op threads.

    Returns:
        A copy of this environment with the thread variables set.
    """
    env = dict(os.environ)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    env["BENCH_THREADS"] = str(threads)
    return env


def time_calls(
    action: Callable[[], Any], warm: int, device: str = "cpu"
) -> dict[str, Any]:
    """Time the first call and ``warm`` calls after it, with the peak memory.

    Args:
        action: What to time.
        warm: Number of calls after the first.
        device: ``"cuda"`` synchronises after each call and adds the peak of
            allocated GPU memory (``cuda_peak_mib``).

    Returns:
        ``cold`` and ``warm`` seconds (the median of the warm calls), every
        call's seconds, the peak resident memory over all calls and its growth
        over the memory before them, in MiB.
    """
    import torch

    from ekfac_laplace.evaluation.memory import PeakMemory

    # Objects alive now are moved out of the collector's reach, so that a library
    # calling gc.collect() (kronfluence does, several times a fit) pays for its own
    # garbage only, whatever else this process has imported.
    gc.collect()
    gc.freeze()
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    seconds = []
    with PeakMemory() as memory:
        for _ in range(1 + warm):
            start = time.perf_counter()
            action()
            if cuda:
                torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
    extra = {"cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}
    return {
        **extra,
        "cold": seconds[0],
        "warm": statistics.median(seconds[1:]) if warm else None,
        "calls": seconds,
        "peak_mib": memory.peak_mib,
        "growth_mib": memory.growth_mib,
    }


def run_worker(
    script: Path,
    payload: Any,
    threads: int = THREADS,
    extra_env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run ``script --worker payload`` in a fresh process; parse its last line.

    Args:
        script: The benchmark script.
        payload: JSON-serialisable arguments of the worker.
        threads: Its pinned thread count.
        extra_env: More environment variables (``PYTHONPATH`` of an older version).

    Returns:
        The worker's JSON result, or ``{"error": reason}``.
    """
    command = [sys.executable, str(script), "--worker", json.dumps(payload)]
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        env={**worker_env(threads), **(extra_env or {})},
    )
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-1:]
        reason = tail[0] if tail else f"exit code {completed.returncode}"
        if completed.returncode in (-9, 137):
            reason = "killed (out of memory)"
        return {"error": reason}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def interleave(
    contenders: Sequence[str],
    rounds: int,
    measure: Callable[[str, int], dict[str, Any]],
    report: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Measure the contenders ``A B, B A, A B, …`` for ``rounds`` rounds.

    The order turns round every other round, so that a bias of the position in a
    round (the second worker of a pair finds the machine warmer, or slower) falls
    on every contender alike. With a fixed order, two commits whose sampling code
    is the same measured a warm ratio of 1.09 (1.04–1.26) for 100 posterior
    samples, and one commit against itself 1.03 (0.93–1.05).

    Args:
        contenders: Their names.
        rounds: How many times each is measured.
        measure: ``(contender, round) -> result``.
        report: Called with each result as it arrives (progress).

    Returns:
        The results, each with ``contender`` and ``round`` added.
    """
    results = []
    for index in range(rounds):
        order = contenders if index % 2 == 0 else list(reversed(contenders))
        for contender in order:
            result = {"contender": contender, "round": index}
            result.update(measure(contender, index))
            results.append(result)
            if report is not None:
                report(result)
    return results


def ratio(
    results: Sequence[dict[str, Any]], numerator: str, denominator: str, key: str
) -> dict[str, float] | None:
    """The per-round ratios ``numerator / denominator`` of ``key``, summarised.

    Args:
        results: From :func:`interleave` (rows of one case and phase).
        numerator: A contender.
        denominator: Another.
        key: ``"cold"``, ``"warm"`` or ``"peak_mib"``.

    Returns:
        ``median``, ``min``, ``max`` and the ``rounds`` paired, or ``None`` if no
        round has both.
    """
    by_round: dict[int, dict[str, float]] = {}
    for row in results:
        value = row.get(key)
        if value is not None and "error" not in row:
            by_round.setdefault(row["round"], {})[row["contender"]] = value
    ratios = [
        values[numerator] / values[denominator]
        for values in by_round.values()
        if numerator in values and values.get(denominator)
    ]
    if not ratios:
        return None
    return {
        "median": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "rounds": len(ratios),
    }


def median_of(results: Sequence[dict[str, Any]], contender: str, key: str) -> float:
    """The median of ``key`` over a contender's rounds (``nan`` if none).

    Args:
        results: From :func:`interleave`.
        contender: The contender.
        key: The field.

    Returns:
        The median.
    """
    values = [
        row[key]
        for row in results
        if row["contender"] == contender and row.get(key) is not None
    ]
    return statistics.median(values) if values else float("nan")


def spread(summary: dict[str, float] | None, digits: int = 2) -> str:
    """``median (min–max)`` of a :func:`ratio` summary, for a table cell.

    Args:
        summary: A ratio summary, or ``None``.
        digits: Decimals.

    Returns:
        The cell text (``–`` without a summary).
    """
    if summary is None:
        return "–"
    f = f"{{:.{digits}f}}"
    return (
        f"{f.format(summary['median'])} "
        f"({f.format(summary['min'])}–{f.format(summary['max'])})"
    )


def interleaved_parser(
    description: str, cases: Sequence[str], phases: Sequence[str]
) -> argparse.ArgumentParser:
    """The options of a script that interleaves contenders in fresh workers.

    ``--cases``, ``--phases``, ``--rounds``, ``--warm``, ``--out`` and the hidden
    ``--worker`` (the JSON arguments of one measurement, for :func:`worker_main`).

    Args:
        description: The script's one-line description.
        cases: The default cases.
        phases: The default phases.

    Returns:
        The parser; a script adds its own options.
    """
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cases", nargs="*", default=list(cases))
    parser.add_argument("--phases", nargs="*", default=list(phases))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser


def worker_main(args: argparse.Namespace, measure: Callable[..., Any]) -> bool:
    """Run one measurement and print it as JSON if this process is a worker.

    Args:
        args: The parsed options of :func:`interleaved_parser`.
        measure: The measurement, called with the worker's JSON arguments.

    Returns:
        Whether this process was a worker (the script then exits).
    """
    if not args.worker:
        return False
    print(json.dumps(measure(*json.loads(args.worker))))
    return True
