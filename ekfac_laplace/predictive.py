r"""Jacobian-free GLM predictive covariance for EKFAC posteriors.

The GLM predictive covariance is ``J P⁻¹ Jᵀ`` with ``J`` the Jacobian of the outputs
``(B, K)`` w.r.t. the parameters; ``P⁻¹`` is block-diagonal, so the covariance is a
sum over blocks, and no block needs the ``(B, K, parameters)`` Jacobian. For a
``Linear`` or ``Conv2d`` weight the Jacobian factorises through the layer inputs
``a_{n,s}`` and the back-propagated output Jacobians ``g_{n,c,s}`` (``s`` runs over
the positions sharing the weight): ``∂f_{n,c}/∂W = Σ_s g_{n,c,s} a_{n,s}ᵀ``. In the
eigenbasis, with ``g̃ = Q_Gᵀ g``, ``ã = Q_Aᵀ a`` and ``S = 1/(hλ+δ)``,

$$
    \mathrm{Cov}[f_{n,c}, f_{m,c'}]_W = \sum_{i,j} \tilde J_{n,c,i,j}
    \tilde J_{m,c',i,j} S_{i,j}, \qquad
    \tilde J_{n,c} = \sum_s \tilde g_{n,c,s} \tilde a_{n,s}^\top ,
$$

which without weight sharing (one position) reduces to
``Σ_i g̃_{n,c,i} g̃_{m,c',i} Σ_j ã_{n,j} ã_{m,j} S_{i,j}``. A bias block contributes
``Σ_i (Σ_s g̃_{n,c,s,i}) (Σ_s g̃_{m,c',s,i}) S_i``, and a diagonal block (a parameter
KFAC cannot factorise) ``Σ_i J_{n,c,i} J_{m,c',i} S_i`` from the per-example
gradients of its module alone. One function per kind of block computes its term,
per input (``n = m``) or jointly over all inputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace.diagonal import restricted_gradients
from ekfac_laplace.layout import (
    ForwardCapture,
    ParameterBlock,
    ParameterLayout,
    RowGroupingError,
    layer_positions,
)
from ekfac_laplace.matrix import EKFACDecomposed


@torch.enable_grad()
def glm_predictive_variance(
    model: nn.Module,
    params: Sequence[Tensor],
    precision: EKFACDecomposed,
    X: Tensor | Mapping[str, Any],
    joint: bool = False,
    batch: int | None = None,
) -> tuple[Tensor, Tensor]:
    """GLM predictive mean and covariance ``J P⁻¹ Jᵀ``, without Jacobians.

    Args:
        model: The network (the modules owning ``params`` must run once per forward
            pass).
        params: The parameters of the posterior, in vector order.
        precision: The posterior precision over ``params``.
        X: A batch of inputs.
        joint: Return the joint covariance over all inputs and outputs.
        batch: The number of inputs (default: ``X.shape[0]`` for a tensor), so that
            a module whose one output row is shared by all inputs gets each input's
            gradient (see :class:`~ekfac_laplace.layout.ForwardCapture`).

    Returns:
        ``f`` of shape ``(B, K)`` and the covariance of shape ``(B, K, K)``, or
        with ``joint=True`` ``f.flatten()`` of shape ``(B·K,)`` and the covariance of
        shape ``(B·K, B·K)`` (ordered input-major, as laplace-torch).

    Raises:
        CaptureError: (a ``ValueError``) if a module runs more than once per forward
            pass, a diagonal module does not return one tensor, or a module sees
            more rows than there are inputs; the caller can fall back to the dense
            Jacobian.
    """
    layout = ParameterLayout(model, params)
    if batch is None and isinstance(X, Tensor):
        batch = X.shape[0]
    capture = ForwardCapture(layout, batch=batch)
    with capture:
        f = model(X)
    B, K = f.shape
    targets = layout.backprop_targets()
    for c in range(K):
        torch.autograd.grad(
            f[:, c].sum(), targets, retain_graph=c < K - 1, allow_unused=True
        )
    for name, gradients in capture.gradients.items():
        if gradients[0].shape[0] != B:  # rows folded into the batch: dense fallback
            raise RowGroupingError(name, gradients[0].shape[0], B)
    variance = f.new_zeros(B, K, B, K) if joint else f.new_zeros(B, K, K)
    for index, (block, basis) in enumerate(zip(layout.blocks, precision.eigenvectors)):
        output_gradients = capture.gradients.get(block.module)
        if not output_gradients:
            continue  # the module does not influence the outputs
        inverse = precision.powered_eigenvalues(index, -1)
        variance = variance + _block_term(
            model, block, basis, inverse, capture, output_gradients, joint
        )
    if joint:
        return f.detach().flatten(), variance.reshape(B * K, B * K)
    return f.detach(), variance


def _block_term(
    model: nn.Module,
    block: ParameterBlock,
    basis: tuple[Tensor, ...],
    inverse: Tensor,
    capture: ForwardCapture,
    output_gradients: list[Tensor],
    joint: bool,
) -> Tensor:
    """The covariance term of one block, by its kind.

    Args:
        model: The network.
        block: The parameter block.
        basis: Its eigenvectors (``()``, ``(Q_G,)`` or ``(Q_G, Q_A)``).
        inverse: ``S = 1/(hλ+δ)``, shaped like the block's eigenvalues.
        capture: What the modules saw in the forward pass.
        output_gradients: The module's output Jacobian row per output (``K``).
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    module = model.get_submodule(block.module)
    if block.diagonal:
        args, kwargs = capture.calls[block.module]
        return _diagonal_term(
            module, block.name, args, kwargs, output_gradients, inverse, joint
        )
    g = torch.stack(
        [layer_positions(module, grad, False) for grad in output_gradients], dim=1
    )  # (B, K, S, out)
    g_rot = g @ basis[0]
    if block.name == "bias":
        return _bias_term(g_rot, inverse, joint)
    a_rot = layer_positions(module, capture.inputs[block.module], True) @ basis[1]
    if a_rot.shape[1] == 1:
        return _weight_term(g_rot[:, :, 0], a_rot[:, 0], inverse, joint)
    return _shared_weight_term(g_rot, a_rot, inverse, joint)


def _pair(per_input: str, joint: str, use_joint: bool) -> str:
    return joint if use_joint else per_input


def _bias_term(g_rot: Tensor, inverse: Tensor, joint: bool) -> Tensor:
    """A bias: ``Σ_i (Σ_s g̃_{n,c,s,i}) (Σ_s g̃_{m,c',s,i}) S_i``.

    Args:
        g_rot: Rotated output Jacobians, ``(B, K, S, out)``.
        inverse: ``S = 1/(hλ+δ)``, ``(out,)``.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    summed = g_rot.sum(2)
    pattern = _pair("bki,bli,i->bkl", "bki,cli,i->bkcl", joint)
    return torch.einsum(pattern, summed, summed, inverse)


def _weight_term(g_rot: Tensor, a_rot: Tensor, inverse: Tensor, joint: bool) -> Tensor:
    """A weight without sharing: ``Σ_i g̃_{n,c,i} g̃_{m,c',i} Σ_j ã_{n,j} ã_{m,j} S_ij``.

    Args:
        g_rot: Rotated output Jacobians, ``(B, K, out)``.
        a_rot: Rotated inputs, ``(B, in)``.
        inverse: ``S``, ``(out, in)``.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    if joint:
        weights = torch.einsum("bj,cj,ij->bci", a_rot, a_rot, inverse)
        return torch.einsum("bki,cli,bci->bkcl", g_rot, g_rot, weights)
    weights = a_rot.square() @ inverse.T  # (B, out)
    return torch.einsum("bki,bli,bi->bkl", g_rot, g_rot, weights)


def _shared_weight_term(
    g_rot: Tensor, a_rot: Tensor, inverse: Tensor, joint: bool
) -> Tensor:
    """A weight shared over positions: ``J̃ = Σ_s g̃ ãᵀ`` squared against ``S``.

    Args:
        g_rot: Rotated output Jacobians, ``(B, K, S, out)``.
        a_rot: Rotated inputs, ``(B, S, in)``.
        inverse: ``S``, ``(out, in)``.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    J = torch.einsum("bksi,bsj->bkij", g_rot, a_rot)
    pattern = _pair("bkij,blij,ij->bkl", "bkij,clij,ij->bkcl", joint)
    return torch.einsum(pattern, J, J, inverse)


def _diagonal_term(
    module: nn.Module,
    name: str,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output_gradients: list[Tensor],
    inverse: Tensor,
    joint: bool,
) -> Tensor:
    """A diagonal block: ``Σ_i J_{n,c,i} J_{m,c',i} S_i`` from per-example gradients.

    Args:
        module: The owning module.
        name: The parameter's name in it.
        args: The module's forward inputs.
        kwargs: Its keyword inputs.
        output_gradients: One output Jacobian row per output ``c`` (``K`` tensors).
        inverse: ``S``, shaped like the parameter.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    restricted = [
        restricted_gradients(module, [name], args, kwargs, grad)[0]
        for grad in output_gradients
    ]
    rows = restricted[0][0]
    # Per-example Jacobian rows: (B, K, numel), or (B, K, R·D) on the used rows.
    J = torch.stack([grad for _, grad in restricted], dim=1).flatten(start_dim=2)
    inverse = (inverse if rows is None else inverse[rows]).flatten()
    pattern = _pair("bkp,blp,p->bkl", "bkp,clp,p->bkcl", joint)
    return torch.einsum(pattern, J, J, inverse)
