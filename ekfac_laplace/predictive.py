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
Jacobian is ever formed.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import torch
from torch import Tensor, nn

from ekfac_laplace.curvature import _owning_modules
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
        model: The network (``params`` must live in ``Linear``/``Conv2d`` modules
            that run once per forward pass, ``Conv2d`` without ``padding_mode``).
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
    modules = {name: model.get_submodule(name) for name, _ in located}
    inputs: dict[str, Tensor] = {}
    grads: dict[str, list[Tensor]] = {name: [] for name in modules}
    handles = []

    def forward_hook(name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            if name in inputs:
                raise SharedModuleError(f"module '{name}' ran twice")
            inputs[name] = layer_positions(module, args[0].detach(), is_input=True)
            output.register_hook(lambda grad: grads[name].append(grad.detach()))

        return hook

    for name, module in modules.items():
        if isinstance(module, nn.Conv2d) and module.padding_mode != "zeros":
            raise SharedModuleError(f"Conv2d '{name}' uses padding_mode")
        handles.append(module.register_forward_hook(forward_hook(name)))
    try:
        f = model(X)
    finally:
        for handle in handles:
            handle.remove()

    B, K = f.shape
    for c in range(K):
        torch.autograd.grad(f[:, c].sum(), params, retain_graph=c < K - 1)

    variance = f.new_zeros(B, K, B, K) if joint else f.new_zeros(B, K, K)
    for index, ((name, kind), basis) in enumerate(zip(located, precision.eigenvectors)):
        module = modules[name]
        g = torch.stack(
            [layer_positions(module, grad, is_input=False) for grad in grads[name]],
            dim=1,
        )  # (B, K, S, out)
        g_rot = g @ basis[0]
        inverse = torch.pow(precision.damped_eigenvalues(index), -1)
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
