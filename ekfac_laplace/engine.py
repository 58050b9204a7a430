r"""Our EKFAC engine: one backward sweep per batch, correction from a cache.

curvlinops' ``EKFACLinearOperator`` makes two full passes over the data, each with a
Python loop over examples for the loss-Hessian square root and ``C`` backward passes.
This engine computes the same quantities with

* the loss-Hessian square root in closed form for the whole batch: for cross-entropy
  column ``c`` of ``S`` is ``√p_c (e_c − p)``, for ``MSELoss(sum)`` it is ``√2 e_c``;
* the layer inputs ``a`` and back-propagated output gradients ``g`` cached during the
  Kronecker-factor pass when they fit ``cache_budget_bytes``, so that the eigenvalue
  correction needs no second pass. For a layer without weight sharing it is a single
  matrix product,

$$
    λ = \sum_n \Big(\sum_c (Q_G^\top g_{n,c})^{2}\Big)
        \big((Q_A^\top a_n)^{2}\big)^\top ,
$$

  and with weight sharing (``Conv2d``) the rotated per-example gradients
  ``Σ_s (Q_Gᵀ g_{n,c,s})(Q_Aᵀ a_{n,s})ᵀ`` are squared and summed.

Quantities are in the scale of the summed torch loss; :mod:`ekfac_laplace.curvature`
applies laplace-torch's likelihood factor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

DEFAULT_CACHE_BUDGET_BYTES = 512 * 2**20


@dataclass
class _Layer:
    """Running statistics of one ``Linear``/``Conv2d`` module."""

    name: str
    module: nn.Module
    weight_index: int | None = None
    bias_index: int | None = None
    input_factor: Tensor | None = None
    gradient_factor: Tensor | None = None
    cache: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    weight_correction: Tensor | None = None
    bias_correction: Tensor | None = None


def _positions(module: nn.Module, tensor: Tensor, is_input: bool) -> Tensor:
    """Inputs (as patches) or output gradients of a layer as ``(B, S, d)``."""
    if isinstance(module, nn.Conv2d):
        if is_input:
            patches = F.unfold(
                tensor,
                module.kernel_size,
                dilation=module.dilation,
                padding=module.padding,
                stride=module.stride,
            )
            return patches.transpose(1, 2)
        return tensor.flatten(start_dim=2).transpose(1, 2)
    return tensor.reshape(tensor.shape[0], -1, tensor.shape[-1])


def _backprop_vectors(
    f: Tensor,
    y: Tensor,
    likelihood: str,
    fisher_type: str,
    mc_samples: int,
    generator: torch.Generator,
) -> Tensor:
    """Vectors ``v`` of shape ``(B, K, C)`` with ``Σ_k v vᵀ`` the output curvature."""
    f = f.detach()
    if fisher_type == "type2":
        if likelihood == "regression":
            eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
            return math.sqrt(2.0) * eye.expand(f.shape[0], -1, -1)
        p = f.softmax(dim=1)
        eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
        # Column c of S: √p_c (e_c − p); row k of the result is column k of S.
        return p.sqrt().unsqueeze(2) * (eye.unsqueeze(0) - p.unsqueeze(1))
    if fisher_type == "empirical":
        return _loss_gradient(f, y, likelihood).unsqueeze(1)
    samples = []
    for _ in range(mc_samples):
        if likelihood == "regression":
            noise = torch.randn(
                f.shape, generator=generator, dtype=f.dtype, device=f.device
            )
            sampled = f + math.sqrt(0.5) * noise
        else:
            sampled = f.softmax(dim=1).multinomial(1, generator=generator).squeeze(1)
        samples.append(_loss_gradient(f, sampled, likelihood))
    return torch.stack(samples, dim=1) / math.sqrt(mc_samples)


def _loss_gradient(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """Gradient of the summed torch loss w.r.t. the outputs, per example."""
    if likelihood == "regression":
        return 2.0 * (f - y)
    if y.ndim == 1:
        return f.softmax(dim=1) - F.one_hot(y, f.shape[1]).to(f.dtype)
    return f.softmax(dim=1) - y


class _Sweep:
    """Forward and ``K`` backward passes on a batch, collecting ``a`` and ``g``."""

    def __init__(self, model: nn.Module, layers: list[_Layer], params: list[Tensor]):
        self.model = model
        self.layers = layers
        self.params = params

    def __call__(
        self, X: Any, y: Tensor, likelihood: str, vectors_fn: Any
    ) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]]]:
        inputs: dict[str, Tensor] = {}
        grads: dict[str, list[Tensor]] = {layer.name: [] for layer in self.layers}

        def forward_hook(name: str):
            def hook(module: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
                if name in inputs:
                    raise ValueError(
                        f"Module '{name}' runs more than once per forward pass (a "
                        "reused or tied layer); EKFAC cannot factorise its curvature. "
                        "Use a separate module per use, or freeze it with "
                        "requires_grad_(False)."
                    )
                inputs[name] = args[0].detach()
                out.register_hook(lambda grad: grads[name].append(grad.detach()))

            return hook

        handles = [
            layer.module.register_forward_hook(forward_hook(layer.name))
            for layer in self.layers
        ]
        try:
            with torch.enable_grad():
                f = self.model(X)
                if f.ndim != 2:
                    raise ValueError(
                        f"EKFAC needs model outputs of shape (batch, outputs), got "
                        f"{tuple(f.shape)}."
                    )
                vectors = vectors_fn(f, y)
                for k in range(vectors.shape[1]):
                    torch.autograd.grad(
                        (f * vectors[:, k]).sum(),
                        self.params,
                        retain_graph=k < vectors.shape[1] - 1,
                    )
        finally:
            for handle in handles:
                handle.remove()
        collected = {}
        for layer in self.layers:
            a = _positions(layer.module, inputs[layer.name], is_input=True)
            g = torch.stack(
                [_positions(layer.module, gk, False) for gk in grads[layer.name]],
                dim=1,
            )  # (B, K, S, d_out)
            collected[layer.name] = (a, g)
        return f.detach(), collected


def _accumulate_factors(layer: _Layer, a: Tensor, g: Tensor, kfac_approx: str) -> None:
    if kfac_approx == "expand":
        flat_g = g.reshape(-1, g.shape[-1])
        gradient_factor = flat_g.T @ flat_g
        flat_a = a.reshape(-1, a.shape[-1])
        input_factor = flat_a.T @ flat_a if layer.weight_index is not None else None
    else:
        summed_g = g.sum(2).reshape(-1, g.shape[-1])
        gradient_factor = summed_g.T @ summed_g
        mean_a = a.mean(1)
        input_factor = mean_a.T @ mean_a if layer.weight_index is not None else None
    layer.gradient_factor = (
        gradient_factor
        if layer.gradient_factor is None
        else layer.gradient_factor + gradient_factor
    )
    if input_factor is not None:
        layer.input_factor = (
            input_factor
            if layer.input_factor is None
            else layer.input_factor + input_factor
        )


def _accumulate_correction(
    layer: _Layer, a: Tensor, g: Tensor, q_g: Tensor, q_a: Tensor | None
) -> None:
    g_rot = g @ q_g  # (B, K, S, d_out)
    if layer.weight_index is not None:
        a_rot = a @ q_a  # (B, S, d_in)
        if a.shape[1] == 1:
            weights = g_rot[:, :, 0].square().sum(1)  # (B, d_out)
            weight = weights.T @ a_rot[:, 0].square()
        else:
            per_example = torch.einsum("bksi,bsj->bkij", g_rot, a_rot)
            weight = per_example.square().sum((0, 1))
        layer.weight_correction = (
            weight
            if layer.weight_correction is None
            else layer.weight_correction + weight
        )
    if layer.bias_index is not None:
        bias = g_rot.sum(2).square().sum((0, 1))
        layer.bias_correction = (
            bias if layer.bias_correction is None else layer.bias_correction + bias
        )


def _cache_bytes(collected: dict[str, tuple[Tensor, Tensor]]) -> int:
    return sum(
        a.numel() * a.element_size() + g.numel() * g.element_size()
        for a, g in collected.values()
    )


def _eigenvectors(factor: Tensor, description: str) -> Tensor:
    if not torch.isfinite(factor).all():
        raise ValueError(
            f"The Kronecker {description} is not finite (NaN or Inf); check the "
            "model's outputs and the data for NaN/Inf."
        )
    return torch.linalg.eigh(factor).eigenvectors


def fast_ekfac(
    model: nn.Module,
    params: list[Tensor],
    located: list[tuple[str, str]],
    batches: Iterable[tuple[Any, Tensor]],
    likelihood: str,
    num_data: int,
    *,
    fisher_type: str,
    kfac_approx: str,
    mc_samples: int,
    seed: int,
    eigenbasis: list[tuple[Tensor, ...]] | None = None,
    cache_budget_bytes: int = DEFAULT_CACHE_BUDGET_BYTES,
    progress_bar: bool = False,
) -> tuple[list[tuple[Tensor, ...]], list[Tensor], Tensor, dict[str, Tensor]]:
    """EKFAC factors in the scale of the summed torch loss.

    Args:
        model: The network.
        params: Parameters in vector order.
        located: ``(module name, "weight"|"bias")`` for each parameter.
        batches: Re-iterable ``(X, y)`` pairs.
        likelihood: ``"classification"`` or ``"regression"``.
        num_data: Number of training points (for the progress bars' totals only).
        fisher_type: ``"type2"``, ``"mc"`` or ``"empirical"``.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        mc_samples: Labels per example for ``"mc"``.
        seed: Seed of the label sampler (re-seeded at every pass).
        eigenbasis: Fixed eigenbasis (online fitting): skips the factor pass.
        cache_budget_bytes: Cache ``a`` and ``g`` of the factor pass up to this size
            to skip the correction pass; ``0`` always makes two passes.
        progress_bar: Show tqdm progress bars.

    Returns:
        Eigenvectors and corrected eigenvalues per parameter, the summed loss, and the
        Kronecker factors per module name (empty when ``eigenbasis`` is given).
    """
    del num_data
    layers: dict[str, _Layer] = {}
    for index, (name, kind) in enumerate(located):
        layer = layers.setdefault(name, _Layer(name, model.get_submodule(name)))
        setattr(layer, f"{kind}_index", index)
    ordered = list(layers.values())
    sweep = _Sweep(model, ordered, list(params))
    device = params[0].device
    loss = torch.zeros((), dtype=params[0].dtype, device=device)
    loss_function = (
        nn.MSELoss(reduction="sum")
        if likelihood == "regression"
        else nn.CrossEntropyLoss(reduction="sum")
    )

    def run_pass(description: str, consume: Any, with_loss: bool) -> None:
        nonlocal loss
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

        def vectors_fn(f: Tensor, y: Tensor) -> Tensor:
            return _backprop_vectors(
                f, y, likelihood, fisher_type, mc_samples, generator
            )

        for X, y in tqdm(batches, desc=description, disable=not progress_bar):
            if isinstance(X, Tensor):
                X = X.to(device)
            y = y.to(device)
            f, collected = sweep(X, y, likelihood, vectors_fn)
            if with_loss:
                loss = loss + loss_function(f, y)
            consume(collected)

    bases: dict[str, tuple[Tensor, Tensor | None]] = {}
    factors: dict[str, Tensor] = {}
    if eigenbasis is None:
        cache_ok = [cache_budget_bytes > 0]
        used = [0]

        def collect_factors(collected: dict[str, tuple[Tensor, Tensor]]) -> None:
            for layer in ordered:
                a, g = collected[layer.name]
                _accumulate_factors(layer, a, g, kfac_approx)
            if cache_ok[0]:
                used[0] += _cache_bytes(collected)
                if used[0] > cache_budget_bytes:
                    cache_ok[0] = False
                    for layer in ordered:
                        layer.cache.clear()
                else:
                    for layer in ordered:
                        layer.cache.append(collected[layer.name])

        run_pass("EKFAC: Kronecker factors", collect_factors, with_loss=True)
        for layer in ordered:
            factors[f"{layer.name}.G"] = layer.gradient_factor
            q_g = _eigenvectors(
                layer.gradient_factor, f"gradient factor of layer '{layer.name}'"
            )
            q_a = None
            if layer.input_factor is not None:
                factors[f"{layer.name}.A"] = layer.input_factor
                q_a = _eigenvectors(
                    layer.input_factor, f"input factor of layer '{layer.name}'"
                )
            bases[layer.name] = (q_g, q_a)
        need_second_pass = not cache_ok[0]
    else:
        for (name, kind), basis in zip(located, eigenbasis):
            q_g, q_a = bases.get(name, (basis[0], None))
            bases[name] = (q_g, basis[1] if kind == "weight" else q_a)
        need_second_pass = True

    if need_second_pass:

        def collect_correction(collected: dict[str, tuple[Tensor, Tensor]]) -> None:
            for layer in ordered:
                a, g = collected[layer.name]
                _accumulate_correction(layer, a, g, *bases[layer.name])

        run_pass(
            "EKFAC: eigenvalue correction",
            collect_correction,
            with_loss=eigenbasis is not None,
        )
    else:
        for layer in ordered:
            for a, g in layer.cache:
                _accumulate_correction(layer, a, g, *bases[layer.name])
            layer.cache.clear()

    eigenvectors: list[tuple[Tensor, ...]] = []
    eigenvalues: list[Tensor] = []
    for (name, kind), param in zip(located, params):
        layer = layers[name]
        q_g, q_a = bases[name]
        if kind == "weight":
            eigenvectors.append((q_g, q_a))
            eigenvalues.append(layer.weight_correction.reshape(param.shape[0], -1))
        else:
            eigenvectors.append((q_g,))
            eigenvalues.append(layer.bias_correction)
    return eigenvectors, eigenvalues, loss, factors
