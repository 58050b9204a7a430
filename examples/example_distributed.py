"""Distributed EKFAC Laplace: fit, tune and evaluate across processes.

Every process (rank) holds the same trained network and a shard of scikit-learn's
bundled digits. The Laplace object opts in with
``process_group=``: each rank passes over its shard, the ranks sum their partial
Kronecker factors and corrected eigenvalues, and every rank ends with the posterior of
the whole training set. Prior tuning then needs no communication (every rank has the
same posterior), and ``evaluate(..., process_group=)`` gives every rank the metrics of
the whole test set. Only rank 0 prints.

Run on two processes (gloo, CPU)::

    torchrun --nproc_per_node=2 examples/example_distributed.py

Without ``torchrun`` it runs in one process, as the reference: the printed evidence
and metrics are the same either way (up to round-off). About 6 seconds on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

# First: registers hessian_structure="ekfac", and hides the deprecation notice that
# laplace-torch's import of asdl triggers in torch (not actionable here).
import ekfac_laplace

# isort: split
import torch
import torch.distributed as dist
from laplace import Laplace
from torch.utils.data import DataLoader, Subset

from ekfac_laplace.evaluation import data
from ekfac_laplace.evaluation.models import mlp, train_map

# laplace-torch reminds on every prior tuning that the default link is probit, even
# when link_approx is passed; we pass it.
warnings.filterwarnings("ignore", message="By default `link_approx` is `probit`")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    torch.set_num_threads(1)  # one thread per process, also for the reference
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    group = dist.group.WORLD if distributed else None

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    splits = data.load_digits_splits(seed=args.seed)
    # The same network on every rank: trained from the same seed on the same data
    # (a DDP-trained model would do the same).
    torch.manual_seed(args.seed)
    model = mlp(splits.input_shape, splits.n_outputs, hidden=(args.hidden,) * 2)
    train_loader = DataLoader(splits.train, batch_size=64, shuffle=True)
    train_map(model, train_loader, "classification", epochs=args.epochs, seed=args.seed)

    def shard(dataset) -> DataLoader:
        # Every world-th example from the rank's own: the shards are disjoint and
        # cover the data exactly. (A DistributedSampler pads the last shard with
        # repeats when the size is not divisible by the number of ranks; N then
        # counts the repeats too.)
        return DataLoader(Subset(dataset, range(rank, len(dataset), world)), 128)

    la = Laplace(
        model,
        "classification",
        subset_of_weights="all",
        hessian_structure="ekfac",
        process_group=group,
    )
    start = time.perf_counter()
    la.fit(shard(splits.train))
    seconds = time.perf_counter() - start
    la.optimize_prior_precision(method="marglik", link_approx="probit")
    metrics = ekfac_laplace.evaluate(la, shard(splits.test), process_group=group)
    say(
        f"{world} process{'es' if world > 1 else ''}: N = {la.n_data}, fit "
        f"{seconds:.2f} s, prior precision {la.prior_precision.item():.4g}, log "
        f"marginal likelihood {la.log_marginal_likelihood().item():.2f}"
    )
    say(
        "test set: "
        + "  ".join(f"{key} {metrics[key]:.4f}" for key in ("accuracy", "nll", "ece"))
    )
    if distributed:
        dist.barrier()  # no rank tears down while another still reads
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
