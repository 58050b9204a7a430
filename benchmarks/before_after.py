"""Our fit before and after a change, interleaved in one run (a performance PR's table).

The earlier version is checked out into a temporary git worktree and imported from
there (``PYTHONPATH``) by its workers; the current one from this checkout. Both fit
the same case of :mod:`benchmark` with the same Laplace settings; each measurement is
a fresh worker, the versions alternate ``before after before after …`` (:mod:`timing`),
and the table gives each version's cold and warm seconds and peak memory with the
per-round ratio after/before, median (min–max).

Usage::

    python benchmarks/before_after.py --ref 0e2003d --cases cnn --phases fit_ggn fit_mc
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


def measure(case: str, phase: str, warm: int) -> dict[str, Any]:
    """One EKFAC fit phase of a benchmark case in this process (a worker).

    Args:
        case: A :data:`benchmark.CASES` key.
        phase: ``fit_ggn`` or ``fit_mc``.
        warm: Calls after the first.

    Returns:
        :func:`timing.time_calls`' result and the imported package's location.
    """
    import benchmark

    import ekfac_laplace

    result = benchmark.measure(case, "ekfac", phase, benchmark.CASES[case], warm)
    return {**result["phases"][phase], "package": str(Path(ekfac_laplace.__file__))}


def main(argv: list[str] | None = None) -> int:
    parser = interleaved_parser(__doc__.splitlines()[0], ["cnn"], ["fit_ggn", "fit_mc"])
    parser.add_argument("--ref", help="the earlier commit (required)")
    args = parser.parse_args(argv)
    if worker_main(args, measure):
        return 0
    if not args.ref:
        parser.error("--ref is required: the commit to compare with")

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        before = Path(scratch) / "before"
        subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "worktree",
                "add",
                "--detach",
                str(before),
                args.ref,
            ],
            check=True,
            capture_output=True,
        )
        try:
            paths = {"before": str(before), "after": str(REPO)}
            for case in args.cases:
                for phase in args.phases:

                    def one(version: str, _round: int, case=case, phase=phase) -> dict:
                        return run_worker(
                            Path(__file__),
                            [case, phase, args.warm],
                            extra_env={"PYTHONPATH": paths[version]},
                        )

                    results = interleave(["before", "after"], args.rounds, one, print)
                    rows += [{"case": case, "phase": phase, **r} for r in results]
        finally:
            subprocess.run(
                ["git", "-C", str(REPO), "worktree", "remove", "--force", str(before)],
                check=False,
                capture_output=True,
            )
    lines = [
        f"Before: `{args.ref}`; after: the working tree. Rounds: {args.rounds}, "
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
