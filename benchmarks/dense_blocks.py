"""What exact blocks and low-rank corrections cost against plain EKFAC.

The benchmark's MLP (784-512-512-10) and CNN, interleaved in fresh workers
(:mod:`timing`): the exact-GGN fit, the GLM predictive of 32 inputs and 100 samples,
with exact blocks of every tensor up to 500 entries, and (MLP) up to 5,120, which
takes in its output weight; and with the low-rank correction of rank 4, 8, 16 and
32 (``correction_rank``, the default ``correction_examples`` of 2,048). Prints and
writes each phase's ratio to plain EKFAC.

Usage::

    python benchmarks/dense_blocks.py --rounds 3
    python benchmarks/dense_blocks.py --variants ekfac_lr8 --phases fit_ggn glm32
"""

from __future__ import annotations

import json
import sys
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

LOW_RANK = tuple(f"ekfac_lr{k}" for k in (4, 8, 16, 32))
CONTENDERS = {
    "mlp": ("ekfac", "ekfac_dense500", "ekfac_dense5120", *LOW_RANK),
    "cnn": ("ekfac", "ekfac_dense500", *LOW_RANK),
}
PHASES = ("fit_ggn", "glm32", "sample100")


def measure(case: str, structure: str, phase: str, warm: int) -> dict[str, Any]:
    """One phase of one contender in this (fresh) process."""
    import benchmark
    import torch
    from timing import pin_threads, time_calls
    from torch.utils.data import DataLoader, TensorDataset

    pin_threads()
    spec = benchmark.CASES[case]
    model, X, y = benchmark.build(case, spec["n_data"])
    loader = DataLoader(TensorDataset(X, y), batch_size=256)
    la = benchmark.make_laplace(model, case, structure, False, spec)
    if phase == "fit_ggn":
        return time_calls(lambda: la.fit(loader), warm)
    la.fit(loader)
    generator = torch.Generator().manual_seed(0)
    actions = {
        "glm32": lambda: la(X[:32], pred_type="glm", link_approx="probit"),
        "sample100": lambda: la.sample(100, generator=generator),
    }
    return time_calls(actions[phase], warm)


def main(argv: list[str] | None = None) -> int:
    parser = interleaved_parser(__doc__.splitlines()[0], CONTENDERS, PHASES)
    parser.add_argument(
        "--variants", nargs="*", help="only these variants (against plain EKFAC)"
    )
    args = parser.parse_args(argv)
    if worker_main(args, measure):
        return 0
    contenders = {
        case: tuple(
            c for c in names if c == "ekfac" or not args.variants or c in args.variants
        )
        for case, names in CONTENDERS.items()
    }
    rows = []
    for case in args.cases:
        for phase in args.phases:
            results = interleave(
                contenders[case],
                args.rounds,
                lambda structure, _round, case=case, phase=phase: run_worker(
                    Path(__file__), [case, structure, phase, args.warm]
                ),
                print,
            )
            rows += [{"case": case, "phase": phase, **r} for r in results]
    lines = [
        "| case | phase | variant | EKFAC warm s | variant warm s | variant/EKFAC "
        "warm | variant/EKFAC cold | variant/EKFAC peak |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in args.cases:
        for phase in args.phases:
            part = [r for r in rows if r["case"] == case and r["phase"] == phase]
            for variant in contenders[case][1:]:
                cells = [
                    case,
                    phase,
                    variant,
                    f"{median_of(part, 'ekfac', 'warm'):.3f}",
                    f"{median_of(part, variant, 'warm'):.3f}",
                    spread(ratio(part, variant, "ekfac", "warm")),
                    spread(ratio(part, variant, "ekfac", "cold")),
                    spread(ratio(part, variant, "ekfac", "peak_mib")),
                ]
                lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dense_blocks.json").write_text(json.dumps(rows, indent=1))
    (args.out / "dense_blocks.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
