"""The exact diagonal blocks: squared per-example gradients of the other modules."""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from ekfac_laplace.dense import DenseBlocks
from ekfac_laplace.diagonal import ModuleCall, on_every_row, restricted_gradients
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layer import group_rows
from ekfac_laplace.layout import DiagonalModule


class DiagonalSquares:
    """Sums ``Σ_n (∂⟨g_n, m(x_n)⟩/∂θ)²`` for the parameters with diagonal blocks.

    The parameters of these modules with exact blocks get their per-example
    gradients' outer products instead, in ``dense``.

    A tied parameter (``tied``: applied by several modules) has one tensor of
    squares, shared by its modules' entries: per backward pass its per-example
    gradients are summed over the uses first (:meth:`add` keeps them), then
    squared (:meth:`end_pass`).

    Args:
        modules: The modules with diagonal (or exact) blocks.
        dense: Where the exact blocks are summed.
        tied: The block indices of tied parameters.

    Attributes:
        squares: Module name to one tensor per parameter, shaped like it.
    """

    def __init__(
        self,
        modules: list[DiagonalModule],
        dense: DenseBlocks | None = None,
        tied: Collection[int] = (),
    ) -> None:
        self.dense = dense
        self.tied = set(tied)
        shared: dict[int, Tensor] = {}

        def zeros(entry: DiagonalModule, name: str, index: int) -> Tensor:
            parameter = entry.module.get_parameter(name).detach()
            tensor = torch.zeros_like(
                parameter, dtype=accumulation_dtype(parameter.dtype)
            )
            return shared.setdefault(index, tensor) if index in self.tied else tensor

        self.squares: dict[str, list[Tensor]] = {
            entry.name: [
                zeros(entry, name, index)
                for name, index in zip(entry.param_names, entry.indices)
            ]
            for entry in modules
        }
        self._tied_squares = shared  # per tied block index, its one tensor
        self._pending: dict[int, Tensor] = {}  # a tied parameter's pass so far

    def partial_sums(self) -> list[Tensor]:
        """The squares in the layout's order, for summing over the ranks.

        Returns:
            The tensors themselves (summed in place), a tied one once.
        """
        tensors: dict[int, Tensor] = {}
        for squares in self.squares.values():
            for tensor in squares:
                tensors.setdefault(id(tensor), tensor)
        return list(tensors.values())

    def end_pass(self) -> None:
        """Square the tied parameters' per-example gradients of a backward pass."""
        for index, grad in self._pending.items():
            self._tied_squares[index] += grad.square().sum(0)
        self._pending.clear()

    def add(
        self,
        entry: DiagonalModule,
        call: ModuleCall,
        grad_outputs: Sequence[Tensor | None],
        batch: int,
    ) -> None:
        """Add one backward pass of one module.

        Args:
            entry: The module.
            call: Its forward call.
            grad_outputs: The gradient at each of its output tensors.
            batch: The number of examples; a module that sees ``B·m`` rows gets the
                per-row gradients of each example's ``m`` consecutive rows summed
                (see :func:`~ekfac_laplace.layer.group_rows`).
        """
        grads = restricted_gradients(
            entry.module, entry.param_names, call, grad_outputs
        )
        for squares, (rows, grad), index, dense in zip(
            self.squares[entry.name], grads, entry.indices, entry.dense
        ):
            grad = group_rows(grad.unsqueeze(1), batch, entry.name).sum(1)
            grad = grad.to(squares.dtype)
            if index in self.tied:  # summed over the uses, squared at the end
                grad = on_every_row(rows, grad, squares.shape)
                pending = self._pending.get(index)
                self._pending[index] = grad if pending is None else pending + grad
            elif dense:  # the whole per-example gradient, for the exact block
                self.dense.add(index, on_every_row(rows, grad, squares.shape))
            elif rows is None:
                squares += grad.square().sum(0)
            else:
                squares.index_add_(0, rows, grad.square().sum(0))
