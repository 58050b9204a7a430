"""How fast the exact token-level fit's products run, against this machine's peak.

The scaling benchmark's ``tokens`` axis times the bare products of an exact EKFAC
fit of ``Linear(d, d)`` on every token (:func:`scaling.token_products`) beside the
fit's floor (one forward pass and ``K`` backward passes per batch to the layer's
output). This script times those products in their three groups
(:func:`scaling.token_product_groups`: the Gram matrices' upper triangles, the
rotations into the eigenbasis, the rotated per-example gradients squared and
summed), each bare on tensors made beforehand, with their flops over the data set,
and reports each group's rate in GFLOP/s against the rate of one ``2048 × 2048``
matrix product (``peak``), and the *bound*: the floor plus every product at that
peak, as a multiple of the floor. No exact EKFAC fit of the exact GGN can take less
than the bound on this machine, whatever its implementation: it must run the floor
and these products (it may skip its second pass by caching the first).

``python benchmarks/token_rates.py`` (2 threads, about 30 s) writes
``results/token_rates.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scaling import build_tokens, floor_pass, token_product_groups  # noqa: E402
from timing import THREADS, pin_threads  # noqa: E402

TOKENS = (16, 64, 128, 512)


def median_seconds(action: Callable[[], Any], repeats: int) -> float:
    """The median of ``repeats`` warm calls (after one untimed call)."""
    action()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        action()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def peak_rate(size: int, repeats: int) -> float:
    """GFLOP/s of one ``size × size`` float32 matrix product."""
    x, y = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    return 2 * size**3 / median_seconds(lambda: torch.mm(x, y, out=out), repeats) / 1e9


def point(tokens: int, quick: bool, repeats: int) -> dict[str, Any]:
    """The floor and the three product groups at one sequence length.

    Args:
        tokens: ``T``.
        quick: The scaling benchmark's tiny sizes.
        repeats: Warm calls per median.

    Returns:
        Seconds and flops of the floor and of each group.
    """
    problem = build_tokens(tokens, quick)
    floor = median_seconds(lambda: floor_pass(problem), repeats)
    groups = token_product_groups(
        problem.loader.batch_size,
        tokens,
        problem.model[0].in_features,
        problem.classes - 1,  # the K = C − 1 vectors of the exact GGN
        len(problem.loader),
    )
    row: dict[str, Any] = {"tokens": tokens, "floor_s": floor}
    for name, (action, flops) in groups.items():
        row[name] = {"seconds": median_seconds(action, repeats), "flops": flops}
    return row


def markdown(rows: list[dict[str, Any]], peak: float) -> str:
    """One row per ``T``: each group's seconds and rate, and the bound."""
    lines = [
        f"Peak: one 2048² float32 matrix product, {peak:.0f} GFLOP/s.",
        "",
        "| T | floor s | grams s (GFLOP/s) | rotations s (GFLOP/s) "
        "| per-example s (GFLOP/s) | products s | products at peak s "
        "| bound: (floor + products at peak) / floor |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        cells = [str(row["tokens"]), f"{row['floor_s']:.4f}"]
        seconds = flops = 0.0
        for name in ("grams", "rotations", "per_example"):
            group = row[name]
            rate = group["flops"] / group["seconds"] / 1e9
            cells.append(f"{group['seconds']:.4f} ({rate:.0f})")
            seconds += group["seconds"]
            flops += group["flops"]
        at_peak = flops / (peak * 1e9)
        bound = (row["floor_s"] + at_peak) / row["floor_s"]
        cells += [f"{seconds:.4f}", f"{at_peak:.4f}", f"{bound:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Measure, print and write the table.

    Args:
        argv: Command-line arguments.

    Returns:
        0.
    """
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--tokens", type=int, nargs="*", default=list(TOKENS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--out", type=Path, default=HERE / "results")
    args = parser.parse_args(argv)
    pin_threads(args.threads)
    repeats = 1 if args.quick else args.repeats
    peak = peak_rate(256 if args.quick else 2048, repeats)
    rows = [point(tokens, args.quick, repeats) for tokens in args.tokens]
    table = markdown(rows, peak)
    print(table)
    name = "token_rates_quick" if args.quick else "token_rates"
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"threads": args.threads, "peak_gflops": peak, "rows": rows}
    (args.out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (args.out / f"{name}.md").write_text(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
