"""A layer with Kronecker-factored blocks, and the eigenbasis of its factors.

A :class:`KroneckerLayer` is a module of a registered kind
(:mod:`ekfac_laplace.kinds`) whose weight and bias have Kronecker blocks: it knows
its block indices, how its weight is laid out as the map ``W`` the factors act on
(``G`` on its rows, ``A`` on its columns) and the shapes of its blocks.
:class:`LayerBasis` holds its factors' eigenvectors. :func:`group_rows` gathers the
rows of each example when a model folds another dimension into the batch.

Which parameters get such blocks is decided by
:class:`~ekfac_laplace.layout.ParameterLayout`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ekfac_laplace.errors import CaptureError
from ekfac_laplace.kinds import LayerKind, kind_of


class RowGroupingError(CaptureError):
    """A module sees a number of rows that is not a multiple of the batch size."""

    def __init__(self, name: str, rows: int, batch: int) -> None:
        super().__init__(
            f"Module '{name}' sees {rows} rows for a batch of {batch} examples, not "
            "a multiple: EKFAC needs the same number of rows from every example, "
            "consecutive as x.reshape(batch * m, ...) lays them out, so that its "
            "per-example gradients are defined. A module called on some of the "
            "examples' rows only (a mixture-of-experts expert called on the tokens "
            "routed to it, x[rows]) is supported as an nn.Linear or GPT-2 Conv1D "
            "called on 2-D (rows, features) inputs: flatten the rows before the "
            "expert, write the experts as one module called on every row (as "
            "Hugging Face's MixtralExperts, which gets exact diagonal blocks), or "
            "freeze them with requires_grad_(False). Otherwise keep the batch "
            "dimension first."
        )


def group_rows(tensor: Tensor, batch: int, name: str) -> Tensor:
    """Gather the rows of each example of a module's tensor along dimension 1.

    A module usually sees one row per example. A model that folds another
    dimension into the batch before a layer (a reward model scoring a pair of
    completions with ``x.reshape(-1, d)``) gives it ``B·m`` rows; the ``m`` rows of
    example ``n`` are taken to be the consecutive rows ``n·m, …, n·m + m - 1``, as
    row-major flattening lays them out (the engine checks this on its first batch).
    They become positions sharing the weight: ``(B·m, S, ...)`` → ``(B, m·S, ...)``.

    Args:
        tensor: Shape ``(R, S, ...)`` with ``R`` rows.
        batch: The number of examples ``B``.
        name: The module's name, for the message.

    Returns:
        The tensor itself if ``R == B``, else shape ``(B, (R/B)·S, ...)``.

    Raises:
        RowGroupingError: If ``R`` is not a multiple of ``B``.
    """
    rows = tensor.shape[0]
    if rows == batch:
        return tensor
    if rows == 0:  # called on no row (an expert no example was routed to)
        return tensor.new_zeros(batch, 0, *tensor.shape[2:])
    if rows % batch:
        raise RowGroupingError(name, rows, batch)
    return tensor.reshape(batch, -1, *tensor.shape[2:])


@dataclass
class KroneckerLayer:
    """A layer with Kronecker-factored blocks: a module and its kind.

    What it sees and how its weight is laid out come from its
    :class:`~ekfac_laplace.kinds.LayerKind`.

    Attributes:
        name: The layer's name: the module's name in the model, or
            ``"<attention>.in_proj"`` for an attention's packed in-projection.
        module: The module owning the parameters.
        kind: Its kind.
        attention: For kinds an attention applies, that ``nn.MultiheadAttention``.
        weight_index: Block index of its weight, if the weight is in the posterior
            with a Kronecker block.
        bias_index: Block index of its bias, if the bias is in the posterior with
            a Kronecker block.
        dense_weight_index: Block index of its weight with an exact (dense) block.
        dense_bias_index: Block index of its bias with an exact (dense) block.
    """

    name: str
    module: nn.Module
    kind: LayerKind
    attention: nn.MultiheadAttention | None = None
    weight_index: int | None = None
    bias_index: int | None = None
    dense_weight_index: int | None = None
    dense_bias_index: int | None = None

    @property
    def weight_name(self) -> str:
        """The weight's name in :attr:`module`."""
        return self.kind.weight_name

    @property
    def bias_name(self) -> str:
        """The bias's name in :attr:`module`."""
        return self.kind.bias_name

    @property
    def transposed(self) -> bool:
        """Whether the block's eigenbasis is ``Q_A ⊗ Q_G`` (see the kind)."""
        return self.kind.transposed

    @property
    def groups(self) -> int:
        """``G``: the weight's independent groups, each with its own factors."""
        return self.kind.groups(self.module)

    @property
    def separate_bias(self) -> bool:
        """Whether the bias is in the posterior with a factor of its own."""
        return self.kind.separate_bias and self.bias_index is not None

    @property
    def shares_weight(self) -> bool:
        """Whether ``G`` is needed: for the weight, or for a bias that shares it."""
        return self.weight_index is not None or (
            self.bias_index is not None and not self.kind.separate_bias
        )

    @property
    def has_kronecker(self) -> bool:
        """Whether the layer has a Kronecker block (else only exact blocks)."""
        return self.weight_index is not None or self.bias_index is not None

    @property
    def dense_needs_rows(self) -> bool:
        """Whether its exact blocks need ``g`` (a weight, or a bias that sums it)."""
        return self.dense_weight_index is not None or (
            self.dense_bias_index is not None and not self.kind.separate_bias
        )

    @property
    def dense_needs_bias_rows(self) -> bool:
        """Whether its exact bias block needs the bias's own rows."""
        return self.dense_bias_index is not None and self.kind.separate_bias

    def inputs(self, x: Tensor) -> Tensor:
        """``a`` ``(B, S, d_in)`` of the input (batch in dimension 0)."""
        return self.kind.inputs(self.module, x)

    def output_gradients(self, gradient: Tensor) -> Tensor:
        """``g`` ``(B, S, d_out)`` of an output-shaped tensor."""
        return self.kind.output_gradients(self.module, gradient)

    def bias_gradients(self, gradient: Tensor) -> Tensor:
        """The rows ``(B, S_b, d_b)`` whose sums are the bias's gradients."""
        return self.kind.bias_gradients(self.module, gradient)

    def as_matrix(self, weight_like: Tensor) -> Tensor:
        """The weight (or a tensor shaped like it) as the ``(d_out, d_in)`` map.

        The Kronecker factors act on this matrix: ``G`` on its rows, ``A`` on its
        columns (a convolution's ``(out, in, *k)`` flattened to ``(out, in·k)``,
        GPT-2's ``(d_in, d_out)`` transposed).

        Args:
            weight_like: Shaped like the weight.

        Returns:
            Shape ``(d_out, d_in)`` (a view where possible).
        """
        return self.kind.as_matrix(weight_like)

    def as_groups(self, weight_like: Tensor) -> Tensor:
        """The weight (or a tensor shaped like it) as ``G`` maps ``(d_out, d_in)``.

        Args:
            weight_like: Shaped like the weight.

        Returns:
            Shape ``(G, d_out, d_in)``, ``d_out`` and ``d_in`` per group.
        """
        return self.kind.as_groups(weight_like, self.groups)

    def weight_block(
        self, q_g: Tensor, q_a: Tensor, values: Tensor
    ) -> tuple[tuple[Tensor, Tensor], Tensor]:
        """The weight's block in the layout of the weight itself.

        Args:
            q_g: The gradient factor's eigenvectors (``(G, d_out, d_out)`` for a
                grouped layer).
            q_a: The input factor's eigenvectors.
            values: Corrected eigenvalues ``(d_out, d_in)`` (``(G, ...)``).

        Returns:
            ``((Q_G, Q_A), λ)``, or for a transposed layout ``((Q_A, Q_G), λᵀ)``;
            applying the inverse gives the factors back.
        """
        if self.transposed:
            return (q_a, q_g), values.mT.contiguous()
        return (q_g, q_a), values

    def factor_block(
        self, basis: tuple[Tensor, ...], values: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The inverse of :meth:`weight_block`.

        Args:
            basis: The weight block's eigenvectors.
            values: Values shaped like the weight (eigenvalues, their powers).

        Returns:
            ``(Q_G, Q_A, values as (d_out, d_in))`` (``None`` without values).
        """
        first, second = basis
        if self.transposed:
            return second, first, None if values is None else values.mT
        return first, second, values

    @property
    def weight(self) -> Tensor:
        """The weight parameter."""
        return self.module.get_parameter(self.weight_name)

    @property
    def out_features(self) -> int:
        """Output width ``d_out`` per group (channels of a convolution): ``G``'s."""
        return self.as_groups(self.weight).shape[1]

    @property
    def in_features(self) -> int:
        """Input width ``d_in`` per group (``c_in·k`` of a convolution): ``A``'s."""
        return self.as_groups(self.weight).shape[2]

    @property
    def bias_features(self) -> int:
        """Rows of the bias's factor: ``G``'s, or its own (``separate_bias``)."""
        if self.kind.separate_bias:
            return self.kind.bias_features(self.module)
        return self.out_features

    def factor_sizes(self) -> dict[str, int]:
        """The Kronecker factors the posterior's blocks of this layer need.

        Returns:
            ``"gradient": d_out`` where ``G`` is needed, ``"input": d_in`` with
            the weight, ``"bias": d_b`` for a bias with its own factor.
        """
        sizes = {}
        if self.shares_weight:
            sizes["gradient"] = self.out_features
        if self.weight_index is not None:
            sizes["input"] = self.in_features
        if self.separate_bias:
            sizes["bias"] = self.bias_features
        return sizes

    def block_shapes(self, index: int) -> tuple[tuple[int, ...], list[tuple[int, ...]]]:
        """The eigenvalue shape and eigenvector shapes of its Kronecker block.

        Args:
            index: Its weight's or its bias's block index.

        Returns:
            The shapes.
        """
        groups = () if self.groups == 1 else (self.groups,)
        if index == self.bias_index:
            d_b = self.bias_features
            if self.separate_bias:
                return (d_b,), [(d_b, d_b)]
            return (*groups, d_b), [(*groups, d_b, d_b)]
        d_out, d_in = self.out_features, self.in_features
        (first, second), values = self.weight_block(
            torch.empty(*groups, d_out, d_out, device="meta"),
            torch.empty(*groups, d_in, d_in, device="meta"),
            torch.empty(*groups, d_out, d_in, device="meta"),
        )
        return tuple(values.shape), [tuple(first.shape), tuple(second.shape)]

    @property
    def target(self) -> Tensor:
        """A parameter to back-propagate to so that the output gradient flows.

        The bias where there is one: autograd then skips the weight gradient, which
        the factors never use.
        """
        name = self.weight_name if self.bias_index is None else self.bias_name
        return self.module.get_parameter(name)

    @classmethod
    def owning(
        cls, model: nn.Module, module_name: str, module: nn.Module, param_name: str
    ) -> KroneckerLayer | None:
        """The Kronecker layer a parameter belongs to, by the registered kinds.

        Args:
            model: The network.
            module_name: The name of the module applying the parameter.
            module: That module.
            param_name: The parameter's name in it.

        Returns:
            The layer (no block index set yet), or ``None`` where no kind claims
            the parameter (it gets a diagonal block).
        """
        found = kind_of(model, module_name, module, param_name)
        if found is None:
            return None
        kind, name = found
        attention = kind.attention_of(model, module_name, module)
        return cls(name, module, kind, attention=attention)

    def not_plain_reason(self, names: set[str]) -> str | None:
        """Why its parameters in the posterior are not its plain weight and bias.

        Args:
            names: The names of its parameters in the posterior.

        Returns:
            The reason, or ``None`` where they are (or its kind gives its other
            parameters diagonal blocks).
        """
        own = {self.weight_name, self.bias_name}
        if self.kind.other_parameters_diagonal:
            return None  # its other parameters (bias_k, bias_v) get diagonal blocks
        if not names - own:
            return None
        return (
            f"has the parameters {sorted(names)} in the posterior, not a plain "
            f"'{self.weight_name}' and '{self.bias_name}' (pruning, an old-style "
            "weight or spectral norm, a parametrisation)"
        )

    def functional_refusal(self, reason: str) -> str:
        """Why a layer its parent applies functionally cannot be in the posterior.

        Args:
            reason: Why it cannot have Kronecker blocks.

        Returns:
            The message.
        """
        return (
            f"'{self.name}' cannot have Kronecker blocks ({reason}), and "
            "nn.MultiheadAttention applies it functionally (F.linear inside its "
            "forward), so it cannot have a diagonal block either. Freeze it with "
            "requires_grad_(False)."
        )


class LayerBasis(NamedTuple):
    """The eigenvectors of one Kronecker layer's factors.

    Attributes:
        gradient: ``Q_G`` (``None`` for a layer with only a bias of its own).
        input: ``Q_A`` (``None`` without the weight in the posterior).
        bias: The bias's own factor's eigenvectors (``separate_bias``), else
            ``None`` (the bias uses ``Q_G``).
    """

    gradient: Tensor | None
    input: Tensor | None = None
    bias: Tensor | None = None

    @property
    def for_bias(self) -> Tensor | None:
        """The eigenvectors of the bias's block: its own, or ``Q_G``."""
        return self.gradient if self.bias is None else self.bias

    def tensors(self) -> list[Tensor]:
        """The eigenvectors present, in the order ``(Q_G, Q_A, Q_B)``.

        Returns:
            The tensors (for sharing them out over ranks).
        """
        return [q for q in self if q is not None]

    @classmethod
    def of(cls, layer: KroneckerLayer, tensors: Sequence[Tensor]) -> LayerBasis:
        """The inverse of :meth:`tensors` for ``layer``.

        Args:
            layer: The layer.
            tensors: What :meth:`tensors` gave.

        Returns:
            The basis.
        """
        present = iter(tensors)
        gradient = next(present) if layer.shares_weight else None
        inputs = next(present) if layer.weight_index is not None else None
        bias = next(present) if layer.separate_bias else None
        return cls(gradient, inputs, bias)
