r"""Data-parallel fits: what the ranks of a process group exchange, and how they fail.

A distributed EKFAC fit (``process_group=`` on a Laplace class) is the single-process
fit of the union of the ranks' shards, because every quantity EKFAC accumulates is a
sum over examples:

$$
    A = \sum_r A_r, \quad G = \sum_r G_r, \quad
    λ = \sum_r \sum_{n \in r} \big(Q_G^\top G_n Q_A\big)^{\odot 2}, \quad
    \text{loss} = \sum_r \text{loss}_r ,
$$

so each rank makes its passes over its own shard, and :class:`Ranks` sums the
partial results with one ``all_reduce`` per phase (all tensors of a phase flattened
into one buffer). The eigendecompositions between the phases are *shared out*: rank
``r`` decomposes the factors ``i`` with ``i mod R = r``, and one more ``all_reduce``
of zero-padded buffers gives every rank all eigenvectors, bit for bit the same.

Failing together: before each collective the ranks exchange whether their local work
succeeded (:meth:`Ranks.agree`), so an exception on one rank becomes an error on every
rank instead of a hang in the next collective; a rank that never arrives is bounded
by the process group's timeout, reported as such. :class:`LocalRanks` is the same
interface for one process, where every exchange is the identity.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DistributedSampler

T = TypeVar("T")


class DistributedFitError(RuntimeError):
    """Another rank of the process group failed, or a collective timed out."""


class LocalRanks:
    """One process: every exchange is the identity.

    Attributes:
        seconds: Wall seconds spent in ``"communication"`` (collectives) and in the
            shared-out ``"eigh"`` work so far (for benchmarks).
    """

    rank = 0
    size = 1

    def __init__(self) -> None:
        self.seconds = {"communication": 0.0, "eigh": 0.0}

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum tensors over the ranks, in place (nothing to do here)."""

    def agree(self, error: BaseException | None, what: str) -> None:
        """Re-raise a local error (no other rank to tell)."""
        if error is not None:
            raise error

    def run(self, work: Callable[[], T], what: str) -> T:
        """This rank's part of a phase; every rank learns whether all succeeded.

        Args:
            work: The rank's local work.
            what: The work, for the message.

        Returns:
            What ``work`` returns.

        An interrupt (``KeyboardInterrupt``, ``SystemExit``) on a rank that stays
        alive is told to the others too, so that they stop at once instead of
        waiting for the process group's timeout.

        Raises:
            BaseException: This rank's own error, unchanged; on the other ranks a
                :class:`DistributedFitError` naming it (see :meth:`agree`).
        """
        try:
            result = work()
        except BaseException as error:  # noqa: BLE001 - re-raised by agree
            self.agree(error, what)
            raise  # agree re-raises this rank's error; kept for the reader
        self.agree(None, what)
        return result

    def same(self, describe: Callable[[], dict[str, object]], what: str) -> None:
        """One rank agrees with itself: ``describe`` is not even called."""

    def total(self, count: int) -> int:
        """The sum of an integer over the ranks."""
        return count

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's items, concatenated in rank order (here: the items)."""
        return items

    def share_out(
        self, count: int, compute: Callable[[int], list[Tensor]]
    ) -> list[list[Tensor]]:
        """``compute(i)`` for every ``i`` in ``range(count)``."""
        start = time.perf_counter()
        results = [compute(i) for i in range(count)]
        self.seconds["eigh"] += time.perf_counter() - start
        return results


class Ranks(LocalRanks):
    """The ranks of a process group in a data-parallel fit.

    Args:
        group: An initialised ``torch.distributed`` process group (``group.WORLD``
            or a subgroup).

    Raises:
        ValueError: If ``torch.distributed`` is not initialised.
    """

    def __init__(self, group: Any) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(
                "process_group was given but torch.distributed is not initialised; "
                "call torch.distributed.init_process_group(...) first (torchrun sets "
                "the environment), or pass process_group=None for one process."
            )
        super().__init__()
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)

    def _collective(self, call: Callable[[], Any], what: str) -> Any:
        start = time.perf_counter()
        try:
            return call()
        except RuntimeError as error:
            raise DistributedFitError(
                f"Rank {self.rank}: the collective of {what} failed ({error}); "
                "another rank did not reach it (it stopped, hung or was not asked to "
                "fit) before the process group's timeout."
            ) from error
        finally:
            self.seconds["communication"] += time.perf_counter() - start

    def sum_(self, tensors: Sequence[Tensor]) -> None:
        """Sum tensors over the ranks, in place, one ``all_reduce`` per dtype.

        Args:
            tensors: The rank's partial sums; overwritten with the totals.
        """
        by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault((tensor.dtype, tensor.device), []).append(tensor)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            self._collective(
                lambda flat=flat: dist.all_reduce(flat, group=self.group),
                "a sum of partials",
            )
            for tensor, total in zip(group, flat.split([t.numel() for t in group])):
                tensor.copy_(total.view_as(tensor))

    def agree(self, error: BaseException | None, what: str) -> None:
        """Tell every rank whether this one's local work succeeded.

        Args:
            error: This rank's exception, or ``None``.
            what: The work, for the message.

        Raises:
            BaseException: This rank's own ``error``, unchanged.
            DistributedFitError: On the other ranks, naming the failed rank and its
                error.
        """
        message = None if error is None else f"{type(error).__name__}: {error}"
        messages: list[str | None] = [None] * self.size
        self._collective(
            lambda: dist.all_gather_object(messages, message, group=self.group), what
        )
        if error is not None:
            raise error
        failed = [(rank, text) for rank, text in enumerate(messages) if text]
        if failed:
            rank, text = failed[0]
            raise DistributedFitError(
                f"Rank {rank} failed during {what}: {text}. Every rank stops; the "
                "Laplace objects are unchanged."
            )

    def same(self, describe: Callable[[], dict[str, object]], what: str) -> None:
        """Refuse ranks that disagree on any field of ``describe()``.

        Args:
            describe: Named, picklable descriptions, equal on every rank of a valid
                fit (parameter shapes, a fingerprint of their values, options, ...);
                called only here, so one process computes none of them.
            what: What they describe, for the message.

        Raises:
            ValueError: On every rank, naming the first field that differs.
        """
        value = describe()
        values: list[dict[str, object]] = [{}] * self.size
        self._collective(
            lambda: dist.all_gather_object(values, value, group=self.group), what
        )
        for rank, other in enumerate(values):
            for field, mine in values[0].items():
                if other.get(field) != mine:
                    raise ValueError(
                        f"The ranks disagree on {what}: {field} is {mine!r:.200} on "
                        f"rank 0 but {other.get(field)!r:.200} on rank {rank}. Every "
                        "rank must fit the same model (e.g. trained with "
                        "DistributedDataParallel, or loaded from one checkpoint) "
                        "with the same options."
                    )

    def total(self, count: int) -> int:
        """The sum of an integer over the ranks.

        Args:
            count: This rank's value.

        Returns:
            The sum over all ranks.
        """
        counts: list[int] = [0] * self.size
        self._collective(
            lambda: dist.all_gather_object(counts, int(count), group=self.group),
            "a count",
        )
        return sum(counts)

    def gather(self, items: list[Any]) -> list[Any]:
        """Every rank's items, concatenated in rank order, on every rank.

        Args:
            items: This rank's items (picklable, e.g. CPU tensors).

        Returns:
            The items of rank 0, then rank 1, ...
        """
        every: list[list[Any]] = [[] for _ in range(self.size)]
        self._collective(
            lambda: dist.all_gather_object(every, items, group=self.group),
            "gathering results",
        )
        return [item for rank_items in every for item in rank_items]

    def share_out(
        self, count: int, compute: Callable[[int], list[Tensor]]
    ) -> list[list[Tensor]]:
        """Compute ``count`` items on their owner ranks and give all to every rank.

        Rank ``r`` computes the items ``i`` with ``i mod R = r``; every rank learns
        each item's shapes from a first ``compute``-free exchange, then the results
        are summed into zero buffers (exact: ``x + 0 = x``).

        Args:
            count: The number of items.
            compute: Item index to its tensors (the same number, shapes and dtypes
                on every rank).

        Returns:
            Every item's tensors, identical on every rank.
        """

        def owned() -> dict[int, list[Tensor]]:
            start = time.perf_counter()
            try:
                return {i: compute(i) for i in range(self.rank, count, self.size)}
            finally:
                self.seconds["eigh"] += time.perf_counter() - start

        mine = self.run(owned, "the eigendecompositions")
        shapes = {
            i: [(tuple(t.shape), t.dtype, t.device) for t in tensors]
            for i, tensors in mine.items()
        }
        every: list[dict[int, Any]] = [{}] * self.size
        self._collective(
            lambda: dist.all_gather_object(every, shapes, group=self.group),
            "the eigendecomposition shapes",
        )
        results: list[list[Tensor]] = []
        for i in range(count):
            owner = every[i % self.size][i]
            if i in mine:
                results.append([t.contiguous() for t in mine[i]])
            else:
                results.append([torch.zeros(s, dtype=d, device=v) for s, d, v in owner])
        self.sum_([t for tensors in results for t in tensors])
        return results


def ranks_of(group: Any | None) -> LocalRanks:
    """:class:`Ranks` of a process group, or :class:`LocalRanks` for ``None``.

    Args:
        group: A process group or ``None``.

    Returns:
        The exchange interface.
    """
    return LocalRanks() if group is None else Ranks(group)


def warn_about_an_unshared_shard(loader: Any, group: Any | None) -> None:
    """Warn when a ``DistributedSampler`` shard is fitted as if it were all the data.

    Args:
        loader: The training loader.
        group: The Laplace object's process group (``None``: one process).
    """
    sampler = getattr(loader, "sampler", None)
    if (
        group is None
        and isinstance(sampler, DistributedSampler)
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size() > 1
    ):
        warnings.warn(
            "The training loader draws with a DistributedSampler in an initialised "
            "process group, but the Laplace object has no process_group: this rank "
            "fits its shard as if it were the whole data set. Pass "
            "process_group=torch.distributed.group.WORLD to fit the union of the "
            "shards on every rank.",
            UserWarning,
            stacklevel=3,
        )
