r"""What the EKFAC engine accumulates in its passes over the data.

A pass hands each Kronecker layer's inputs ``a`` (shape ``(B, S, d_in)``, ``S`` the
positions sharing the weight) and, one backward pass ``k`` at a time, its output
gradients ``g_k`` (``(B, S, d_out)``) to an accumulator:

* :class:`FactorAccumulator` sums the Kronecker factors ``A = Σ a aᵀ`` and
  ``G = Σ_k g_k g_kᵀ`` (``kfac_approx="expand"``; ``"reduce"`` averages the inputs
  and sums the gradients over positions first; padding positions, marked by the
  engine, are left out of ``A``) and, within a memory budget, caches ``a`` and ``g``
  for a replay;
* :class:`CorrectionAccumulator` sums the corrected eigenvalues in fixed eigenbases,
  from a second pass or from the replay. For a layer without weight sharing this is
  one matrix product,

$$
    λ = \sum_n \Big(\sum_k (Q_G^\top g_{n,k})^{2}\Big)
        \big((Q_A^\top a_n)^{2}\big)^\top ,
$$

  and with weight sharing (``Conv2d``) the rotated per-example gradients
  ``Σ_s (Q_Gᵀ g_{n,k,s})(Q_Aᵀ a_{n,s})ᵀ`` are squared and summed;
* :class:`DiagonalSquares` sums the squared per-example gradients of the parameters
  with diagonal blocks.

A layer whose output is the model output gets the curvature object itself
(:meth:`PassAccumulator.output`) instead of gradients: its factor and correction are
closed-form (see :class:`~ekfac_laplace.output_curvature.OutputCurvature`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ekfac_laplace.diagonal import CHUNK_NUMBERS, ModuleCall, restricted_gradients
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layout import DiagonalModule, KroneckerLayer, group_rows
from ekfac_laplace.options import KFACApprox
from ekfac_laplace.output_curvature import OutputCurvature

#: A cached first-pass entry of a layer: its inputs and either the stacked output
#: gradients ``(B, K, S, d_out)`` or, for the output layer, the output curvature.
CacheEntry = tuple[Tensor, Tensor | OutputCurvature]


class PassAccumulator:
    """Receives what one pass over the data sees; the default ignores everything."""

    def plan(
        self,
        inputs: dict[str, Tensor],
        hidden: list[KroneckerLayer],
        passes: int,
        masks: dict[str, Tensor] | None = None,
    ) -> None:
        """Before anything else of a batch.

        Args:
            inputs: Layer name to its inputs ``(B, S, d_in)``.
            hidden: The layers that get output gradients (not the output layer).
            passes: The number ``K`` of backward passes that will follow.
            masks: Layer name to its mask ``(B, S)`` (``1``: token, ``0``:
                padding) for the layers whose inputs include padding.
        """

    def begin(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Before the backward passes of a hidden layer.

        Args:
            layer: The layer.
            a: Its inputs, ``(B, S, d_in)``.
        """

    def gradient(self, layer: KroneckerLayer, a: Tensor, g: Tensor) -> None:
        """One backward pass of a hidden layer.

        Args:
            layer: The layer.
            a: Its inputs, ``(B, S, d_in)``.
            g: Its output gradients, ``(B, S, d_out)``.
        """

    def end(self, layer: KroneckerLayer, a: Tensor) -> None:
        """After the backward passes of a hidden layer.

        Args:
            layer: The layer.
            a: Its inputs, ``(B, S, d_in)``.
        """

    def output(
        self, layer: KroneckerLayer, a: Tensor, curvature: OutputCurvature
    ) -> None:
        """A layer whose output is the model output (one position).

        Args:
            layer: The layer.
            a: Its inputs, ``(B, 1, d_in)``.
            curvature: The batch's output-space curvature.
        """

    def batch_done(self, batch_size: int) -> None:
        """After a batch.

        Args:
            batch_size: Its number of examples.
        """


def _add(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


class FactorAccumulator(PassAccumulator):
    """Sums ``A`` and ``G`` per layer; caches ``a`` and ``g`` within a budget.

    Whether the whole data set's cache would fit the budget is projected from the
    first batch, so an oversized cache is never built; if the projection is
    exceeded later, the cache is dropped and the engine makes a second pass.

    Args:
        layers: The Kronecker layers.
        kfac_approx: ``"expand"`` or ``"reduce"``.
        cache_budget_bytes: Bytes the cache may hold; ``0`` disables it.
        num_data: Number of examples in the data set (for the projection).
    """

    def __init__(
        self,
        layers: list[KroneckerLayer],
        kfac_approx: KFACApprox,
        cache_budget_bytes: int,
        num_data: int,
    ) -> None:
        self.layers = layers
        self.expand = kfac_approx == KFACApprox.EXPAND
        self.budget = cache_budget_bytes
        self.num_data = num_data
        self.caching = cache_budget_bytes > 0
        self.cache_bytes = 0
        self.examples_seen = 0
        self.input_factors: dict[str, Tensor] = {}
        self.gradient_factors: dict[str, Tensor] = {}
        self.cache: dict[str, list[CacheEntry]] = {layer.name: [] for layer in layers}
        self._pending: dict[str, list[Tensor]] = {}
        self._masks: dict[str, Tensor] = {}

    def plan(
        self,
        inputs: dict[str, Tensor],
        hidden: list[KroneckerLayer],
        passes: int,
        masks: dict[str, Tensor] | None = None,
    ) -> None:
        """Keep the batch's padding masks; give up caching if need be.

        On the first batch, caching stops if the whole set would not fit.
        """
        self._masks = masks or {}
        if not self.caching or self.examples_seen:
            return
        batch = next(iter(inputs.values())).shape[0]
        per_batch = sum(a.numel() * a.element_size() for a in inputs.values())
        for layer in hidden:
            a = inputs[layer.name]
            numbers = passes * a.shape[0] * a.shape[1] * layer.out_features
            per_batch += numbers * a.element_size()
        if per_batch * self.num_data / batch > self.budget:
            self._stop_caching()

    def begin(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Add the batch's ``a aᵀ`` to ``A``."""
        self._add_input_factor(layer, a)
        self._pending[layer.name] = []

    def gradient(self, layer: KroneckerLayer, a: Tensor, g: Tensor) -> None:
        """Add the pass's ``g gᵀ`` to ``G``."""
        flat = g.reshape(-1, g.shape[-1]) if self.expand else g.sum(1)
        self.gradient_factors[layer.name] = _add(
            self.gradient_factors.get(layer.name), flat.T @ flat
        )
        if self.caching:
            self._pending[layer.name].append(g)

    def end(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Cache the batch's ``a`` and stacked ``g`` while within budget."""
        gradients = self._pending.pop(layer.name)
        if self.caching:
            g = torch.stack(gradients, dim=1)  # (B, K, S, d_out)
            self._remember(layer, (a.numel() + g.numel()) * a.element_size(), (a, g))

    def output(
        self, layer: KroneckerLayer, a: Tensor, curvature: OutputCurvature
    ) -> None:
        """Add the closed-form ``G`` of the output layer; cache its curvature."""
        self._add_input_factor(layer, a)
        self.gradient_factors[layer.name] = _add(
            self.gradient_factors.get(layer.name), curvature.gradient_factor()
        )
        nbytes = a.numel() * a.element_size() + curvature.nbytes()
        self._remember(layer, nbytes, (a, curvature))

    def batch_done(self, batch_size: int) -> None:
        """Count the examples seen."""
        self.examples_seen += batch_size

    def eigenbases(self) -> dict[str, tuple[Tensor, Tensor | None]]:
        """The eigenvectors of the accumulated factors.

        Returns:
            Layer name to ``(Q_G, Q_A)``; ``Q_A`` is ``None`` when the layer's
            weight is not in the posterior.
        """
        return {layer.name: self.eigenbasis(layer) for layer in self.layers}

    def eigenbasis(self, layer: KroneckerLayer) -> tuple[Tensor, Tensor | None]:
        """The eigenvectors ``(Q_G, Q_A)`` of one layer's factors.

        Args:
            layer: The layer.

        Returns:
            ``Q_G`` and ``Q_A`` (``None`` without a weight in the posterior).
        """
        q_g = robust_eigenvectors(
            self.gradient_factors[layer.name],
            f"gradient factor of layer '{layer.name}'",
        )
        q_a = None
        if layer.name in self.input_factors:
            q_a = robust_eigenvectors(
                self.input_factors[layer.name],
                f"input factor of layer '{layer.name}'",
            )
        return q_g, q_a

    def partial_sums(self) -> list[Tensor]:
        """The factors in layer order (``A`` where kept, ``G``), to sum over ranks.

        Returns:
            The tensors themselves (summed in place).
        """
        sums = []
        for layer in self.layers:
            if layer.name in self.input_factors:
                sums.append(self.input_factors[layer.name])
            sums.append(self.gradient_factors[layer.name])
        return sums

    def _add_input_factor(self, layer: KroneckerLayer, a: Tensor) -> None:
        if layer.weight_index is None:
            return
        mask = self._masks.get(layer.name)
        if mask is not None:  # padding positions: left out
            a = a * mask.unsqueeze(-1)
        if self.expand:
            flat = a.reshape(-1, a.shape[-1])
        elif mask is not None:  # the mean over the tokens
            flat = a.sum(1) / mask.sum(1, keepdim=True).clamp_min(1.0)
        else:
            flat = a.mean(1)
        self.input_factors[layer.name] = _add(
            self.input_factors.get(layer.name), flat.T @ flat
        )

    def _remember(self, layer: KroneckerLayer, nbytes: int, entry: CacheEntry) -> None:
        if not self.caching:
            return
        self.cache_bytes += nbytes
        self.cache[layer.name].append(entry)
        if self.cache_bytes > self.budget:  # over budget: fall back to a second pass
            self._stop_caching()

    def _stop_caching(self) -> None:
        self.caching = False
        for entries in self.cache.values():
            entries.clear()


class CorrectionAccumulator(PassAccumulator):
    """Sums the corrected eigenvalues of each layer in fixed eigenbases.

    Args:
        bases: Layer name to ``(Q_G, Q_A)`` (``Q_A`` ``None`` without a weight).

    Attributes:
        weight_corrections: Layer name to ``λ`` of its weight, ``(d_out, d_in)``.
        bias_corrections: Layer name to ``λ`` of its bias, ``(d_out,)``.
    """

    def __init__(self, bases: dict[str, tuple[Tensor, Tensor | None]]) -> None:
        self.bases = bases
        self.weight_corrections: dict[str, Tensor] = {}
        self.bias_corrections: dict[str, Tensor] = {}
        self._squares: dict[str, Tensor] = {}
        self._rotated_inputs: dict[str, Tensor] = {}

    def begin(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Prepare the batch: rotate shared inputs once for all passes."""
        if a.shape[1] == 1:
            d_out = self.bases[layer.name][0].shape[0]
            self._squares[layer.name] = a.new_zeros(a.shape[0], d_out)
        elif layer.weight_index is not None:
            self._rotated_inputs[layer.name] = a @ self.bases[layer.name][1]

    def gradient(self, layer: KroneckerLayer, a: Tensor, g: Tensor) -> None:
        """Add one pass: rotated gradient squares, or rotated per-example grads."""
        g_rot = g @ self.bases[layer.name][0]  # (B, S, d_out)
        if a.shape[1] == 1:
            self._squares[layer.name] += g_rot[:, 0].square()
            return
        if layer.weight_index is not None:
            a_rot = self._rotated_inputs[layer.name]
            # The rotated per-example gradients (d_out, d_in) are formed for a few
            # examples at a time, within CHUNK_NUMBERS numbers.
            d_out, d_in = g_rot.shape[-1], a_rot.shape[-1]
            chunk = max(1, CHUNK_NUMBERS // (d_out * d_in))
            squares = g_rot.new_zeros(d_out, d_in)
            for start in range(0, g_rot.shape[0], chunk):
                per_example = torch.einsum(
                    "bsi,bsj->bij",
                    g_rot[start : start + chunk],
                    a_rot[start : start + chunk],
                )
                squares += per_example.square().sum(0)
            self._add_weight(layer, squares)
        if layer.bias_index is not None:
            self._add_bias(layer, g_rot.sum(1).square().sum(0))

    def end(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Finish a layer without weight sharing with one matrix product."""
        if a.shape[1] == 1:
            self._finish(layer, a, self._squares.pop(layer.name))
        self._rotated_inputs.pop(layer.name, None)

    def output(
        self, layer: KroneckerLayer, a: Tensor, curvature: OutputCurvature
    ) -> None:
        """The output layer's correction in closed form."""
        self._finish(layer, a, curvature.rotated_squares(self.bases[layer.name][0]))

    def partial_sums(self, layers: list[KroneckerLayer]) -> list[Tensor]:
        """The corrected eigenvalues in layer order (weight, bias), to sum over ranks.

        Args:
            layers: The layers, in the layout's order.

        Returns:
            The tensors themselves (summed in place).
        """
        sums = []
        for layer in layers:
            if layer.weight_index is not None:
                sums.append(self.weight_corrections[layer.name])
            if layer.bias_index is not None:
                sums.append(self.bias_corrections[layer.name])
        return sums

    def replay(self, layer: KroneckerLayer, entries: list[CacheEntry]) -> None:
        """Feed a layer's cached first-pass entries, as a second pass would.

        Args:
            layer: The layer.
            entries: Its cache (emptied).
        """
        for a, g in entries:
            if isinstance(g, OutputCurvature):
                self.output(layer, a, g)
                continue
            self.begin(layer, a)
            for k in range(g.shape[1]):
                self.gradient(layer, a, g[:, k])
            self.end(layer, a)
        entries.clear()

    def _finish(self, layer: KroneckerLayer, a: Tensor, squares: Tensor) -> None:
        """No weight sharing: ``λ = Σ_n (Σ_k (Q_Gᵀ g_nk)²) ((Q_Aᵀ a_n)²)ᵀ``."""
        if layer.weight_index is not None:
            q_a = self.bases[layer.name][1]
            self._add_weight(layer, squares.T @ (a[:, 0] @ q_a).square())
        if layer.bias_index is not None:
            self._add_bias(layer, squares.sum(0))

    def _add_weight(self, layer: KroneckerLayer, term: Tensor) -> None:
        self.weight_corrections[layer.name] = _add(
            self.weight_corrections.get(layer.name), term
        )

    def _add_bias(self, layer: KroneckerLayer, term: Tensor) -> None:
        self.bias_corrections[layer.name] = _add(
            self.bias_corrections.get(layer.name), term
        )


class DiagonalSquares:
    """Sums ``Σ_n (∂⟨g_n, m(x_n)⟩/∂θ)²`` for the parameters with diagonal blocks.

    Args:
        modules: The modules with diagonal blocks.

    Attributes:
        squares: Module name to one tensor per parameter, shaped like it.
    """

    def __init__(self, modules: list[DiagonalModule]) -> None:
        self.squares: dict[str, list[Tensor]] = {
            entry.name: [
                torch.zeros_like(
                    parameter := entry.module.get_parameter(name).detach(),
                    dtype=accumulation_dtype(parameter.dtype),
                )
                for name in entry.param_names
            ]
            for entry in modules
        }

    def partial_sums(self) -> list[Tensor]:
        """The squares in the layout's order, for summing over the ranks.

        Returns:
            The tensors themselves (summed in place).
        """
        return [tensor for squares in self.squares.values() for tensor in squares]

    def add(
        self,
        entry: DiagonalModule,
        call: ModuleCall,
        grad_outputs: Sequence[Tensor | None],
        batch: int,
    ) -> None:
        """Add one backward pass of one module.

        Args:
            entry: The module.
            call: Its forward call.
            grad_outputs: The gradient at each of its output tensors.
            batch: The number of examples; a module that sees ``B·m`` rows gets the
                per-row gradients of each example's ``m`` consecutive rows summed
                (see :func:`~ekfac_laplace.layout.group_rows`).
        """
        grads = restricted_gradients(
            entry.module, entry.param_names, call, grad_outputs
        )
        for squares, (rows, grad) in zip(self.squares[entry.name], grads):
            grad = group_rows(grad.unsqueeze(1), batch, entry.name).sum(1)
            grad = grad.to(squares.dtype)
            if rows is None:
                squares += grad.square().sum(0)
            else:
                squares.index_add_(0, rows, grad.square().sum(0))


def robust_eigenvectors(factor: Tensor, description: str) -> Tensor:
    """Eigenvectors of a Kronecker factor, robust to ``eigh`` failing to converge.

    ``eigh`` can fail on ill-conditioned float32 factors; it is retried in float64,
    then in float64 with a shift ``c I`` (which leaves the eigenvectors unchanged).

    Args:
        factor: A symmetric positive semi-definite matrix.
        description: What it is, for messages.

    Returns:
        Orthonormal eigenvectors (columns) in the factor's dtype.

    Raises:
        ValueError: If the factor is not finite.
        RuntimeError: If ``eigh`` fails even in float64 with a shift.
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
