r"""Diagonal blocks for parameters that KFAC cannot factorise.

KFAC needs a layer whose weight gradient is an outer product of an input and an
output gradient (``nn.Linear``, ``nn.Conv2d``). Every other parameter — the affine
parameters of BatchNorm / LayerNorm / GroupNorm, embedding tables, grouped or
depthwise convolutions, custom modules — gets EKFAC *in the identity basis*: its
eigenbasis is ``I`` and its corrected eigenvalues are the exact diagonal of the
GGN / Fisher,

$$
    λ_i = \sum_n \sum_k \big( (J_n^\top v_{n,k})_i \big)^2 ,
$$

with ``J_n`` the Jacobian of the outputs of example ``n`` and ``v_{n,k}`` the
columns of the loss-Hessian square root (exact GGN), sampled gradients (MC Fisher)
or the loss gradient (empirical Fisher). ``J_nᵀ v_{n,k}`` restricted to a module's
parameters is the vector-Jacobian product of the *module alone* with the gradient
arriving at its output, so per-example gradients are computed module by module with
``torch.func`` (``vmap`` over the examples of ``vjp`` through the module's forward),
never through the whole network. Embedding tables are handled in closed form on the
rows of the batch's tokens (the gradient of a lookup is a scatter of the output
gradient), so their cost does not grow with the vocabulary; batch norms (running
statistics) and layer norms in closed form, ``Σ g ⊙ x̂`` and ``Σ g``.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_map

from ekfac_laplace._compat import forward_hooks_suspended
from ekfac_laplace.blocks.base import CHUNK_NUMBERS
from ekfac_laplace.errors import UnsplittableCallError
from ekfac_laplace.module_kinds import module_kind


@dataclass
class ModuleCall:
    """One forward call of a module with a diagonal block, and where its batch is.

    A module may take and return any structure of tensors (an ``nn.LSTM`` returns
    ``(output, (h, c))``, ``nn.MultiheadAttention`` ``(output, weights)``); the
    output's tensors are its *leaves*, in ``torch.utils._pytree`` order. Each tensor
    has a batch dimension (``None``: shared by every example): the module's own
    convention for recurrent layers and attention (``batch_first``; the hidden
    states of a recurrent layer have it in dimension 1), else dimension
    ``batch_dim`` of the outputs (0 unless the engine found another, as in a
    sequence-first transformer's layer norms), its size ``R`` (a multiple of the
    batch size where known) taken from most output tensors. Inputs with ``R`` rows
    there (or in dimension 0) are split, all others are shared by the examples; an
    output tensor without ``R`` rows gets no batch dimension, and a gradient
    arriving there is refused (:meth:`rows`).

    Attributes:
        name: The module's name, for messages.
        args: Positional inputs, detached.
        kwargs: Keyword inputs, detached.
        output_shapes: Shape of each output leaf (``None``: not a tensor).
        arg_dims: Batch dimension of each positional input (``None``: shared).
        kwarg_dims: Batch dimension of each keyword input.
        output_dims: Batch dimension of each output leaf.
        single: Whether the output is one tensor (closed forms apply).
        conventional: Whether the module's own convention set the dimensions.
        pre_hooked: Whether the module has forward pre-hooks: ``args`` and
            ``kwargs`` are then as the caller passed them, before the pre-hooks
            (which the per-example gradients replay), and the closed forms, which
            read the input that ``forward`` receives, do not apply.
        memo: What every backward pass of the call reuses (an embedding's rows:
            found once, not once per pass, since ``unique`` syncs with the host).
    """

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output_shapes: tuple[tuple[int, ...] | None, ...]
    arg_dims: tuple[Any, ...] = ()
    kwarg_dims: dict[str, Any] = field(default_factory=dict)
    output_dims: tuple[int | None, ...] = ()
    single: bool = False
    conventional: bool = False
    pre_hooked: bool = False
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def of(
        cls,
        name: str,
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        output: Any,
        batch: int | None = None,
        batch_dim: int = 0,
        pre_hooked: bool = False,
    ) -> ModuleCall:
        """Record a call: detach its inputs and find the batch dimensions.

        Args:
            name: The module's name, for messages.
            module: The module.
            args: Its positional inputs.
            kwargs: Its keyword inputs.
            output: What it returned.
            batch: The number of examples of the forward pass, if known.
            batch_dim: The outputs' batch dimension (modules without a
                convention).
            pre_hooked: Whether ``args`` / ``kwargs`` precede forward pre-hooks.

        Returns:
            The call.

        Raises:
            UnsplittableCallError: For a recurrent layer or attention called on an
                unbatched or packed sequence, or with a 3-D attention mask.
        """
        leaves = tree_flatten(output)[0]
        call = cls(
            name,
            detach_inputs(args),
            detach_inputs(kwargs),
            tuple(tuple(x.shape) if isinstance(x, Tensor) else None for x in leaves),
            single=isinstance(output, Tensor),
            pre_hooked=pre_hooked,
        )
        convention = module_kind(module).convention(name, module, args, kwargs, leaves)
        if convention is None:
            return call.located(batch_dim, batch)
        call.arg_dims, call.kwarg_dims, call.output_dims = convention
        call.conventional = True
        return call

    def located(self, batch_dim: int, batch: int | None = None) -> ModuleCall:
        """The call with its batch in dimension ``batch_dim`` of the outputs.

        Args:
            batch_dim: The outputs' batch dimension.
            batch: The number of examples of the forward pass, if known.

        Returns:
            A new call (a conventional one unchanged).
        """
        if self.conventional:
            return self
        sizes = [
            shape[batch_dim]
            for shape in self.output_shapes
            if shape is not None
            and len(shape) > batch_dim
            and (batch is None or shape[batch_dim] % batch == 0)
        ]
        rows = max(sizes, key=sizes.count) if sizes else -1

        def dim(value: Any) -> int | None:
            if not isinstance(value, Tensor) or value.ndim == 0:
                return None
            if value.ndim > batch_dim and value.shape[batch_dim] == rows:
                return batch_dim
            return 0 if value.shape[0] == rows else None

        output_dims = tuple(
            batch_dim
            if shape is not None and len(shape) > batch_dim and shape[batch_dim] == rows
            else None
            for shape in self.output_shapes
        )
        return replace(
            self,
            arg_dims=tree_map(dim, self.args),
            kwarg_dims=tree_map(dim, self.kwargs),
            output_dims=output_dims,
        )

    @property
    def batch_first(self) -> bool:
        """Whether every batched tensor of the call has its batch in dimension 0."""
        dims = tree_flatten((self.arg_dims, self.kwarg_dims, self.output_dims))[0]
        return all(dim in (0, None) for dim in dims)

    def rows(self, module: nn.Module, grad_outputs: Sequence[Tensor | None]) -> int:
        """The number of rows (examples, or ``B·m`` folded rows) of the call.

        Args:
            module: The module, for messages.
            grad_outputs: Gradient at each output leaf (``None``: none arrived).

        Returns:
            The size of the batch dimension.

        Raises:
            UnsplittableCallError: If a gradient arrives at an output without a
                batch dimension.
        """
        rows = None
        for gradient, dim in zip(grad_outputs, self.output_dims):
            if gradient is None:
                continue
            if dim is None:
                raise UnsplittableCallError(
                    self.name,
                    module,
                    f"returns a tensor of shape {tuple(gradient.shape)} that the "
                    "outputs depend on, without the batch in dimension 0",
                )
            rows = gradient.shape[dim] if rows is None else rows
        if rows is None:
            raise ValueError(f"No output of module '{self.name}' received a gradient.")
        return rows


def per_example_gradients(
    module: nn.Module,
    names: Sequence[str],
    call: ModuleCall,
    grad_outputs: Sequence[Tensor | None],
) -> list[Tensor]:
    """Per-example gradients of ``module``'s parameters for one output gradient.

    For each example ``n`` this is ``∂⟨g_n, m(x_n; θ)⟩/∂θ``, the vector-Jacobian
    product of the module's forward on that example alone with its output
    gradients ``g_n`` (one per output leaf; ``None`` where none arrived). The call
    is replayed through ``torch.func.functional_call``: the module's forward
    pre-hooks run (a pruned layer's computes its weight from ``weight_orig``), its
    own forward hooks do not (``g_n`` arrived at the output of ``forward``, before
    them), and tensor attributes that the pre-hooks set on the module (a pruned
    layer's ``weight``) are restored afterwards.

    Args:
        module: A module whose forward treats examples independently (norm layers in
            eval mode, embeddings, recurrent layers, attention, ...).
        names: Names of the parameters of ``module`` to differentiate, relative to
            it (``"weight"``, ``"parametrizations.weight.original"``).
        call: Its forward call, with the batch dimension of every tensor.
        grad_outputs: Gradient at each output leaf of the call.

    Returns:
        One tensor per name, shape ``(R, *parameter.shape)`` with ``R`` the rows of
        the call (its examples).
    """
    rows = call.rows(module, grad_outputs)
    params = {name: module.get_parameter(name).detach() for name in names}
    wanted = [i for i, gradient in enumerate(grad_outputs) if gradient is not None]
    leaf_dims = [call.output_dims[i] for i in wanted]
    gradients = tuple(grad_outputs[i] for i in wanted)

    def one_example(
        example_args: tuple[Any, ...],
        example_kwargs: dict[str, Any],
        example_gradients: tuple[Tensor, ...],
    ) -> dict[str, Tensor]:
        call_args = _unsqueezed(example_args, call.arg_dims)
        call_kwargs = _unsqueezed(example_kwargs, call.kwarg_dims)

        def forward(p: dict[str, Tensor]) -> tuple[Tensor, ...]:
            leaves = tree_flatten(functional_call(module, p, call_args, call_kwargs))
            return tuple(leaves[0][i] for i in wanted)

        _, pullback = vjp(forward, params)
        cotangents = tuple(
            g.unsqueeze(dim) for g, dim in zip(example_gradients, leaf_dims)
        )
        return pullback(cotangents)[0]

    with forward_hooks_suspended(module), _tensor_attributes_kept(module):
        return _replayed(module, names, call, one_example, gradients, leaf_dims, rows)


def _replayed(
    module: nn.Module,
    names: Sequence[str],
    call: ModuleCall,
    one_example: Any,
    gradients: tuple[Tensor, ...],
    leaf_dims: list[int | None],
    rows: int,
) -> list[Tensor]:
    """``one_example`` over the rows: ``vmap``, or a loop for recurrent layers."""
    if not module_kind(module).vmappable:  # e.g. no batching rule (recurrent)
        per_row = [
            one_example(
                _selected(call.args, call.arg_dims, n),
                _selected(call.kwargs, call.kwarg_dims, n),
                tuple(g.select(dim, n) for g, dim in zip(gradients, leaf_dims)),
            )
            for n in range(rows)
        ]
        return [torch.stack([grads[name] for grads in per_row]) for name in names]
    numbers = sum(module.get_parameter(name).numel() for name in names)
    chunk = max(1, min(rows, CHUNK_NUMBERS // max(numbers, 1)))
    with warnings.catch_warnings():
        # functorch runs ops without a batching rule (attention kernels) in a loop:
        # slower, not different.
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads = vmap(
            one_example,
            in_dims=(call.arg_dims, call.kwarg_dims, tuple(leaf_dims)),
            chunk_size=chunk,
        )(call.args, call.kwargs, gradients)
    return [grads[name] for name in names]


@contextmanager
def _tensor_attributes_kept(module: nn.Module) -> Iterator[None]:
    """Restore the plain tensor attributes of ``module`` and its submodules.

    A pruned (or old-style weight-normed) layer's pre-hook sets its ``weight``
    attribute from its parameters on every call; replayed under ``vmap`` it would
    leave a batched tensor there.
    """
    saved = [
        (child, {k: v for k, v in vars(child).items() if isinstance(v, Tensor)})
        for child in module.modules()
    ]
    try:
        yield
    finally:
        for child, attributes in saved:
            vars(child).update(attributes)


def _unsqueezed(values: Any, dims: Any) -> Any:
    """Put back the batch dimension that ``vmap`` (or the loop) took away."""
    return tree_map(
        lambda value, dim: value if dim is None else value.unsqueeze(dim),
        values,
        dims,
        is_leaf=lambda x: x is None,
    )


def _selected(values: Any, dims: Any, n: int) -> Any:
    """Example ``n`` of every batched tensor (the batch dimension removed)."""
    return tree_map(
        lambda value, dim: value if dim is None else value.select(dim, n),
        values,
        dims,
        is_leaf=lambda x: x is None,
    )


def restricted_gradients(
    module: nn.Module,
    names: Sequence[str],
    call: ModuleCall,
    grad_outputs: Sequence[Tensor | None],
) -> list[tuple[Tensor | None, Tensor]]:
    """Per-example gradients, restricted to the rows a batch can touch.

    An embedding table only receives gradient in the rows of the tokens of the
    batch, so its per-example gradients are returned on those rows only (``R`` rows
    instead of the whole vocabulary); every other parameter is returned whole.

    Args:
        module: The module (see :func:`per_example_gradients`).
        names: Names of its parameters to differentiate.
        call: Its forward call.
        grad_outputs: Gradient at each output leaf of the call.

    Returns:
        Per name ``(rows, gradients)``: ``rows`` of shape ``(R,)`` with gradients of
        shape ``(B, R, D)``, or ``None`` with gradients ``(B, *parameter.shape)``.
    """
    if call.single and call.batch_first and _plain_call(names, call):
        (grad_output,) = grad_outputs
        closed = module_kind(module).closed_form(
            module, names, call.args, call.kwargs, grad_output, call.memo
        )
        if closed is not None:
            return closed
    grads = per_example_gradients(module, names, call, grad_outputs)
    return [(None, grad) for grad in grads]


def on_every_row(rows: Tensor | None, grads: Tensor, shape: Sequence[int]) -> Tensor:
    """Per-example gradients of :func:`restricted_gradients` on the whole parameter.

    Args:
        rows: The rows they are restricted to (an embedding's), or ``None``.
        grads: Shape ``(B, R, D)`` on ``rows``, else ``(B, *shape)``.
        shape: The parameter's shape.

    Returns:
        Shape ``(B, *shape)``, zero on the rows the batch does not use.
    """
    if rows is not None:
        grads = grads.new_zeros(len(grads), *shape).index_add_(1, rows, grads)
    return grads.reshape(len(grads), *shape)


def _plain_call(names: Sequence[str], call: ModuleCall) -> bool:
    """Whether the closed forms apply: plain parameters, no pre-hooks."""
    return not call.pre_hooked and set(names) <= {"weight", "bias"}


def detach_inputs(value: Any) -> Any:
    """Detach every tensor in (nested tuples / dicts of) forward inputs.

    Args:
        value: A tensor, a tuple or dict of them, or anything else (kept).

    Returns:
        The same structure with detached tensors.
    """
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(detach_inputs(v) for v in value)
    if isinstance(value, dict):
        return {key: detach_inputs(v) for key, v in value.items()}
    return value


def check_diagonal_module(name: str, module: nn.Module) -> None:
    """Refuse a module whose per-example curvature is undefined (its kind says).

    Args:
        name: The module's name in the model, for the message.
        module: The module.

    Raises:
        ValueError: For example for a batch-norm layer in training mode (its output
            depends on the whole batch) or an embedding with ``max_norm`` (it
            changes its weights in the forward pass); see
            :mod:`ekfac_laplace.module_kinds`.
    """
    module_kind(module).check(name, module)
