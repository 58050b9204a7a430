"""Dense brute-force references, written independently of curvlinops.

Everything here is deliberately naive: explicit Jacobians with ``torch.func``, explicit
per-layer inputs and back-propagated output gradients, explicit ``eigh``. It is only
meant for tiny models in float64.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vmap
from torch.nn import functional as F

# Tolerances in one table (float64 exactness checks; float32 smoke checks).
TOLERANCES = {
    "float64": {"rtol": 1e-10, "atol": 1e-10},
    "float64_loose": {"rtol": 1e-7, "atol": 1e-9},
    "float32": {"rtol": 1e-4, "atol": 1e-5},
    # float64 models whose layers compute parts in float32 (LLaMA's RMSNorm).
    "float32_internals": {"rtol": 1e-5, "atol": 1e-8},
}


def assert_close(actual: Tensor, expected: Tensor, kind: str = "float64") -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCES[kind])


def param_names(model: nn.Module, params: list[Tensor]) -> list[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for p in params]


def jacobians(
    model: nn.Module, params: list[Tensor], X: Tensor
) -> tuple[Tensor, Tensor]:
    """Per-example Jacobians ``(N, C, P)`` w.r.t. ``params``, and the outputs."""
    names = param_names(model, params)
    detached = {n: p.detach() for n, p in zip(names, params)}

    def f(param_dict: dict[str, Tensor], x: Tensor) -> Tensor:
        return functional_call(model, param_dict, (x.unsqueeze(0),)).squeeze(0)

    J = vmap(jacrev(f), in_dims=(None, 0))(detached, X)
    flat = torch.cat([J[n].flatten(start_dim=2) for n in names], dim=2)
    with torch.no_grad():
        out = model(X)
    return flat, out


def output_hessians(f: Tensor, likelihood: str) -> Tensor:
    """Hessian of the negative log likelihood w.r.t. outputs, shape ``(N, C, C)``.

    laplace-torch's convention: regression is ``0.5 * MSE-sum`` (Hessian ``I``),
    classification is cross-entropy (``diag(p) - p pᵀ``).
    """
    N, C = f.shape
    if likelihood == "regression":
        return torch.eye(C, dtype=f.dtype).expand(N, C, C).clone()
    p = f.softmax(-1)
    return torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)


def loss_gradients_wrt_outputs(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """Gradient of the per-example *torch* loss (MSE-sum or CE) w.r.t. outputs."""
    if likelihood == "regression":
        return 2 * (f - y)
    return f.softmax(-1) - F.one_hot(y, f.shape[1]).to(f.dtype)


def likelihood_factor(likelihood: str) -> float:
    return 0.5 if likelihood == "regression" else 1.0


def dense_ggn(
    model: nn.Module, params: list[Tensor], X: Tensor, likelihood: str
) -> Tensor:
    J, f = jacobians(model, params, X)
    L = output_hessians(f, likelihood)
    return torch.einsum("nci,ncd,ndj->ij", J, L, J)


def dense_empirical_fisher(
    model: nn.Module, params: list[Tensor], X: Tensor, y: Tensor, likelihood: str
) -> Tensor:
    """``factor * Σ_n ∇ℓ_n ∇ℓ_nᵀ`` with laplace-torch's factor."""
    names = param_names(model, params)
    detached = {n: p.detach() for n, p in zip(names, params)}
    loss = (
        nn.MSELoss(reduction="sum")
        if likelihood == "regression"
        else nn.CrossEntropyLoss(reduction="sum")
    )

    def per_example(param_dict: dict[str, Tensor], x: Tensor, t: Tensor) -> Tensor:
        out = functional_call(model, param_dict, (x.unsqueeze(0),))
        return loss(out, t.unsqueeze(0))

    G = vmap(grad(per_example), in_dims=(None, 0, 0))(detached, X, y)
    g = torch.cat([G[n].flatten(start_dim=1) for n in names], dim=1)
    return likelihood_factor(likelihood) * g.T @ g


def blocks(matrix: Tensor, sizes: list[int]) -> list[Tensor]:
    out, start = [], 0
    for size in sizes:
        out.append(matrix[start : start + size, start : start + size])
        start += size
    return out


def block_diagonal(matrix: Tensor, sizes: list[int]) -> Tensor:
    return torch.block_diag(*blocks(matrix, sizes))


CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED_CONVOLUTIONS = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def conv_patches(module: nn.Module, inputs: Tensor, channel: int = 0) -> Tensor:
    """A convolution's patches ``(N, S, c_in·k)`` as torch's own convolution sees
    them: output ``channel`` is linear in its kernel ``W[channel]``, with the
    patches as its Jacobian (any padding, padding mode, stride, dilation,
    dimension; a grouped convolution: the patches of that channel's group)."""
    weight = module.weight.detach()

    def one_channel(kernel: Tensor) -> Tensor:
        params = {
            "weight": torch.cat(
                [weight[:channel], kernel.unsqueeze(0), weight[channel + 1 :]]
            )
        }
        if module.bias is not None:
            params["bias"] = torch.zeros_like(module.bias)
        return functional_call(module, params, (inputs,))[:, channel]

    J = jacrev(one_channel)(weight[channel])  # (N, *spatial_out, c_in/G, *k)
    return J.reshape(inputs.shape[0], -1, weight[0].numel())


def transposed_conv_patches(
    module: nn.Module, grads: Tensor, channel: int = 0
) -> Tensor:
    """A transposed convolution's ``g`` ``(N, S_in, c_out/G·k)``: for input
    position ``s``, the gradient of ``⟨grads, y⟩`` w.r.t. ``W[channel]`` when the
    input is one at ``channel`` and position ``s`` (``y`` is then linear in it)."""
    weight = module.weight.detach()
    spatial = module.weight.shape[2:]  # kernel; the input size follows from grads
    n_dims = len(spatial)
    sizes = [
        (size + 2 * p - d * (k - 1) - extra - 1) // s + 1
        for size, p, d, k, extra, s in zip(
            grads.shape[2:],
            module.padding,
            module.dilation,
            module.kernel_size,
            module.output_padding,
            module.stride,
        )
    ]
    rows = []
    for position in range(math.prod(sizes)):
        one_hot = torch.zeros(1, weight.shape[0], math.prod(sizes), dtype=grads.dtype)
        one_hot[0, channel, position] = 1.0
        one_hot = one_hot.reshape(1, weight.shape[0], *sizes)

        def response(kernel: Tensor, one_hot=one_hot) -> Tensor:
            params = {
                "weight": torch.cat(
                    [weight[:channel], kernel.unsqueeze(0), weight[channel + 1 :]]
                )
            }
            if module.bias is not None:
                params["bias"] = torch.zeros_like(module.bias)
            return functional_call(module, params, (one_hot,))[0]

        J = jacrev(response)(weight[channel])  # (c_out, *out, c_out/G, *k)
        rows.append(torch.einsum("nc...,c...k->nk", grads, J.flatten(-1 - n_dims)))
    return torch.stack(rows, dim=1)


def _layer_inputs(module: nn.Module, inputs: Tensor) -> Tensor:
    """Layer inputs as ``(N, S, d_in)`` (convolutions: patches)."""
    if isinstance(module, CONVOLUTIONS):
        return conv_patches(module, inputs)
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):
        return inputs.flatten(start_dim=2).transpose(1, 2)
    return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1])


def _layer_output_grads(module: nn.Module, grads: Tensor) -> Tensor:
    """Gradients w.r.t. layer outputs as ``(N, S, d_out)``."""
    if isinstance(module, CONVOLUTIONS):
        return grads.flatten(start_dim=2).transpose(1, 2)
    if isinstance(module, TRANSPOSED_CONVOLUTIONS):
        return transposed_conv_patches(module, grads)
    return grads.reshape(grads.shape[0], -1, grads.shape[-1])


def backprop_vectors(
    model: nn.Module, X: Tensor, y: Tensor, likelihood: str, fisher_type: str
) -> Tensor:
    """Vectors ``(N, K, C)`` whose pull-backs give the curvature (``Σ_k v vᵀ = Λ``)."""
    with torch.no_grad():
        f = model(X)
    if fisher_type == "type2":
        L = output_hessians(f, likelihood)
        evals, evecs = torch.linalg.eigh(L)
        root = evecs * evals.clamp_min(0).sqrt().unsqueeze(1)  # (N, C, K)
        return root.transpose(1, 2)
    if fisher_type == "empirical":
        g = loss_gradients_wrt_outputs(f, y, likelihood)
        return math.sqrt(likelihood_factor(likelihood)) * g.unsqueeze(1)
    raise ValueError(fisher_type)


def kfac_factors(
    model: nn.Module,
    module: nn.Module,
    X: Tensor,
    vectors: Tensor,
    kfac_approx: str = "expand",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Reference KFAC factors of ``module``: ``A``, ``G``, and the raw ``a``, ``g``.

    Returns ``A`` (``(d_in, d_in)``, averaged as laplace-torch does), ``G``
    (``(d_out, d_out)``, summed), ``a`` of shape ``(N, S, d_in)`` and ``g`` of shape
    ``(N, K, S, d_out)``.
    """
    store: dict[str, Tensor] = {}

    def hook(_: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        store["input"] = inputs[0].detach()
        store["output"] = output

    handle = module.register_forward_hook(hook)
    f = model(X)
    handle.remove()
    a = _layer_inputs(module, store["input"])
    g = []
    for k in range(vectors.shape[1]):
        (gz,) = torch.autograd.grad(
            (f * vectors[:, k]).sum(), store["output"], retain_graph=True
        )
        g.append(_layer_output_grads(module, gz))
    g = torch.stack(g, dim=1)
    N, S = a.shape[:2]
    if kfac_approx == "expand":
        A = torch.einsum("nsi,nsj->ij", a, a) / (N * S)
        G = torch.einsum("nksi,nksj->ij", g, g)
    else:
        a_mean = a.mean(1)
        g_sum = g.sum(2)
        A = a_mean.T @ a_mean / N
        G = torch.einsum("nki,nkj->ij", g_sum, g_sum)
    return A, G, a, g


def supported_modules(
    model: nn.Module, params: list[Tensor]
) -> list[tuple[nn.Module, str]]:
    """``(module, 'weight'|'bias')`` for each parameter, in order."""
    owner = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            owner[id(p)] = (module, name)
    return [owner[id(p)] for p in params]


def reference_ekfac(
    model: nn.Module,
    params: list[Tensor],
    X: Tensor,
    y: Tensor,
    likelihood: str,
    fisher_type: str = "type2",
    kfac_approx: str = "expand",
) -> dict[str, list[Tensor]]:
    """Brute-force EKFAC, KFAC and exact blocks of the log-likelihood curvature.

    Returns a dict with lists (one entry per parameter tensor) of: ``exact`` blocks of
    the GGN / empirical Fisher, ``kfac`` blocks, ``ekfac`` blocks, the eigenvectors
    ``Q_A`` (``None`` for biases) and ``Q_G`` and the raw factors ``A`` and ``G``.
    """
    if fisher_type == "type2":
        full = dense_ggn(model, params, X, likelihood)
    else:
        full = dense_empirical_fisher(model, params, X, y, likelihood)
    sizes = [p.numel() for p in params]
    exact = blocks(full, sizes)
    vectors = backprop_vectors(model, X, y, likelihood, fisher_type)
    out: dict[str, list] = {
        k: [] for k in ("exact", "kfac", "ekfac", "Q_A", "Q_G", "A", "G")
    }
    for (module, kind), B in zip(supported_modules(model, params), exact):
        A, G, _, _ = kfac_factors(model, module, X, vectors, kfac_approx)
        Q_G = torch.linalg.eigh(G).eigenvectors
        if kind == "weight":
            Q_A = torch.linalg.eigh(A).eigenvectors
            Q = torch.kron(Q_G, Q_A)
            kfac = torch.kron(G, A)
        else:
            Q_A, Q, kfac = None, Q_G, G
        corrected = torch.diagonal(Q.T @ B @ Q)
        out["exact"].append(B)
        out["kfac"].append(kfac)
        out["ekfac"].append((Q * corrected) @ Q.T)
        out["Q_A"].append(Q_A)
        out["Q_G"].append(Q_G)
        out["A"].append(A)
        out["G"].append(G)
    return out


def ekfac_in_basis(exact_block: Tensor, basis: tuple[Tensor, ...]) -> Tensor:
    """``Q diag(diag(Qᵀ B Q)) Qᵀ`` for a given eigenbasis."""
    Q = torch.kron(basis[0], basis[1]) if len(basis) == 2 else basis[0]
    corrected = torch.diagonal(Q.T @ exact_block @ Q)
    return (Q * corrected) @ Q.T


def corrected_eigenvalues(exact_block: Tensor, basis: tuple[Tensor, ...]) -> Tensor:
    """``diag(Qᵀ B Q)``; for stacked (per-group) bases, group by group on the
    diagonal blocks of ``B`` (the groups are contiguous in the parameter)."""
    if basis and basis[0].ndim == 3:
        groups = basis[0].shape[0]
        size = exact_block.shape[0] // groups
        return torch.cat(
            [
                corrected_eigenvalues(
                    exact_block[g * size : (g + 1) * size, g * size : (g + 1) * size],
                    tuple(q[g] for q in basis),
                )
                for g in range(groups)
            ]
        )
    Q = torch.kron(basis[0], basis[1]) if len(basis) == 2 else basis[0]
    return torch.diagonal(Q.T @ exact_block @ Q)


def glm_log_likelihood(
    f: Tensor, y: Tensor, likelihood: str, sigma: float, temperature: float
) -> Tensor:
    """laplace-torch's ``log_likelihood``: ``-factor*loss/(σ²T)`` minus normaliser."""
    if likelihood == "regression":
        loss = 0.5 * ((f - y) ** 2).sum()
        N, C = f.shape
        return -loss / sigma**2 / temperature - N * C * math.log(
            sigma * math.sqrt(2 * math.pi)
        )
    loss = F.cross_entropy(f, y, reduction="sum")
    return -loss / temperature


def mc_fisher_moments(
    model: nn.Module,
    params: list[Tensor],
    X: Tensor,
    likelihood: str,
    eigenvectors: list[tuple[Tensor, ...]],
) -> tuple[list[Tensor], list[Tensor]]:
    """Exact mean and variance of one-label Monte-Carlo corrected eigenvalues.

    With one sampled label per example, the corrected eigenvalue of direction ``i``
    of a block is ``λ̂_i = Σ_n X_{n,i}`` with ``X_{n,i} = (u_{n,i}ᵀ v_n)²``, where
    ``u_{n,i}`` is column ``i`` of the rotated Jacobian ``J_n Q`` and ``v_n`` the
    sampled loss gradient (laplace-torch's scale). For cross-entropy
    ``v = p − e_y`` with ``y ~ Cat(p)``: both moments are sums over the ``C`` labels.
    For the Gaussian (½·MSE) ``v = ε ~ N(0, I)``: ``X = (uᵀε)²`` has mean ``|u|²`` and
    variance ``2|u|⁴``. With ``S`` labels per example the estimator averages ``S``
    such terms: mean unchanged, variance divided by ``S``.

    Returns:
        Per block, the mean (the exact GGN's corrected eigenvalues) and the variance
        of ``λ̂`` for one label per example, both flattened.
    """
    J, f = jacobians(model, params, X)  # (N, C, P)
    means, variances = [], []
    start = 0
    for basis in eigenvectors:
        size = 1
        for q in basis:
            size *= q.shape[0]
        Q = torch.kron(basis[0], basis[1]) if len(basis) == 2 else basis[0]
        U = J[:, :, start : start + size] @ Q  # (N, C, size)
        start += size
        if likelihood == "regression":
            squared = U.square().sum(1)  # |u|², (N, size)
            mean, second = squared, 3 * squared.square()
        else:
            p = f.softmax(-1)  # (N, C)
            # X(y) = (uᵀp − u_y)² for each label y: (N, C, size)
            values = (torch.einsum("nc,ncs->ns", p, U).unsqueeze(1) - U).square()
            mean = torch.einsum("nc,ncs->ns", p, values)
            second = torch.einsum("nc,ncs->ns", p, values.square())
        means.append(mean.sum(0))
        variances.append((second - mean.square()).sum(0))
    return means, variances


def _example(X: Tensor | dict[str, Tensor], n: int) -> Tensor | dict[str, Tensor]:
    if isinstance(X, dict):
        return {key: value[n : n + 1] for key, value in X.items()}
    return X[n : n + 1]


def loop_jacobians(
    model: nn.Module, params: list[Tensor], X: Tensor | dict[str, Tensor]
) -> tuple[Tensor, Tensor]:
    """Per-example Jacobians ``(N, C, P)``, one example at a time (no ``vmap``).

    For models that ``vmap`` cannot batch (fused recurrent kernels) and dict inputs.
    """
    names = param_names(model, params)
    detached = {n: p.detach() for n, p in zip(names, params)}
    N = len(next(iter(X.values()))) if isinstance(X, dict) else len(X)
    rows, outputs = [], []
    for n in range(N):
        x = _example(X, n)

        def f(param_dict: dict[str, Tensor], x=x) -> Tensor:
            return functional_call(model, param_dict, (x,)).squeeze(0)

        J = jacrev(f)(detached)
        rows.append(torch.cat([J[name].flatten(start_dim=1) for name in names], 1))
        with torch.no_grad():
            outputs.append(model(x).squeeze(0))
    return torch.stack(rows), torch.stack(outputs)


def loop_ggn(
    model: nn.Module,
    params: list[Tensor],
    X: Tensor | dict[str, Tensor],
    likelihood: str,
) -> Tensor:
    """The dense GGN from :func:`loop_jacobians`."""
    J, f = loop_jacobians(model, params, X)
    L = output_hessians(f, likelihood)
    return torch.einsum("nci,ncd,ndj->ij", J, L, J)
