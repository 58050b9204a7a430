"""Our EKFAC before and after a change, interleaved in one run (a PR's table).

The earlier version is checked out into a temporary git worktree and imported from
there (``PYTHONPATH``) by its workers; the current one from this checkout. Both run
the same phase of the same case with the same Laplace settings; each measurement is
a fresh worker, the versions alternate ``before after before after …`` (:mod:`timing`),
and the table gives each version's cold and warm seconds and peak memory with the
per-round ratio after/before, median (min–max).

Cases: :mod:`benchmark`'s (``mlp``, ``cnn``, …) with the phases ``fit_ggn``,
``fit_mc``, ``glm32``, ``sample100``, ``nn100``, ``marglik100``; and
:mod:`lora_gpt2`'s, prefixed ``lora:`` (``lora:l4_t128``), with ``fit_ggn``,
``fit_mc``, ``glm8``, ``sample100``, ``marglik100``. A phase a case does not have is
left out of its rows.

Usage::

    python benchmarks/before_after.py --ref 0e2003d --cases cnn --phases fit_ggn fit_mc
    python benchmarks/before_after.py --ref 0e2003d --cases mlp lora:l4_t128 \
        --phases fit_ggn glm32 glm8 sample100
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from timing import (  # noqa: E402
    interleave,
    interleaved_parser,
    median_of,
    ratio,
    run_worker,
    spread,
    worker_main,
)

REPO = HERE.parent


LORA = "lora:"


def has_phase(case: str, phase: str) -> bool:
    """Whether the case's benchmark has the phase."""
    if case.startswith(LORA):
        import lora_gpt2

        return phase in lora_gpt2.PHASES
    import benchmark

    return phase in benchmark.ALL_PHASES


def measure(case: str, phase: str, warm: int) -> dict[str, Any]:
    """One EKFAC phase of a benchmark case in this process (a worker).

    Args:
        case: A :data:`benchmark.CASES` key, or ``lora:`` and a
            :data:`lora_gpt2.CASES` key.
        phase: One of that benchmark's phases.
        warm: Calls after the first.

    Returns:
        :func:`timing.time_calls`' result and the imported package's location.
    """
    import ekfac_laplace

    package = {"package": str(Path(ekfac_laplace.__file__))}
    if case.startswith(LORA):
        import lora_gpt2

        return {**lora_gpt2.measure(case[len(LORA) :], "ekfac", phase, warm), **package}
    import benchmark

    spec = {**benchmark.CASES[case], "phases": [phase]}
    group = phase
    if phase not in benchmark.FIT_PHASES:
        groups = benchmark.POST_GROUPS.items()
        group = next(g for g, members in groups if phase in members)
    result = benchmark.measure(case, "ekfac", group, spec, warm)
    return {**result["phases"][phase], **package}


def main(argv: list[str] | None = None) -> int:
    parser = interleaved_parser(__doc__.splitlines()[0], ["cnn"], ["fit_ggn", "fit_mc"])
    parser.add_argument("--ref", help="the earlier commit (required)")
    parser.add_argument(
        "--fixed-mmap",
        action="store_true",
        help="run the workers with glibc's mmap threshold fixed (128 KiB): every "
        "large tensor is then mapped and unmapped at once, so that the peak "
        "resident memory is that of the live tensors and repeats to the MiB "
        "(without it, glibc's adaptive threshold moves the peak by ±50 MiB from "
        "run to run); it slows the fit down, so time with it off",
    )
    parser.add_argument(
        "--after",
        help="the later commit (default: the working tree, which must then stay "
        "unchanged while this runs)",
    )
    args = parser.parse_args(argv)
    if worker_main(args, measure):
        return 0
    if not args.ref:
        parser.error("--ref is required: the commit to compare with")

    rows: list[dict[str, Any]] = []
    refs = {"before": args.ref, "after": args.after}
    malloc = {"MALLOC_MMAP_THRESHOLD_": "131072"} if args.fixed_mmap else {}
    with tempfile.TemporaryDirectory() as scratch:
        paths = {"after": str(REPO)}
        try:  # a worktree added before a failure is removed too
            for version, ref in refs.items():
                if ref:
                    paths[version] = str(Path(scratch) / version)
                    subprocess.run(
                        ["git", "-C", str(REPO), "worktree", "add", "--detach"]
                        + [paths[version], ref],
                        check=True,
                        capture_output=True,
                    )
            for case in args.cases:
                for phase in [p for p in args.phases if has_phase(case, p)]:

                    def one(version: str, _round: int, case=case, phase=phase) -> dict:
                        return run_worker(
                            Path(__file__),
                            [case, phase, args.warm],
                            extra_env={"PYTHONPATH": paths[version], **malloc},
                        )

                    results = interleave(["before", "after"], args.rounds, one, print)
                    rows += [{"case": case, "phase": phase, **r} for r in results]
        finally:
            for path in paths.values():
                if path != str(REPO):
                    subprocess.run(
                        ["git", "-C", str(REPO), "worktree", "remove", "--force", path],
                        check=False,
                        capture_output=True,
                    )
    lines = [
        f"Before: `{args.ref}`; after: `{args.after or 'the working tree'}`. "
        + ("glibc's mmap threshold fixed (peak memory exact). " if malloc else "")
        + f"Rounds: {args.rounds}, "
        f"warm calls: {args.warm}.",
        "",
        "| case | phase | before cold s | after cold s | after/before cold "
        "| before warm s | after warm s | after/before warm "
        "| before peak MiB | after peak MiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for case in args.cases:
        for phase in args.phases:
            subset = [r for r in rows if r["case"] == case and r["phase"] == phase]
            if not subset:
                continue
            lines.append(
                f"| {case} | {phase} | {median_of(subset, 'before', 'cold'):.3f} | "
                f"{median_of(subset, 'after', 'cold'):.3f} | "
                f"{spread(ratio(subset, 'after', 'before', 'cold'))} | "
                f"{median_of(subset, 'before', 'warm'):.3f} | "
                f"{median_of(subset, 'after', 'warm'):.3f} | "
                f"{spread(ratio(subset, 'after', 'before', 'warm'))} | "
                f"{median_of(subset, 'before', 'peak_mib'):.0f} | "
                f"{median_of(subset, 'after', 'peak_mib'):.0f} |"
            )
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "before_after.md").write_text(table + "\n")
    (args.out / "before_after.json").write_text(json.dumps(rows, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
