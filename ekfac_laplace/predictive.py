r"""Jacobian-free GLM predictive variance for EKFAC posteriors.

For a ``Linear`` or ``Conv2d`` weight the Jacobian of output ``c`` for example ``n``
factorises through the layer inputs ``a_{n,s}`` and the back-propagated output
Jacobians ``g_{n,c,s}`` (``s`` runs over shared positions):
``∂f_{n,c}/∂W = Σ_s g_{n,c,s} a_{n,s}ᵀ``. In the eigenbasis, with
``g̃ = Q_Gᵀ g``, ``ã = Q_Aᵀ a`` and ``S = 1/(hλ+δ)``,

$$
    \mathrm{Cov}[f_{n,c}, f_{n,c'}]_W = \sum_{i,j} \tilde J_{n,c,i,j}
    \tilde J_{n,c',i,j} S_{i,j}, \qquad
    \tilde J_{n,c} = \sum_s \tilde g_{n,c,s} \tilde a_{n,s}^\top ,
$$

which for layers without weight sharing (one position) reduces to
``Σ_i g̃_{n,c,i} g̃_{n,c',i} (S ã_n²)_i``: no ``(batch, outputs, parameters)``
Jacobian is ever formed. A diagonal block (a parameter KFAC cannot factorise)
contributes ``Σ_i J_{n,c,i} J_{n,c',i} / (hλ_i+δ)`` from the per-example gradients
of its module alone.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace.curvature import _owning_modules
from ekfac_laplace.diagonal import detach_inputs, restricted_gradients
from ekfac_laplace.engine import layer_positions
from ekfac_laplace.matrix import EKFACDecomposed


class SharedModuleError(RuntimeError):
    """A module ran more than once in one forward pass; use the dense path."""


@torch.enable_grad()
def glm_predictive_variance(
    model: nn.Module,
    params: list[Tensor],
    precision: EKFACDecomposed,
    X: Tensor | MutableMapping[str, Any],
    joint: bool = False,
) -> tuple[Tensor, Tensor]:
    """GLM predictive mean and covariance ``J P⁻¹ Jᵀ``, without Jacobians.

    Args:
        model: The network (the modules owning ``params`` must run once per forward
            pass). Diagonal blocks use per-example gradients of their module.
        params: The parameters of the posterior, in vector order.
        precision: The posterior precision over ``params``.
        X: A batch of inputs.
        joint: Return the joint covariance over all inputs and outputs.

    Returns:
        ``f`` of shape ``(B, K)`` and the covariance of shape ``(B, K, K)``, or
        with ``joint=True`` ``f.flatten()`` of shape ``(B·K,)`` and the covariance of
        shape ``(B·K, B·K)`` (ordered input-major, as laplace-torch).

    Raises:
        SharedModuleError: If a module runs more than once per forward pass.
    """
    located = _owning_modules(model, params)
    modules = {entry.module: model.get_submodule(entry.module) for entry in located}
    diagonal = {entry.module for entry in located if entry.diagonal}
    inputs: dict[str, Any] = {}
    grads: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = []

    def forward_hook(name: str):
        def hook(
            module: nn.Module,
            args: tuple[Any, ...],
            kwargs: dict[str, Any],
            output: Tensor,
        ) -> None:
            if name in inputs:
                raise SharedModuleError(f"module '{name}' ran twice")
            if not isinstance(output, Tensor):
                raise SharedModuleError(f"module '{name}' has a non-tensor output")
            if name in diagonal:
                inputs[name] = (detach_inputs(args), detach_inputs(kwargs))
            else:
                inputs[name] = layer_positions(module, args[0].detach(), is_input=True)
            output.register_hook(lambda grad: grads[name].append(grad.detach()))

        return hook

    for name, module in modules.items():
        handles.append(
            module.register_forward_hook(forward_hook(name), with_kwargs=True)
        )
    try:
        f = model(X)
    finally:
        for handle in handles:
            handle.remove()

    B, K = f.shape
    for c in range(K):
        torch.autograd.grad(f[:, c].sum(), params, retain_graph=c < K - 1)

    variance = f.new_zeros(B, K, B, K) if joint else f.new_zeros(B, K, K)
    for index, ((name, kind, is_diagonal), basis) in enumerate(
        zip(located, precision.eigenvectors)
    ):
        module = modules[name]
        if is_diagonal:
            # Per-example Jacobian rows of this parameter: (B, K, numel).
            args, kwargs = inputs[name]
            restricted = [
                restricted_gradients(module, [kind], args, kwargs, grad)[0]
                for grad in grads[name]
            ]
            rows = restricted[0][0]
            J = torch.stack([grad for _, grad in restricted], dim=1)
            J = J.flatten(start_dim=2)  # (B, K, numel), or (B, K, R·D) on used rows
            inverse = precision.powered_eigenvalues(index, -1)
            inverse = (inverse if rows is None else inverse[rows]).flatten()
            pattern = "bkp,clp,p->bkcl" if joint else "bkp,blp,p->bkl"
            variance = variance + torch.einsum(pattern, J, J, inverse)
            continue
        g = torch.stack(
            [layer_positions(module, grad, is_input=False) for grad in grads[name]],
            dim=1,
        )  # (B, K, S, out)
        g_rot = g @ basis[0]
        inverse = precision.powered_eigenvalues(index, -1)
        if kind == "bias":
            summed = g_rot.sum(2)
            pattern = "bki,cli,i->bkcl" if joint else "bki,bli,i->bkl"
            variance = variance + torch.einsum(pattern, summed, summed, inverse)
            continue
        a_rot = inputs[name] @ basis[1]  # (B, S, in)
        if a_rot.shape[1] == 1:
            a_one, g_one = a_rot[:, 0], g_rot[:, :, 0]
            if joint:
                # M[b, c, i] = Σ_j ã_bj ã_cj S_ij
                weights = torch.einsum("bj,cj,ij->bci", a_one, a_one, inverse)
                term = torch.einsum("bki,cli,bci->bkcl", g_one, g_one, weights)
            else:
                weights = a_one.square() @ inverse.T  # (B, out)
                term = torch.einsum("bki,bli,bi->bkl", g_one, g_one, weights)
        else:
            J = torch.einsum("bksi,bsj->bkij", g_rot, a_rot)
            pattern = "bkij,clij,ij->bkcl" if joint else "bkij,blij,ij->bkl"
            term = torch.einsum(pattern, J, J, inverse)
        variance = variance + term
    if joint:
        return f.detach().flatten(), variance.reshape(B * K, B * K)
    return f.detach(), variance
