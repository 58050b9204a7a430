"""How fast the exact token-level fit's products run, against this machine's peak.

The scaling benchmark's ``tokens`` axis times the bare products of an exact EKFAC
fit of ``Linear(d, d)`` on every token (:func:`scaling.token_products`) beside the
fit's floor (one forward pass and ``K`` backward passes per batch to the layer's
output). This script splits those products into their three groups, each timed bare
on tensors made beforehand, per batch of ``B`` sequences of ``T`` tokens over the
data set:

* ``grams``: the upper triangles of ``A`` and of ``G`` over the ``K = C − 1``
  vectors of the exact GGN (:func:`~ekfac_laplace.accumulators.add_upper_gram`),
  ``¾ · 2 (1 + K) B T d²`` flops at ``d = 256``;
* ``rotations``: the inputs and the ``K`` gradients into the eigenbasis,
  ``2 (1 + K) B T d²``;
* ``per-example``: the ``K`` rotated per-example gradients ``Σ_t g̃_t ãₜᵀ``,
  squared and summed, ``2 K B T d²``;

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

from ekfac_laplace.accumulators import add_upper_gram

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from scaling import build_tokens, floor_pass  # noqa: E402
from timing import THREADS, pin_threads  # noqa: E402

TOKENS = (16, 64, 128, 512)
CLASSES = 10  # the scaling axis's head: K = C − 1 vectors of the exact GGN


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
    width = problem.model[0].in_features
    batch = problem.loader.batch_size
    batches = len(problem.loader)
    passes = CLASSES - 1
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, tokens, width, generator=generator)
    gradients = torch.randn(passes, batch, tokens, width, generator=generator)
    basis = torch.linalg.qr(torch.randn(width, width, generator=generator))[0]
    factor = torch.zeros(width, width)
    rotated_inputs = inputs @ basis
    rotated = [g @ basis for g in gradients]

    def grams() -> None:
        for _ in range(batches):
            add_upper_gram(factor, inputs.reshape(-1, width))
            for g in gradients:
                add_upper_gram(factor, g.reshape(-1, width))

    def rotations() -> None:
        for _ in range(batches):
            inputs @ basis
            for g in gradients:
                g @ basis

    def per_example() -> None:
        squares = torch.zeros(width, width)
        for _ in range(batches):
            for g in rotated:
                squares += torch.bmm(g.transpose(1, 2), rotated_inputs).square_().sum(0)

    unit = 2 * batches * batch * tokens * width**2  # flops of one B T d² product
    # The upper triangle by halving down to 128 columns: (1 + 2 + … ) blocks.
    leaves = max(1, -(-width // 128))
    upper = (leaves + 1) / (2 * leaves)
    groups = {
        "grams": (grams, upper * (1 + passes) * unit),
        "rotations": (rotations, (1 + passes) * unit),
        "per_example": (per_example, passes * unit),
    }
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
