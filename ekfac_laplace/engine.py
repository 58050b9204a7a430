r"""Our EKFAC engine: one backward sweep per batch, correction from a cache.

curvlinops' ``EKFACLinearOperator`` makes two full passes over the data, each with a
Python loop over examples for the loss-Hessian square root and ``C`` backward passes.
This engine computes the same quantities with

* the loss-Hessian square root in closed form for the whole batch: for cross-entropy
  column ``c`` of ``S`` is ``√p_c (e_c − p)``, for ``MSELoss(sum)`` it is ``√2 e_c``;
* back-propagation to one parameter per layer, so autograd skips the weight
  gradients that the factors never use;
* optionally, the layer inputs ``a`` and back-propagated output gradients ``g`` cached
  during the Kronecker-factor pass when they fit ``cache_budget_bytes``, so that the
  eigenvalue correction needs no second pass. For a layer without weight sharing the
  correction is a single matrix product,

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

from ekfac_laplace.diagonal import detach_inputs, restricted_gradients

# Caching the first pass's inputs and output gradients (N·(d_in + K·d_out) numbers per
# layer; N·(d_in + C) for the output layer) skips the second pass. By default only
# small caches are kept (last-layer and small problems); whether the whole data set
# fits is projected from the first batch, so an oversized cache is never built.
DEFAULT_CACHE_BUDGET_BYTES = 64 * 2**20


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


@dataclass
class _DiagonalModule:
    """A module whose parameters get diagonal blocks, and their running squares."""

    name: str
    module: nn.Module
    param_names: list[str]
    indices: list[int]
    squares: list[Tensor] = field(default_factory=list)

    @property
    def target(self) -> Tensor:
        """A parameter to back-propagate to, so gradients reach the module."""
        return self.module.get_parameter(self.param_names[0])

    def accumulate(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], grad_output: Tensor
    ) -> None:
        """Add ``Σ_n (∂⟨g_n, m(x_n)⟩/∂θ)²`` of one backward pass."""
        grads = restricted_gradients(
            self.module, self.param_names, args, kwargs, grad_output
        )
        if not self.squares:
            self.squares = [
                torch.zeros_like(self.module.get_parameter(name).detach())
                for name in self.param_names
            ]
        for squares, (rows, grad) in zip(self.squares, grads):
            if rows is None:
                squares += grad.square().sum(0)
            else:
                squares.index_add_(0, rows, grad.square().sum(0))


def layer_positions(module: nn.Module, tensor: Tensor, is_input: bool) -> Tensor:
    """Inputs (as patches) or output gradients of a layer as ``(B, S, d)``.

    Args:
        module: An ``nn.Linear`` or ``nn.Conv2d``.
        tensor: The layer's input (``is_input=True``) or output-shaped tensor.
        is_input: Whether ``tensor`` is the input (``Conv2d``: unfolded to patches).

    Returns:
        Shape ``(B, S, d)`` with ``S`` the shared positions.
    """
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


class OutputCurvature:
    """The output-space curvature of one batch, ``Λ_n = Σ_k v_{n,k} v_{n,k}ᵀ``.

    For the exact GGN of cross-entropy it is kept as the probabilities ``p`` (then
    ``Λ = diag(p) − p pᵀ``), so a layer whose output *is* the model output needs
    neither the ``C`` vectors nor any backward pass: its ``G = Σ_n Λ_n`` and its
    rotated squares ``Σ_k (Q_Gᵀ v_k)² = (Q_G∘Q_G)ᵀ p − (Q_Gᵀ p)²`` are closed-form.
    """

    def __init__(
        self,
        f: Tensor,
        y: Tensor,
        likelihood: str,
        fisher_type: str,
        mc_samples: int,
        generator: torch.Generator,
    ) -> None:
        f = f.detach()
        self.probabilities: Tensor | None = None
        self._vectors: Tensor | None = None
        if fisher_type == "type2" and likelihood == "classification":
            self.probabilities = f.softmax(dim=1)
        elif fisher_type == "type2":
            eye = torch.eye(f.shape[1], dtype=f.dtype, device=f.device)
            self._vectors = math.sqrt(2.0) * eye.expand(f.shape[0], -1, -1)
        elif fisher_type == "empirical":
            self._vectors = _loss_gradient(f, y, likelihood).unsqueeze(1)
        else:
            samples = []
            for _ in range(mc_samples):
                if likelihood == "regression":
                    noise = torch.randn(
                        f.shape, generator=generator, dtype=f.dtype, device=f.device
                    )
                    sampled = f + math.sqrt(0.5) * noise
                else:
                    probabilities = f.softmax(dim=1)
                    sampled = probabilities.multinomial(1, generator=generator)
                    sampled = sampled.squeeze(1)
                samples.append(_loss_gradient(f, sampled, likelihood))
            self._vectors = torch.stack(samples, dim=1) / math.sqrt(mc_samples)

    def vectors(self) -> Tensor:
        """``(B, K, C)`` vectors to back-propagate (``K = C`` for the exact GGN)."""
        if self._vectors is None:
            p = self.probabilities
            eye = torch.eye(p.shape[1], dtype=p.dtype, device=p.device)
            # Column c of the root S of diag(p) − p pᵀ is √p_c (e_c − p).
            return p.sqrt().unsqueeze(2) * (eye.unsqueeze(0) - p.unsqueeze(1))
        return self._vectors

    def gradient_factor(self) -> Tensor:
        """``Σ_n Λ_n`` of shape ``(C, C)``."""
        if self.probabilities is not None:
            p = self.probabilities
            return torch.diag(p.sum(0)) - p.T @ p
        flat = self._vectors.reshape(-1, self._vectors.shape[-1])
        return flat.T @ flat

    def rotated_squares(self, q_g: Tensor) -> Tensor:
        """``Σ_k (Q_Gᵀ v_{n,k})²`` of shape ``(B, C)``."""
        if self.probabilities is not None:
            p = self.probabilities
            return p @ q_g.square() - (p @ q_g).square()
        return (self._vectors @ q_g).square().sum(1)

    def nbytes(self) -> int:
        """Memory held by this object."""
        held = self.probabilities if self._vectors is None else self._vectors
        return held.numel() * held.element_size()


def _loss_gradient(f: Tensor, y: Tensor, likelihood: str) -> Tensor:
    """Gradient of the summed torch loss w.r.t. the outputs, per example."""
    if likelihood == "regression":
        return 2.0 * (f - y)
    if y.ndim == 1:
        return f.softmax(dim=1) - F.one_hot(y, f.shape[1]).to(f.dtype)
    return f.softmax(dim=1) - y


class _Consumer:
    """Receives a layer's inputs ``a`` (``(B, S, d_in)``) and gradients per sweep."""

    def begin(self, layer: _Layer, a: Tensor) -> None:
        """Before the backward passes of a hidden layer."""

    def gradient(self, layer: _Layer, a: Tensor, g: Tensor) -> None:
        """One backward pass: output gradients ``g`` of shape ``(B, S, d_out)``."""

    def end(self, layer: _Layer, a: Tensor) -> None:
        """After the backward passes of a hidden layer."""

    def output(self, layer: _Layer, a: Tensor, curvature: OutputCurvature) -> None:
        """A layer whose output is the model output (one position)."""

    def plan(self, inputs: dict[str, Tensor], hidden: list[_Layer], k: int) -> None:
        """Before anything else of a batch: the inputs and the number of passes."""


def _out_features(layer: _Layer) -> int:
    module = layer.module
    return module.out_channels if isinstance(module, nn.Conv2d) else module.out_features


class _Sweep:
    """A forward pass and ``K`` backward passes on a batch.

    Each layer's inputs and, one backward pass at a time, its output gradients go
    to a consumer, so no more than one ``(B, S, d_out)`` gradient per layer is held.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[_Layer],
        params: list[Tensor],
        diagonal: list[_DiagonalModule] | None = None,
    ):
        self.model = model
        self.layers = layers
        self.diagonal = diagonal or []
        # Back-propagating to one parameter per layer (the bias where there is one)
        # makes every layer's output gradient flow while autograd skips the weight
        # gradients, which we never use.
        self.targets = {
            layer.name: params[
                layer.weight_index if layer.bias_index is None else layer.bias_index
            ]
            for layer in layers
        }

    def __call__(
        self,
        X: Any,
        y: Tensor,
        curvature_fn: Any,
        consumer: _Consumer,
        collect_diagonal: bool = False,
    ) -> Tensor:
        inputs: dict[str, Tensor] = {}
        outputs: dict[str, tuple[Tensor, int]] = {}
        grads: dict[str, Tensor] = {}
        calls: dict[str, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        diagonal = self.diagonal if collect_diagonal else []

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
                outputs[name] = (out, out._version)

                def store(grad: Tensor) -> None:
                    grads[name] = grad.detach()

                out.register_hook(store)

            return hook

        def diagonal_hook(name: str):
            def hook(
                module: nn.Module,
                args: tuple[Any, ...],
                kwargs: dict[str, Any],
                out: Any,
            ) -> None:
                if name in calls:
                    raise ValueError(
                        f"Module '{name}' runs more than once per forward pass (a "
                        "reused layer); its diagonal curvature would mix the uses. "
                        "Use a separate module per use, or freeze it with "
                        "requires_grad_(False)."
                    )
                if not isinstance(out, Tensor):
                    raise ValueError(
                        f"Module '{name}' ({type(module).__name__}) returns "
                        f"{type(out).__name__}, not a tensor; diagonal blocks need "
                        "modules with one tensor output. Freeze its parameters with "
                        "requires_grad_(False)."
                    )
                calls[name] = (detach_inputs(args), detach_inputs(kwargs))

                def store(grad: Tensor) -> None:
                    grads[name] = grad.detach()

                out.register_hook(store)

            return hook

        handles = [
            layer.module.register_forward_hook(forward_hook(layer.name))
            for layer in self.layers
        ]
        handles += [
            entry.module.register_forward_hook(
                diagonal_hook(entry.name), with_kwargs=True
            )
            for entry in diagonal
        ]
        try:
            with torch.enable_grad():
                try:
                    f = self.model(X)
                finally:
                    # The per-example gradients of diagonal blocks call modules
                    # again; the forward hooks must not see those calls.
                    for handle in handles:
                        handle.remove()
                if f.ndim != 2:
                    raise ValueError(
                        f"EKFAC needs model outputs of shape (batch, outputs), got "
                        f"{tuple(f.shape)}. For sequence models, return "
                        "logits.flatten(0, -2) (and targets.flatten()) to treat "
                        "tokens as independent examples."
                    )
                curvature = curvature_fn(f, y)
                positions = {
                    layer.name: layer_positions(
                        layer.module, inputs.pop(layer.name), True
                    )
                    for layer in self.layers
                }
                # A layer whose (unmodified) output is the model output needs no
                # backward pass: its output gradients are the vectors themselves.
                hidden = [
                    layer
                    for layer in self.layers
                    if outputs[layer.name][0] is not f
                    or outputs[layer.name][1] != f._version
                ]
                outputs.clear()
                backward = bool(hidden) or bool(diagonal)
                vectors = curvature.vectors() if backward else None
                passes = 0 if vectors is None else vectors.shape[1]
                consumer.plan(positions, hidden, passes)
                for layer in self.layers:
                    if layer in hidden:
                        consumer.begin(layer, positions[layer.name])
                    else:
                        consumer.output(layer, positions[layer.name], curvature)
                if backward:
                    targets = [self.targets[layer.name] for layer in hidden]
                    targets += [entry.target for entry in diagonal]
                    for k in range(vectors.shape[1]):
                        torch.autograd.grad(
                            (f * vectors[:, k]).sum(),
                            targets,
                            retain_graph=k < vectors.shape[1] - 1,
                            allow_unused=True,
                        )
                        for layer in hidden:
                            g = layer_positions(
                                layer.module, grads.pop(layer.name), False
                            )
                            consumer.gradient(layer, positions[layer.name], g)
                        for entry in diagonal:
                            if entry.name in grads:  # unused modules add nothing
                                entry.accumulate(
                                    *calls[entry.name], grads.pop(entry.name)
                                )
                    for layer in hidden:
                        consumer.end(layer, positions[layer.name])
        finally:
            for handle in handles:
                handle.remove()
        return f.detach()


def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


class _FactorConsumer(_Consumer):
    """Accumulates ``A`` and ``G``; optionally caches ``a`` and ``g`` for replay."""

    def __init__(
        self,
        layers: list[_Layer],
        kfac_approx: str,
        cache_budget_bytes: int,
        num_data: int,
    ) -> None:
        self.layers = layers
        self.kfac_approx = kfac_approx
        self.budget = cache_budget_bytes
        self.num_data = num_data
        self.caching = cache_budget_bytes > 0
        self.used = 0
        self.examples_seen = 0
        self.pending: dict[str, list[Tensor]] = {}

    def plan(self, inputs: dict[str, Tensor], hidden: list[_Layer], k: int) -> None:
        """On the first batch, give up caching if the whole set would not fit."""
        if not self.caching or self.examples_seen:
            return
        batch = next(iter(inputs.values())).shape[0]
        per_batch = 0
        for a in inputs.values():
            per_batch += a.numel() * a.element_size()
        for layer in hidden:
            a = inputs[layer.name]
            gradients = k * a.shape[0] * a.shape[1] * _out_features(layer)
            per_batch += gradients * a.element_size()
        if per_batch * self.num_data / batch > self.budget:
            self._stop_caching()

    def batch_done(self, batch_size: int) -> None:
        """Count the examples of the factor pass."""
        self.examples_seen += batch_size

    def _stop_caching(self) -> None:
        self.caching = False
        for layer in self.layers:
            layer.cache.clear()

    def _input_factor(self, layer: _Layer, a: Tensor) -> None:
        if layer.weight_index is None:
            return
        expand = self.kfac_approx == "expand"
        flat = a.reshape(-1, a.shape[-1]) if expand else a.mean(1)
        layer.input_factor = _add(layer.input_factor, flat.T @ flat)

    def _remember(self, layer: _Layer, nbytes: int, entry: Any) -> None:
        if not self.caching:
            return
        self.used += nbytes
        layer.cache.append(entry)
        if self.used > self.budget:  # over budget: fall back to a second pass
            self._stop_caching()

    def begin(self, layer: _Layer, a: Tensor) -> None:
        self._input_factor(layer, a)
        self.pending[layer.name] = []

    def gradient(self, layer: _Layer, a: Tensor, g: Tensor) -> None:
        expand = self.kfac_approx == "expand"
        flat = g.reshape(-1, g.shape[-1]) if expand else g.sum(1)
        layer.gradient_factor = _add(layer.gradient_factor, flat.T @ flat)
        if self.caching:
            self.pending[layer.name].append(g)

    def end(self, layer: _Layer, a: Tensor) -> None:
        gradients = self.pending.pop(layer.name)
        if self.caching:
            g = torch.stack(gradients, dim=1)  # (B, K, S, d_out)
            self._remember(layer, (a.numel() + g.numel()) * a.element_size(), (a, g))

    def output(self, layer: _Layer, a: Tensor, curvature: OutputCurvature) -> None:
        self._input_factor(layer, a)
        layer.gradient_factor = _add(layer.gradient_factor, curvature.gradient_factor())
        nbytes = a.numel() * a.element_size() + curvature.nbytes()
        self._remember(layer, nbytes, (a, curvature))


class _CorrectionConsumer(_Consumer):
    """Accumulates the corrected eigenvalues in fixed eigenbases."""

    def __init__(self, bases: dict[str, tuple[Tensor, Tensor | None]]) -> None:
        self.bases = bases
        self.squares: dict[str, Tensor] = {}
        self.rotated_inputs: dict[str, Tensor] = {}

    def begin(self, layer: _Layer, a: Tensor) -> None:
        if a.shape[1] == 1:
            d_out = self.bases[layer.name][0].shape[0]
            self.squares[layer.name] = a.new_zeros(a.shape[0], d_out)
        elif layer.weight_index is not None:
            # Rotated once per batch, used by each of the K backward passes.
            self.rotated_inputs[layer.name] = a @ self.bases[layer.name][1]

    def gradient(self, layer: _Layer, a: Tensor, g: Tensor) -> None:
        g_rot = g @ self.bases[layer.name][0]  # (B, S, d_out)
        if a.shape[1] == 1:
            self.squares[layer.name] += g_rot[:, 0].square()
            return
        if layer.weight_index is not None:
            a_rot = self.rotated_inputs[layer.name]
            per_example = torch.einsum("bsi,bsj->bij", g_rot, a_rot)
            weight = per_example.square().sum(0)
            layer.weight_correction = _add(layer.weight_correction, weight)
        if layer.bias_index is not None:
            bias = g_rot.sum(1).square().sum(0)
            layer.bias_correction = _add(layer.bias_correction, bias)

    def end(self, layer: _Layer, a: Tensor) -> None:
        if a.shape[1] == 1:
            self._finish(layer, a, self.squares.pop(layer.name))
        self.rotated_inputs.pop(layer.name, None)

    def output(self, layer: _Layer, a: Tensor, curvature: OutputCurvature) -> None:
        self._finish(layer, a, curvature.rotated_squares(self.bases[layer.name][0]))

    def _finish(self, layer: _Layer, a: Tensor, squares: Tensor) -> None:
        """No weight sharing: ``λ = Σ_n (Σ_k (Q_Gᵀ g_nk)²) ((Q_Aᵀ a_n)²)ᵀ``."""
        if layer.weight_index is not None:
            q_a = self.bases[layer.name][1]
            weight = squares.T @ (a[:, 0] @ q_a).square()
            layer.weight_correction = _add(layer.weight_correction, weight)
        if layer.bias_index is not None:
            layer.bias_correction = _add(layer.bias_correction, squares.sum(0))

    def replay(self, layer: _Layer) -> None:
        """Feed the cached first-pass quantities of a layer, then drop them."""
        for a, g in layer.cache:
            if isinstance(g, OutputCurvature):
                self.output(layer, a, g)
                continue
            self.begin(layer, a)
            for k in range(g.shape[1]):
                self.gradient(layer, a, g[:, k])
            self.end(layer, a)
        layer.cache.clear()


def _eigenvectors(factor: Tensor, description: str) -> Tensor:
    """Eigenvectors of a Kronecker factor, robust to ``eigh`` failing to converge.

    ``eigh`` can fail on ill-conditioned float32 factors; it is retried in float64,
    then in float64 with a shift ``c I`` (which leaves the eigenvectors unchanged).
    """
    if not torch.isfinite(factor).all():
        raise ValueError(
            f"The Kronecker {description} is not finite (NaN or Inf); check the "
            "model's outputs and the data for NaN/Inf."
        )
    try:
        return torch.linalg.eigh(factor).eigenvectors
    except torch.linalg.LinAlgError:
        pass
    double = factor.double()
    shift = double.diagonal().abs().mean().clamp_min(1.0) * 1e-8
    identity = torch.eye(len(double), dtype=double.dtype, device=double.device)
    for candidate in (double, double + shift * identity):
        try:
            return torch.linalg.eigh(candidate).eigenvectors.to(factor.dtype)
        except torch.linalg.LinAlgError:
            continue
    raise RuntimeError(
        f"eigh did not converge on the Kronecker {description}, even in float64 "
        "with a diagonal shift; the factor is numerically degenerate. Check the "
        "data scale, or freeze that layer with requires_grad_(False)."
    )


def fast_ekfac(
    model: nn.Module,
    params: list[Tensor],
    located: list[tuple[str, str, bool]],
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
) -> tuple[list[tuple[Tensor, ...]], list[Tensor], Tensor]:
    """EKFAC factors in the scale of the summed torch loss.

    Args:
        model: The network.
        params: Parameters in vector order.
        located: ``(module name, parameter name, diagonal)`` for each parameter;
            diagonal blocks get eigenvectors ``()`` and the exact GGN / Fisher
            diagonal, shaped like the parameter.
        batches: Re-iterable ``(X, y)`` pairs.
        likelihood: ``"classification"`` or ``"regression"``.
        num_data: Number of training points (projects the cache size).
        fisher_type: ``"type2"``, ``"mc"`` or ``"empirical"``.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        mc_samples: Labels per example for ``"mc"``.
        seed: Seed of the label sampler (re-seeded at every pass).
        eigenbasis: Fixed eigenbasis (online fitting): skips the factor pass.
        cache_budget_bytes: Cache ``a`` and ``g`` of the factor pass up to this size
            to skip the correction pass; ``0`` always makes two passes.
        progress_bar: Show tqdm progress bars.

    Returns:
        Eigenvectors and corrected eigenvalues per parameter, and the summed loss.
    """
    layers: dict[str, _Layer] = {}
    diagonal: dict[str, _DiagonalModule] = {}
    for index, (name, kind, is_diagonal) in enumerate(located):
        if is_diagonal:
            entry = diagonal.setdefault(
                name, _DiagonalModule(name, model.get_submodule(name), [], [])
            )
            entry.param_names.append(kind)
            entry.indices.append(index)
            continue
        layer = layers.setdefault(name, _Layer(name, model.get_submodule(name)))
        setattr(layer, f"{kind}_index", index)
    ordered = list(layers.values())
    sweep = _Sweep(model, ordered, list(params), list(diagonal.values()))
    device = params[0].device
    loss = torch.zeros((), dtype=params[0].dtype, device=device)
    loss_function = (
        nn.MSELoss(reduction="sum")
        if likelihood == "regression"
        else nn.CrossEntropyLoss(reduction="sum")
    )

    def run_pass(description: str, consumer: _Consumer, with_loss: bool) -> None:
        nonlocal loss
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)

        def curvature_fn(f: Tensor, y: Tensor) -> OutputCurvature:
            return OutputCurvature(f, y, likelihood, fisher_type, mc_samples, generator)

        for X, y in tqdm(batches, desc=description, disable=not progress_bar):
            if isinstance(X, Tensor):
                X = X.to(device)
            y = y.to(device)
            f = sweep(X, y, curvature_fn, consumer, collect_diagonal=with_loss)
            if with_loss:
                loss = loss + loss_function(f, y)
            if isinstance(consumer, _FactorConsumer):
                consumer.batch_done(f.shape[0])

    bases: dict[str, tuple[Tensor, Tensor | None]] = {}
    if eigenbasis is None:
        factor_consumer = _FactorConsumer(
            ordered, kfac_approx, cache_budget_bytes, num_data
        )
        run_pass("EKFAC: Kronecker factors", factor_consumer, with_loss=True)
        for layer in ordered:
            q_g = _eigenvectors(
                layer.gradient_factor, f"gradient factor of layer '{layer.name}'"
            )
            q_a = None
            if layer.input_factor is not None:
                q_a = _eigenvectors(
                    layer.input_factor, f"input factor of layer '{layer.name}'"
                )
            bases[layer.name] = (q_g, q_a)
        need_second_pass = bool(ordered) and not factor_consumer.caching
    else:
        for (name, kind, is_diagonal), basis in zip(located, eigenbasis):
            if is_diagonal:
                continue
            q_g, q_a = bases.get(name, (basis[0], None))
            bases[name] = (q_g, basis[1] if kind == "weight" else q_a)
        need_second_pass = True

    correction = _CorrectionConsumer(bases)
    if need_second_pass:
        run_pass(
            "EKFAC: eigenvalue correction",
            correction,
            with_loss=eigenbasis is not None,
        )
    else:
        for layer in ordered:
            correction.replay(layer)

    eigenvectors: list[tuple[Tensor, ...]] = [()] * len(located)
    eigenvalues: list[Tensor] = [torch.zeros_like(p) for p in params]
    for entry in diagonal.values():
        for index, squares in zip(entry.indices, entry.squares):
            eigenvalues[index] = squares
    for index, ((name, kind, is_diagonal), param) in enumerate(zip(located, params)):
        if is_diagonal:
            continue
        layer = layers[name]
        q_g, q_a = bases[name]
        if kind == "weight":
            eigenvectors[index] = (q_g, q_a)
            eigenvalues[index] = layer.weight_correction.reshape(param.shape[0], -1)
        else:
            eigenvectors[index] = (q_g,)
            eigenvalues[index] = layer.bias_correction
    return eigenvectors, eigenvalues, loss
