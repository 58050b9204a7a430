"""Strong scaling of a data-parallel EKFAC fit (torch.distributed, gloo on the CPU).

The MLP 784-512-512-10 on N = 16,384 synthetic examples (exact GGN, our engine, the
default first-pass cache), fitted in three ways on the same data:

* ``1x1``: one process, one thread;
* ``1x2``: one process, two threads;
* ``2x1``: two processes of one thread each, each with half of the data
  (``process_group=WORLD``).

Each way runs in fresh processes, ``--repeats`` times, interleaved (1x1, 1x2, 2x1,
1x1, ...); the script reports the median fit time of each, the speed-ups against
1x1, and the phases of the fit: the passes over the data, the eigendecompositions
(shared out across ranks) and the communication (every collective, including the
ranks waiting for each other), from :class:`ekfac_laplace.distributed.LocalRanks`'s
``seconds``. The bytes summed per fit are counted from the model (see the docs).

Usage::

    python benchmarks/distributed.py                  # full size, writes results/
    python benchmarks/distributed.py --quick          # a small smoke run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

WAYS = {"1x1": (1, 1), "1x2": (1, 2), "2x1": (2, 1)}


def build(n_data: int, widths: tuple[int, ...], seed: int = 0):
    """The MLP and a synthetic data set labelled by a random teacher network."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(d_in, d_out), nn.ReLU()]
    model = nn.Sequential(*layers[:-1])
    X = torch.randn(n_data, widths[0])
    with torch.no_grad():
        y = model(X + 0.5 * torch.randn_like(X)).argmax(-1)
    return model, TensorDataset(X, y)


def reduced_numbers(model: nn.Module) -> dict[str, int]:
    """Numbers summed over the ranks per fit, by phase (Linear layers only)."""
    factors = sum(m.in_features**2 + m.out_features**2 for m in linear_layers(model))
    corrections = sum(p.numel() for p in model.parameters())
    return {
        "kronecker_factors": factors,
        "eigenvectors": factors,
        "corrected_eigenvalues": corrections,
    }


def linear_layers(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m, nn.Linear)]


def fit_once(rank: int, world: int, spec: dict[str, Any]) -> dict[str, float]:
    """One fit on this rank's share, timed by phase."""
    from ekfac_laplace.batches import LaplaceBatches
    from ekfac_laplace.distributed import ranks_of
    from ekfac_laplace.engine import fast_ekfac
    from ekfac_laplace.layout import ParameterLayout
    from ekfac_laplace.options import EKFACOptions

    model, data = build(spec["n_data"], tuple(spec["widths"]))
    share = torch.utils.data.Subset(data, range(rank, len(data), world))
    loader = DataLoader(share, batch_size=spec["batch_size"])
    layout = ParameterLayout(model, list(model.parameters()))
    group = dist.group.WORLD if world > 1 else None
    ranks = ranks_of(group)
    if group is not None:
        dist.barrier()
    start = time.perf_counter()
    fast_ekfac(
        model,
        layout,
        LaplaceBatches(loader),
        "classification",
        len(share),
        EKFACOptions(),
        ranks=ranks,
    )
    total = time.perf_counter() - start
    seconds = dict(ranks.seconds)
    return {
        "fit": total,
        "communication": seconds["communication"],
        "eigh": seconds["eigh"],
        "passes": total - seconds["communication"] - seconds["eigh"],
    }


def worker(spec_path: str, rank: int, world: int, threads: int, out: str) -> None:
    """Entry of one process of one way (``--worker``)."""
    torch.set_num_threads(threads)
    spec = json.loads(Path(spec_path).read_text())
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{spec['rendezvous']}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=600),
        )
    result = fit_once(rank, world, spec)
    Path(out).write_text(json.dumps(result))
    if world > 1:
        dist.barrier()  # no rank tears down while another still reads
        dist.destroy_process_group()
        # Skip the interpreter's teardown: gloo's threads met at exit once aborted
        # a rank ("terminate called without an active exception") after its
        # result was written.
        sys.stdout.flush()
        os._exit(0)


def run_way(way: str, spec: dict[str, Any], folder: Path) -> dict[str, float]:
    """All processes of one way, fresh; rank 0's phases, the slowest rank's fit."""
    world, threads = WAYS[way]
    spec = dict(spec, rendezvous=str(folder / f"rendezvous-{time.time_ns()}"))
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    outs = [folder / f"{way}-{rank}.json" for rank in range(world)]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                str(spec_path),
                str(rank),
                str(world),
                str(threads),
                str(out),
            ],
            env=env,
        )
        for rank, out in enumerate(outs)
    ]
    if any(process.wait() for process in processes):
        raise RuntimeError(f"{way}: a process failed")
    results = [json.loads(out.read_text()) for out in outs]
    rank0 = dict(results[0])
    rank0["fit"] = max(result["fit"] for result in results)
    return rank0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec_path, rank, world, threads, out = args.worker
        worker(spec_path, int(rank), int(world), int(threads), out)
        return 0
    spec = {
        "n_data": 512 if args.quick else 16384,
        "widths": [32, 16, 16, 10] if args.quick else [784, 512, 512, 10],
        "batch_size": 128 if args.quick else 512,
    }
    repeats = 1 if args.quick else args.repeats
    runs: dict[str, list[dict[str, float]]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as scratch:
        for _ in range(repeats):  # interleaved: 1x1, 1x2, 2x1, 1x1, ...
            for way in WAYS:
                runs[way].append(run_way(way, spec, Path(scratch)))
    model, _ = build(8, tuple(spec["widths"]))
    numbers = reduced_numbers(model)
    summary = {}
    for way, results in runs.items():
        summary[way] = {
            key: statistics.median(r[key] for r in results) for key in results[0]
        }
        summary[way]["spread"] = (
            max(r["fit"] for r in results) / min(r["fit"] for r in results) - 1
        )
    base = summary["1x1"]["fit"]
    print(
        f"MLP {'-'.join(map(str, spec['widths']))}, N = {spec['n_data']}, "
        f"batch {spec['batch_size']}, median of {repeats} (spread = max/min - 1)"
    )
    print("| way | fit s | speed-up vs 1x1 | passes s | eigh s | communication s |")
    print("| --- | --- | --- | --- | --- | --- |")
    for way, row in summary.items():
        print(
            f"| {way} | {row['fit']:.2f} (±{row['spread']:.0%}) | "
            f"{base / row['fit']:.2f}× | {row['passes']:.2f} | {row['eigh']:.3f} | "
            f"{row['communication']:.3f} ({row['communication'] / row['fit']:.1%}) |"
        )
    total = sum(numbers.values())
    print(
        f"Summed over the ranks per fit: {total:,} numbers "
        f"({total * 4 / 2**20:.1f} MiB in float32): {numbers}"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    name = "distributed_quick.json" if args.quick else "distributed.json"
    payload = {"spec": spec, "runs": runs, "summary": summary, "numbers": numbers}
    (args.out / name).write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
