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

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace.capture import ForwardCapture
from ekfac_laplace.diagonal import ModuleCall, restricted_gradients
from ekfac_laplace.layout import (
    KroneckerLayer,
    ParameterLayout,
    group_rows,
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
    dense_blocks_up_to: int = 0,
    batch_dims: Mapping[str, int] | None = None,
) -> tuple[Tensor, Tensor]:
    """GLM predictive mean and covariance ``J P⁻¹ Jᵀ``, without Jacobians.

    A module that sees ``B·m`` rows (a reward model's pairs folded into the batch)
    has each input's ``m`` consecutive rows grouped as positions, as in the fit
    (:func:`~ekfac_laplace.layout.group_rows`).

    Args:
        model: The network (the modules owning ``params`` must run once per forward
            pass).
        params: The parameters of the posterior, in vector order.
        precision: The posterior precision over ``params``.
        X: A batch of inputs.
        joint: Return the joint covariance over all inputs and outputs.
        batch: The number of inputs (default: ``X.shape[0]`` for a tensor), so that
            a module whose one output row is shared by all inputs gets each input's
            gradient (see :class:`~ekfac_laplace.capture.ForwardCapture`).
        dense_blocks_up_to: The fit's option (which blocks are exact).
        batch_dims: Module name to the dimension of its tensors that holds the
            batch where it is not 0, as the fit found it
            (:attr:`~ekfac_laplace.factors.EKFACFactors.batch_dims`); ``None``:
            found here, at the cost of two backward passes where a shape is
            ambiguous (a ``(B, T, d)`` tensor with ``T`` a multiple of ``B``).

    Token-level outputs ``(B, T, C)`` are one example per token: the outputs
    ``(t, c)`` of a sequence take one backward pass each (``T·C``), and each token
    is returned as a row, ``f`` of shape ``(B·T, C)`` with covariance
    ``(B·T, C, C)`` (laplace-torch's link functions take rows), or jointly over all
    ``B·T·C`` outputs.

    Returns:
        ``f`` of shape ``(B, K)`` and the covariance of shape ``(B, K, K)``, or
        with ``joint=True`` ``f.flatten()`` of shape ``(B·K,)`` and the covariance of
        shape ``(B·K, B·K)`` (ordered input-major, as laplace-torch).

    Raises:
        CaptureError: (a ``ValueError``) if a module runs more than once per forward
            pass, a diagonal module's examples cannot be told apart, or a module
            sees a number of rows that is not a multiple of the inputs; the caller
            can fall back to the dense Jacobian.
    """
    layout = ParameterLayout.fitted(
        model, params, precision.eigenvectors, dense_blocks_up_to
    )
    if batch is None and isinstance(X, Tensor):
        batch = X.shape[0]
    capture = ForwardCapture(layout, batch=batch, batch_dims=batch_dims)
    with capture:
        f = model(X)
    tokens = f.shape[1:] if f.ndim == 3 else None
    if f.shape[0] == 0:  # no inputs: empty results of the right shapes
        return _empty(f.detach(), joint)
    f = f.flatten(start_dim=1)
    B, K = f.shape
    targets = layout.backprop_targets()
    if batch_dims is None:
        capture.locate_batches(f, targets, check=False)
    for c in range(K):
        torch.autograd.grad(
            f[:, c].sum(), targets, retain_graph=c < K - 1, allow_unused=True
        )
    variance = f.new_zeros(B, K, B, K) if joint else f.new_zeros(B, K, K)
    for layer in layout.layers:
        gradients = capture.take_gradients(layer.name)
        if not gradients:
            continue  # the layer does not influence the outputs
        g = bias_rows = None  # (B, K, S, d) each
        if layer.shares_weight or layer.dense_needs_rows:
            g = _stacked(gradients, layer.output_gradients, B, layer.name)
        if layer.separate_bias or layer.dense_needs_bias_rows:
            bias_rows = _stacked(gradients, layer.bias_gradients, B, layer.name)
        rows = {"weight": g, "bias": g if bias_rows is None else bias_rows}
        a = group_rows(layer.inputs(capture.take_input(layer.name)), B, layer.name)
        if layer.has_kronecker:
            variance = variance + _layer_term(layer, precision, rows, a, joint)
        variance = variance + _dense_layer_term(layer, precision, rows, a, joint)
    for entry in layout.diagonal_modules:
        passes = capture.take_gradients(entry.name)
        if not passes:
            continue
        call = capture.calls[entry.name]
        for name, index in zip(entry.param_names, entry.indices):
            variance = variance + _diagonal_term(
                entry.module, name, call, passes, precision, index, B, joint
            )
    if joint:
        return f.detach().flatten(), variance.reshape(B * K, B * K)
    if tokens is not None:  # each token's (C, C) block, one row per token
        T, C = tokens
        blocks = variance.reshape(B, T, C, T, C).diagonal(dim1=1, dim2=3)
        variance = blocks.permute(0, 3, 1, 2).reshape(B * T, C, C)
        return f.detach().reshape(B * T, C), variance
    return f.detach(), variance


def _stacked(
    gradients: list[Tensor],
    rows_of: Callable[[Tensor], Tensor],
    batch: int,
    name: str,
) -> Tensor:
    """Per output ``c``, a layer's rows ``(B, S, d)`` of its pass: ``(B, K, S, d)``."""
    return torch.stack(
        [group_rows(rows_of(gradient), batch, name) for gradient in gradients], dim=1
    )


def _empty(f: Tensor, joint: bool) -> tuple[Tensor, Tensor]:
    """The predictive of no inputs: ``(0, K)`` and ``(0, K, K)`` (joint: ``(0, 0)``)."""
    K = f.shape[-1]
    if joint:
        return f.reshape(0), f.new_zeros(0, 0)
    return f.reshape(0, K), f.new_zeros(0, K, K)


def _layer_term(
    layer: KroneckerLayer,
    precision: EKFACDecomposed,
    rows: dict[str, Tensor | None],
    a: Tensor,
    joint: bool,
) -> Tensor:
    """The covariance terms of one Kronecker layer's weight and bias blocks.

    A grouped layer has each group in its own basis: ``J̃_{n,c,g} = Σ_s
    (Q_G^gᵀ g_{n,c,s,g}) (Q_A^gᵀ a_{n,s,g})ᵀ``, squared against ``S_g`` and summed
    over the groups (the bias: ``Σ_s Q_G^gᵀ g_{n,c,s,g}``).

    Args:
        layer: The layer.
        precision: The posterior precision.
        rows: Its output Jacobians ``g`` ``(B, K, S, out)`` under ``"weight"``,
            and the bias's rows under ``"bias"`` (the same unless the bias has a
            factor of its own).
        a: Its inputs, ``(B, S, in)``.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    G = layer.groups
    term = 0
    if layer.bias_index is not None:
        (q_b,) = precision.eigenvectors[layer.bias_index]
        inverse = precision.powered_eigenvalues(layer.bias_index, -1)
        summed = rows["bias"].sum(2).to(q_b.dtype)  # (B, K, G·out): Σ_s first
        if q_b.ndim == 3:  # per group (a bias that shares G)
            rotated = torch.einsum(
                "bkgo,gop->bkgp", summed.reshape(*summed.shape[:2], G, -1), q_b
            )
            rotated, inverse = rotated.flatten(2), inverse.flatten()
        else:
            rotated = summed @ q_b
        term = term + _squared(rotated, inverse, joint)
    if layer.weight_index is not None:
        q_g, q_a, inverse = layer.factor_block(
            precision.eigenvectors[layer.weight_index],
            precision.powered_eigenvalues(layer.weight_index, -1),
        )
        g, a = rows["weight"].to(q_g.dtype), a.to(q_a.dtype)
        if G == 1 and a.shape[1] == 1:  # one position: no (out, in) Jacobian
            term = term + _weight_term(g[:, :, 0] @ q_g, a[:, 0] @ q_a, inverse, joint)
        else:
            if G == 1:
                q_g, q_a, inverse = q_g[None], q_a[None], inverse[None]
            J = _rotated_jacobians(
                g.reshape(*g.shape[:3], G, -1), a.reshape(*a.shape[:2], G, -1), q_g, q_a
            )
            term = term + _squared(J.flatten(2), inverse.flatten(), joint)
    return term


def _rotated_jacobians(g: Tensor, a: Tensor, q_g: Tensor, q_a: Tensor) -> Tensor:
    """``J̃_{n,c,g} = Q_G^gᵀ (Σ_s g_{n,c,s,g} a_{n,s,g}ᵀ) Q_A^g``, in the cheaper order.

    Rotating every position first costs ``B·K·S·out² + B·S·in²`` multiply-adds,
    summing over the positions first ``B·K·(out²·in + out·in²)`` (both plus the
    ``B·K·S·out·in`` of the sum): a LoRA factor of rank ``r`` (``in = r`` or
    ``out = r``) over ``S`` tokens is far cheaper summed first, a convolution over
    few positions rotated first.

    Args:
        g: Output Jacobians, ``(B, K, S, G, out)``.
        a: Inputs, ``(B, S, G, in)``.
        q_g: Per group, ``Q_G``, ``(G, out, out)``.
        q_a: Per group, ``Q_A``, ``(G, in, in)``.

    Returns:
        ``(B, K, G, out, in)``.
    """
    B, K, S, _, out = g.shape
    width = a.shape[-1]
    per_position = B * K * S * out * out + B * S * width * width
    per_sequence = B * K * (out * out * width + out * width * width)
    if per_position <= per_sequence:
        g = torch.einsum("bksgo,gop->bksgp", g, q_g)
        a = torch.einsum("bsgi,gij->bsgj", a, q_a)
        return torch.einsum("bksgo,bsgi->bkgoi", g, a)
    J = torch.einsum("bksgo,bsgi->bkgoi", g, a)
    J = torch.einsum("gop,bkgoi->bkgpi", q_g, J)  # one product per group, not a
    return torch.einsum("bkgpi,giq->bkgpq", J, q_a)  # broadcast batch of them


def _squared(rotated: Tensor, inverse: Tensor, joint: bool) -> Tensor:
    """``Σ_i R_{n,c,i} R_{m,c',i} S_i``: rotated Jacobian rows against ``S``.

    Args:
        rotated: Jacobian rows in the block's eigenbasis, ``(B, K, n)``.
        inverse: ``S = 1/(hλ+δ)``, ``(n,)``.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    scaled = rotated * inverse
    if joint:
        B, K, n = rotated.shape
        return (scaled.reshape(B * K, n) @ rotated.reshape(B * K, n).T).reshape(
            B, K, B, K
        )
    return scaled @ rotated.mT


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


def _dense_layer_term(
    layer: KroneckerLayer,
    precision: EKFACDecomposed,
    rows: dict[str, Tensor | None],
    a: Tensor,
    joint: bool,
) -> Tensor:
    """The terms of a layer's exact (dense) blocks, from its Jacobian rows.

    A weight's rows are ``vec(Σ_s g_{n,c,s} a_{n,s}ᵀ)`` in the weight's own layout,
    a bias's ``Σ_s g_{n,c,s}``; each is rotated by the block's ``Q`` and squared
    against ``S = 1/(hλ+δ)``.
    """
    term = 0
    if layer.dense_weight_index is not None:
        g = rows["weight"]
        G = layer.groups
        per_example = torch.einsum(
            "bksgo,bsgi->bkgoi",
            g.reshape(*g.shape[:3], G, -1),
            a.to(g.dtype).reshape(*a.shape[:2], G, -1),
        )
        J = layer.kind.from_groups(per_example, layer.weight.shape).flatten(2)
        term = term + _dense_term(J, precision, layer.dense_weight_index, joint)
    if layer.dense_bias_index is not None:
        J = rows["bias"].sum(2)
        term = term + _dense_term(J, precision, layer.dense_bias_index, joint)
    return term


def _dense_term(
    J: Tensor, precision: EKFACDecomposed, index: int, joint: bool
) -> Tensor:
    """An exact block: ``Σ_i (J Q)_{n,c,i} (J Q)_{m,c',i} S_i``.

    Args:
        J: Jacobian rows of the block's parameter, ``(B, K, n)``.
        precision: The posterior precision.
        index: The block.
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    (q,) = precision.eigenvectors[index]
    inverse = precision.powered_eigenvalues(index, -1)
    return _squared(J.to(q.dtype) @ q, inverse, joint)


def _diagonal_term(
    module: nn.Module,
    name: str,
    call: ModuleCall,
    passes: list[tuple[Tensor | None, ...]],
    precision: EKFACDecomposed,
    index: int,
    batch: int,
    joint: bool,
) -> Tensor:
    """A diagonal block, ``Σ_i J_{n,c,i} J_{m,c',i} S_i``, or an exact one.

    Args:
        module: The owning module.
        name: The parameter's name in it.
        call: The module's forward call.
        passes: Per output ``c`` (``K``), the gradients at its output tensors.
        precision: The posterior precision.
        index: The parameter's block (diagonal, or exact: ``(Q,)``).
        batch: The number of inputs ``B`` (rows folded into it are summed).
        joint: Over all pairs of inputs, or per input.

    Returns:
        ``(B, K, B, K)`` or ``(B, K, K)``.
    """
    dense = bool(precision.eigenvectors[index])
    inverse = precision.powered_eigenvalues(index, -1)
    restricted = [
        restricted_gradients(module, [name], call, gradients)[0] for gradients in passes
    ]
    rows = restricted[0][0]
    # Per-example Jacobian rows: (B, K, numel), or (B, K, R·D) on the used rows.
    J = torch.stack(
        [
            group_rows(grad.unsqueeze(1), batch, call.name).sum(1)
            for _, grad in restricted
        ],
        dim=1,
    )
    if dense:  # every entry's row (an embedding's unused rows: zero)
        if rows is not None:
            shape = module.get_parameter(name).shape
            J = J.new_zeros(*J.shape[:2], *shape).index_add_(2, rows, J)
        return _dense_term(J.flatten(start_dim=2), precision, index, joint)
    J = J.flatten(start_dim=2)
    inverse = (inverse if rows is None else inverse[rows]).flatten()
    return _squared(J.to(inverse.dtype), inverse, joint)
