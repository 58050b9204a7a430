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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

# Per-example gradients are computed in chunks of examples holding at most this many
# numbers (chunk × parameters of the module), e.g. 64 MiB in float32.
CHUNK_NUMBERS = 2**24
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def per_example_gradients(
    module: nn.Module,
    names: Sequence[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_output: Tensor,
) -> list[Tensor]:
    """Per-example gradients of ``module``'s parameters for one output gradient.

    For each example ``n`` this is ``∂⟨g_n, m(x_n; θ)⟩/∂θ``, the vector-Jacobian
    product of the module's forward on that example alone with its output
    gradient ``g_n``.

    Args:
        module: A module whose forward treats examples independently (norm layers in
            eval mode, embeddings, ...), called with ``args`` / ``kwargs``.
        names: Names of the parameters of ``module`` (non-recursive) to differentiate.
        args: Positional inputs of the forward pass; tensors whose first dimension is
            the batch size are split into examples, everything else is shared.
        kwargs: Keyword inputs, shared by all examples.
        grad_output: Gradient at the module's output, shape ``(B, ...)``.

    Returns:
        One tensor per name, shape ``(B, *parameter.shape)``.
    """
    batch = grad_output.shape[0]
    params = {name: module.get_parameter(name).detach() for name in names}
    in_dims = tuple(
        0 if isinstance(a, Tensor) and a.ndim > 0 and a.shape[0] == batch else None
        for a in args
    )

    def one_example(example_args: tuple[Any, ...], gradient: Tensor) -> Any:
        call_args = tuple(
            a.unsqueeze(0) if dim == 0 else a for a, dim in zip(example_args, in_dims)
        )

        def forward(p: dict[str, Tensor]) -> Tensor:
            return functional_call(module, p, call_args, kwargs)

        _, pullback = vjp(forward, params)
        return pullback(gradient.unsqueeze(0))[0]

    numbers = sum(p.numel() for p in params.values())
    chunk = max(1, min(batch, CHUNK_NUMBERS // max(numbers, 1)))
    grads = vmap(one_example, in_dims=(in_dims, 0), chunk_size=chunk)(args, grad_output)
    return [grads[name] for name in names]


def restricted_gradients(
    module: nn.Module,
    names: Sequence[str],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grad_output: Tensor,
) -> list[tuple[Tensor | None, Tensor]]:
    """Per-example gradients, restricted to the rows a batch can touch.

    An embedding table only receives gradient in the rows of the tokens of the
    batch, so its per-example gradients are returned on those rows only (``R`` rows
    instead of the whole vocabulary); every other parameter is returned whole.

    Args:
        module: The module (see :func:`per_example_gradients`).
        names: Names of its parameters to differentiate.
        args: Positional inputs of its forward pass.
        kwargs: Keyword inputs.
        grad_output: Gradient at its output, shape ``(B, ...)``.

    Returns:
        Per name ``(rows, gradients)``: ``rows`` of shape ``(R,)`` with gradients of
        shape ``(B, R, D)``, or ``None`` with gradients ``(B, *parameter.shape)``.
    """
    if _simple_embedding(module, names, args, kwargs):
        return [_embedding_rows(module, _rows_of(args[0], grad_output), grad_output)]
    normalised = _normalised_input(module, args, kwargs)
    if normalised is not None:
        normalised = _rows_of(normalised, grad_output)
        grads = _affine_gradients(module, names, normalised, grad_output)
    else:
        grads = per_example_gradients(module, names, args, kwargs, grad_output)
    return [(None, grad) for grad in grads]


def _rows_of(tensor: Tensor, grad_output: Tensor) -> Tensor:
    """A one-row input shared by the batch, expanded to the gradient's rows."""
    if tensor.shape[0] == 1 and grad_output.shape[0] > 1:
        return tensor.expand(grad_output.shape[0], *tensor.shape[1:])
    return tensor


def _normalised_input(
    module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor | None:
    """``x̂`` of a batch norm (running statistics) or layer norm, else ``None``.

    Both are ``y = γ ⊙ x̂ + β`` with ``x̂`` independent of ``γ`` and ``β``, so the
    per-example gradients are ``Σ g ⊙ x̂`` and ``Σ g`` over the positions.
    """
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    if type(module) in BATCH_NORMS[:3] and module.running_mean is not None:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        mean = module.running_mean.reshape(shape)
        var = module.running_var.reshape(shape)
        return (x - mean) / torch.sqrt(var + module.eps)
    if type(module) is nn.LayerNorm:
        dims = tuple(range(x.ndim - len(module.normalized_shape), x.ndim))
        mean = x.mean(dim=dims, keepdim=True)
        var = x.var(dim=dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + module.eps)
    return None


def _affine_gradients(
    module: nn.Module, names: Sequence[str], normalised: Tensor, grad_output: Tensor
) -> list[Tensor]:
    """Per-example ``∂/∂γ = Σ g ⊙ x̂`` and ``∂/∂β = Σ g`` of a normalisation layer."""
    batch = grad_output.shape[0]
    if isinstance(module, nn.LayerNorm):
        shape = tuple(module.normalized_shape)
        flat = (batch, -1, *shape)  # (B, positions, *normalized_shape)
        g, x = grad_output.reshape(flat), normalised.reshape(flat)
    else:  # batch norm: channels in dimension 1
        channels = grad_output.shape[1]
        g = grad_output.reshape(batch, channels, -1).transpose(1, 2)
        x = normalised.reshape(batch, channels, -1).transpose(1, 2)
    per_name = {"weight": lambda: (g * x).sum(1), "bias": lambda: g.sum(1)}
    return [per_name[name]() for name in names]


def _simple_embedding(
    module: nn.Module, names: Sequence[str], args: tuple[Any, ...], kwargs: dict
) -> bool:
    """Whether ``module`` is an embedding lookup with index inputs.

    ``scale_grad_by_freq`` rescales autograd's gradient, not the Jacobian, so the
    closed form holds for it too; ``max_norm`` is refused earlier.
    """
    return (
        type(module) is nn.Embedding
        and list(names) == ["weight"]
        and len(args) == 1
        and not kwargs
        and isinstance(args[0], Tensor)
        and not args[0].is_floating_point()
    )


def _embedding_rows(
    module: nn.Embedding, indices: Tensor, grad_output: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-example gradients of an embedding table on the rows the batch uses."""
    batch = indices.shape[0]
    tokens = indices.reshape(batch, -1)
    grads = grad_output.reshape(batch, tokens.shape[1], -1)
    if module.padding_idx is not None:  # the padding row receives no gradient
        grads = grads * (tokens != module.padding_idx).unsqueeze(-1)
    rows, position = torch.unique(tokens, return_inverse=True)
    summed = grads.new_zeros(batch, len(rows), grads.shape[-1])
    summed.scatter_add_(1, position.unsqueeze(-1).expand_as(grads), grads)
    return rows, summed


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
    """Refuse modules whose examples are coupled in the forward pass.

    Args:
        name: The module's name in the model, for the message.
        module: The module.

    Raises:
        ValueError: For a batch-norm layer in training mode (its output depends on
            the whole batch, so per-example gradients are not defined) and an
            embedding with ``max_norm`` (it changes its weights in the forward pass).
    """
    if isinstance(module, nn.Embedding) and module.max_norm is not None:
        raise ValueError(
            f"Embedding '{name}' has max_norm={module.max_norm}: it renormalises its "
            "weights in place during every forward pass, so there is no fixed MAP "
            "to linearise around. Use max_norm=None, or freeze it with "
            "requires_grad_(False)."
        )
    if isinstance(module, BATCH_NORMS) and module.training:
        raise ValueError(
            f"{type(module).__name__} '{name}' is in training mode, where its output "
            "depends on the whole batch; call model.eval() before fitting "
            "(laplace-torch's fit does)."
        )
    if isinstance(module, BATCH_NORMS) and module.running_mean is None:
        raise ValueError(
            f"{type(module).__name__} '{name}' has track_running_stats=False, so "
            "even in eval mode its output depends on the whole batch; per-example "
            "curvature is not defined. Track running statistics, or freeze it with "
            "requires_grad_(False)."
        )
