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
  ``Q_Gᵀ (Σ_s g_{n,k,s} a_{n,s}ᵀ) Q_A`` are squared and summed, each rotation
  applied to whichever side of the product is cheaper (:func:`contraction_order`);
* :class:`DiagonalSquares` sums the squared per-example gradients of the parameters
  with diagonal blocks.

A layer whose output is the model output gets the curvature object itself
(:meth:`PassAccumulator.output`) instead of gradients: its factor and correction are
closed-form (see :class:`~ekfac_laplace.output_curvature.OutputCurvature`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import torch
from torch import Tensor

from ekfac_laplace.dense import DenseBlocks
from ekfac_laplace.diagonal import (
    CHUNK_NUMBERS,
    ModuleCall,
    on_every_row,
    restricted_gradients,
)
from ekfac_laplace.eigh import robust_eigenvectors
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layout import (
    DiagonalModule,
    KroneckerLayer,
    LayerBasis,
    group_rows,
)
from ekfac_laplace.options import KFACApprox
from ekfac_laplace.output_curvature import OutputCurvature


class PerExampleGradients:
    """A batch's per-example (pseudo-)gradients of a layer, one per backward pass.

    The compact cache entry of a weight-sharing layer: ``K d_out (d_in + 1)``
    numbers per example instead of the ``S (d_in + K d_out)`` of its inputs and
    output gradients (a convolution's positions ``S`` are many).

    Args:
        weight: ``Σ_s g_{n,k,s} a_{n,s}ᵀ``, shape ``(B, K, d_out, d_in)``, or
            ``None`` without the weight in the posterior.
        bias: ``Σ_s g_{n,k,s}``, shape ``(B, K, d_out)``, or ``None``.
    """

    def __init__(self, weight: Tensor | None, bias: Tensor | None) -> None:
        self.weight, self.bias = weight, bias

    def nbytes(self) -> int:
        """Memory held.

        Returns:
            Bytes.
        """
        held = [t for t in (self.weight, self.bias) if t is not None]
        return sum(t.numel() * t.element_size() for t in held)


#: A cached first-pass entry of a layer: its inputs and either the stacked output
#: gradients ``(B, K, S, d_out)`` or, for the output layer, the output curvature; or
#: the per-example gradients alone (the compact form of weight-sharing layers).
CacheEntry = tuple[Tensor, Tensor | OutputCurvature] | PerExampleGradients


def per_example_numbers(
    layer: KroneckerLayer, positions: int, d_in: int, passes: int
) -> tuple[int, int]:
    """Numbers per example of a layer's two cache forms: raw and per-example.

    Args:
        layer: The layer.
        positions: Its positions ``S`` sharing the weight.
        d_in: Its input features.
        passes: The backward passes ``K``.

    Returns:
        ``(S (d_in + K d_out), K (d_out d_in [weight] + d_b [bias]))``.
    """
    d_out = layer.out_features
    raw = positions * (d_in + passes * d_out)
    compact = passes * (
        (d_out * d_in if layer.weight_index is not None else 0)
        + (layer.bias_features if layer.bias_index is not None else 0)
    )
    return raw, compact


class PassAccumulator:
    """Receives what one pass over the data sees; the default ignores everything."""

    def plan(
        self,
        inputs: dict[str, Tensor],
        hidden: list[KroneckerLayer],
        passes: int,
        masks: dict[str, Tensor] | None = None,
        curvature: OutputCurvature | None = None,
    ) -> None:
        """Before anything else of a batch.

        Args:
            inputs: Layer name to its inputs ``(B, S, d_in)``.
            hidden: The layers that get output gradients (not the output layer).
            passes: The number ``K`` of backward passes that will follow.
            masks: Layer name to its mask ``(B, S)`` (``1``: token, ``0``:
                padding) for the layers whose inputs include padding.
            curvature: The batch's output curvature (what an output layer's
                cache entry holds).
        """

    def begin(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Before the backward passes of a hidden layer.

        Args:
            layer: The layer.
            a: Its inputs, ``(B, S, d_in)``.
        """

    def gradient(
        self,
        layer: KroneckerLayer,
        a: Tensor,
        g: Tensor | None,
        bias_rows: Tensor | None = None,
    ) -> None:
        """One backward pass of a hidden layer.

        Args:
            layer: The layer.
            a: Its inputs, ``(B, S, d_in)``.
            g: Its output gradients, ``(B, S, d_out)`` (``None`` for a layer with
                only a bias of its own).
            bias_rows: For a bias with a factor of its own, its rows
                ``(B, S_b, d_b)``.
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


def _rotated_squares(
    per_example: Tensor, q_g: Tensor | None, q_a: Tensor | None, fresh: bool = False
) -> Tensor:
    """``Σ (Q_Gᵀ M Q_A)²`` over the leading dimensions of ``M`` ``(..., d_out, d_in)``.

    A rotation given as ``None`` has been applied already (or is the identity).
    The rotated products, new tensors, are squared in place, and so is a ``fresh``
    ``M`` (the caller's own product) left unrotated: squaring where they lie spares
    an allocation as large (fits of token-level layers ``1.4×`` faster on the CPU,
    where a new tensor's pages are touched for the first time).
    """
    rotated = per_example
    if q_g is not None:
        rotated = q_g.T @ rotated
    if q_a is not None:
        rotated = rotated @ q_a
    in_place = fresh or rotated is not per_example
    squared = rotated.square_() if in_place else rotated.square()
    return squared.flatten(0, -3).sum(0)


def _gram(
    x: Tensor,
    mask: Tensor | None = None,
    out: Tensor | None = None,
    kept: Tensor | None = None,
) -> Tensor:
    """``Σ_{n,s} x_{n,s} x_{n,s}ᵀ`` of ``x`` ``(B, S, d)``, over the unmasked rows.

    A convolution's patches and output gradients arrive as transposed views of
    ``(B, d, S)`` tensors; flattening them would copy, so their Gram matrices are
    summed per example instead (2–3× faster at the benchmark's sizes). Given the
    indices of the unmasked rows (``kept``), the others are dropped before the
    product, which then costs what the tokens do; otherwise they are zeroed.

    Args:
        x: The rows, ``(B, S, d)``.
        mask: ``(B, S)``: ``1`` for a row that counts, ``0`` for one left out.
        out: A running sum to add the Gram matrix to, in place.
        kept: The indices of the unmasked rows among the ``B·S``.

    Returns:
        ``out`` with the Gram matrix added, or a new sum: exact on and above the
        diagonal (rows in memory order are summed by :func:`add_upper_gram`), to be
        read through :func:`mirror_upper`.
    """
    if x.shape[1] > 1 and x.stride(-1) != 1:
        if mask is not None:
            x = x * mask.unsqueeze(-1)
        term = torch.bmm(x.transpose(1, 2), x).sum(0)
        return term if out is None else out.add_(term)
    flat = x.reshape(-1, x.shape[-1])
    if kept is not None:
        flat = flat.index_select(0, kept)
    elif mask is not None:
        flat = flat * mask.reshape(-1, 1)
    if out is None:
        out = flat.new_zeros(flat.shape[1], flat.shape[1])
    add_upper_gram(out, flat)
    return out


#: Columns up to which a Gram matrix is one matrix product (see add_upper_gram).
GRAM_LEAF_COLUMNS = 128


def add_upper_gram(out: Tensor, x: Tensor) -> None:
    """Add ``xᵀ x`` to ``out`` ``(d, d)`` on and above the diagonal: the rest is stale.

    A Gram matrix is symmetric, so only its upper triangle needs computing: the
    columns are halved recursively, each diagonal block recursing and the block
    right of it one product, down to :data:`GRAM_LEAF_COLUMNS`: ``¾`` of the
    multiply-adds of one ``xᵀ x`` at ``d = 256``, towards ``½`` for wider ones.
    Measured on two CPU threads: ``0.9×`` the time at ``d = 256``, ``0.7×`` at 768
    and ``0.62×`` at 3072. The blocks below the diagonal are never written;
    :func:`mirror_upper` restores them.

    Args:
        out: The running sum, ``(d, d)``; updated in place.
        x: The rows, ``(n, d)``.
    """
    d = x.shape[1]
    if d <= GRAM_LEAF_COLUMNS:
        out.addmm_(x.T, x)
        return
    half = d // 2
    left, right = x[:, :half], x[:, half:]
    add_upper_gram(out[:half, :half], left)
    out[:half, half:].addmm_(left.T, right)
    add_upper_gram(out[half:, half:], right)


def mirror_upper(matrix: Tensor) -> Tensor:
    """Copy the upper triangle of ``matrix`` ``(..., d, d)`` below it, in place."""
    return matrix.copy_(matrix.triu() + matrix.triu(1).transpose(-1, -2))


def _grouped(x: Tensor, groups: int) -> Tensor:
    """``(B, S, G·d)`` as ``(B, S, G, d)``: a grouped layer's groups apart."""
    return x.reshape(*x.shape[:2], groups, -1)


def _factor_term(
    x: Tensor,
    groups: int,
    mask: Tensor | None = None,
    out: Tensor | None = None,
    kept: Tensor | None = None,
) -> Tensor:
    """``Σ x xᵀ`` over the unmasked rows of ``x`` ``(B, S, G·d)``, per group (``G``).

    Added to ``out`` in place where given (see :func:`_gram`).
    """
    if groups == 1:
        return _gram(x, mask, out, kept)
    if mask is not None:
        x = x * mask.unsqueeze(-1)
    grouped = _grouped(x, groups)
    term = torch.einsum("bsgi,bsgj->gij", grouped, grouped)
    return term if out is None else out.add_(term)


class FactorAccumulator(PassAccumulator):
    """Sums ``A`` and ``G`` per layer; caches layers' entries within a budget.

    Each layer's cache over the whole data set is projected from the first batch,
    so an oversized cache is never built. If all of them fit the budget, all are
    cached and there is no second pass. Otherwise only the layers whose compact
    per-example entries are fewer numbers than their inputs and gradients (a
    convolution's many positions: their corrections are the costly ones) are cached,
    smallest first, within the budget; caching any other layer would hold memory
    without sparing the second pass. The engine replays the cached layers and makes
    a second pass for the others only, back-propagating only as deep as they are.
    If the projection is exceeded later, every cache is dropped and the second pass
    covers all layers.

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
        # The running sums: exact on and above the diagonal (see add_upper_gram).
        self._input: dict[str, Tensor] = {}
        self._gradient: dict[str, Tensor] = {}
        self._bias: dict[str, Tensor] = {}  # biases with a factor of their own
        self.cache: dict[str, list[CacheEntry]] = {layer.name: [] for layer in layers}
        self._pending: dict[str, list[Tensor]] = {}
        self._masks: dict[str, Tensor] = {}
        self._kept_rows: dict[int, Tensor] = {}  # id(mask) → its unmasked rows
        # Layers cached as per-example gradients (fewer numbers than a and g).
        self._compact: set[str] = set()
        #: The layers whose entries are cached (chosen on the first batch).
        self.cached: set[str] = set()

    @property
    def input_factors(self) -> dict[str, Tensor]:
        """Layer name to its input factor ``A`` (with the weight in the posterior)."""
        return self._mirrored(self._input)

    @property
    def gradient_factors(self) -> dict[str, Tensor]:
        """Layer name to its gradient factor ``G``."""
        return self._mirrored(self._gradient)

    @property
    def bias_factors(self) -> dict[str, Tensor]:
        """Layer name to the factor of a bias with a factor of its own."""
        return self._mirrored(self._bias)

    @staticmethod
    def _mirrored(factors: dict[str, Tensor]) -> dict[str, Tensor]:
        """The running sums made whole (symmetric) in place: the same dict.

        Whole as of this call: a batch added after it updates the upper triangles
        only, so read the property again rather than keep the dict.
        """
        for factor in factors.values():
            mirror_upper(factor)
        return factors

    def plan(
        self,
        inputs: dict[str, Tensor],
        hidden: list[KroneckerLayer],
        passes: int,
        masks: dict[str, Tensor] | None = None,
        curvature: OutputCurvature | None = None,
    ) -> None:
        """Keep the batch's padding masks; give up caching if need be.

        On the first batch, each hidden layer's cache form is chosen (per-example
        gradients where they are fewer numbers than its inputs and gradients) and
        the layers to cache (see the class); caching stops if none is.
        """
        self._masks = masks or {}
        self._kept_rows = {}
        if not self.caching or self.examples_seen or not inputs:
            return
        batch = next(iter(inputs.values())).shape[0]
        hidden_names = {layer.name for layer in hidden}
        per_batch = {}  # bytes of each layer's entry of this batch
        for layer in self.layers:
            a = inputs[layer.name]
            if layer.groups > 1:  # its per-group correction is a second pass's
                continue
            if layer.name not in hidden_names:  # the output layer: a and the curvature
                held = curvature.nbytes() if curvature is not None else 0
                per_batch[layer.name] = a.numel() * a.element_size() + held
                continue
            raw, compact = per_example_numbers(layer, a.shape[1], a.shape[2], passes)
            if compact < raw or layer.separate_bias:  # a separate bias: compact only
                self._compact.add(layer.name)
                raw = compact
            per_batch[layer.name] = min(raw, compact) * a.shape[0] * a.element_size()
        scale = self.num_data / batch  # batch to whole set
        if sum(per_batch.values()) * scale <= self.budget:
            self.cached = set(per_batch)  # no second pass at all
        else:  # the compact layers, smallest first: their corrections are costly
            projected = 0.0
            compact = [name for name in per_batch if name in self._compact]
            for name in sorted(compact, key=per_batch.get):
                if projected + per_batch[name] * scale > self.budget:
                    break
                projected += per_batch[name] * scale
                self.cached.add(name)
        if not self.cached:
            self._stop_caching()

    def begin(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Add the batch's ``a aᵀ`` to ``A``."""
        self._add_input_factor(layer, a)
        self._pending[layer.name] = []

    def gradient(
        self,
        layer: KroneckerLayer,
        a: Tensor,
        g: Tensor | None,
        bias_rows: Tensor | None = None,
    ) -> None:
        """Add the pass's ``g gᵀ`` to ``G`` (and a separate bias's to its factor)."""
        for factors, rows in ((self._gradient, g), (self._bias, bias_rows)):
            if rows is None:
                continue
            groups = layer.groups if factors is self._gradient else 1
            mask = self._masks.get(layer.name)
            if mask is not None and mask.shape != rows.shape[:2]:
                mask = None  # rows that are not the layer's positions
            if not self.expand:
                if mask is not None:  # padding positions: left out
                    rows = rows * mask.unsqueeze(-1)
                rows, mask = rows.sum(1, keepdim=True), None
            factors[layer.name] = _factor_term(
                rows, groups, mask, factors.get(layer.name), self._kept(mask)
            )
        if not self.caching or layer.name not in self.cached:
            return
        if layer.name in self._compact:  # only the per-example gradients
            weight = None
            if layer.weight_index is not None:
                weight = torch.bmm(g.transpose(1, 2), a)
            bias = None
            if layer.bias_index is not None:
                bias = (g if bias_rows is None else bias_rows).sum(1)
            self._pending[layer.name].append((weight, bias))
        else:
            self._pending[layer.name].append(g)

    def end(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Cache the batch's entry while within budget."""
        gradients = self._pending.pop(layer.name)
        if not self.caching or layer.name not in self.cached or not gradients:
            return  # (no gradient: an expert called on no row adds nothing)
        if layer.name in self._compact:
            weights, biases = zip(*gradients)
            entry = PerExampleGradients(
                None if weights[0] is None else torch.stack(weights, dim=1),
                None if biases[0] is None else torch.stack(biases, dim=1),
            )
            self._remember(layer, entry.nbytes(), entry)
        else:
            g = torch.stack(gradients, dim=1)  # (B, K, S, d_out)
            self._remember(layer, (a.numel() + g.numel()) * a.element_size(), (a, g))

    def output(
        self, layer: KroneckerLayer, a: Tensor, curvature: OutputCurvature
    ) -> None:
        """Add the closed-form ``G`` of the output layer; cache its curvature."""
        self._add_input_factor(layer, a)
        self._gradient[layer.name] = _add(
            self._gradient.get(layer.name), curvature.gradient_factor()
        )
        nbytes = a.numel() * a.element_size() + curvature.nbytes()
        self._remember(layer, nbytes, (a, curvature))

    def batch_done(self, batch_size: int) -> None:
        """Count the examples seen."""
        self.examples_seen += batch_size

    def eigenbases(self) -> dict[str, LayerBasis]:
        """The eigenvectors of the accumulated factors.

        Returns:
            Layer name to its :class:`~ekfac_laplace.layout.LayerBasis`.
        """
        return {layer.name: self.eigenbasis(layer) for layer in self.layers}

    def eigenbasis(self, layer: KroneckerLayer) -> LayerBasis:
        """The eigenvectors of one layer's factors.

        Args:
            layer: The layer.

        Returns:
            ``Q_G`` (where ``G`` is kept), ``Q_A`` (with the weight in the
            posterior) and a separate bias factor's eigenvectors.
        """
        self._complete(layer)
        found = []
        for factors, what in (
            (self._gradient, "gradient"),
            (self._input, "input"),
            (self._bias, "bias"),
        ):
            found.append(
                robust_eigenvectors(
                    mirror_upper(factors[layer.name]),
                    f"Kronecker {what} factor of layer '{layer.name}'",
                )
                if layer.name in factors
                else None
            )
        return LayerBasis(*found)

    def partial_sums(self) -> list[Tensor]:
        """The factors in layer order (``A`` where kept, ``G``), to sum over ranks.

        Returns:
            The tensors themselves (summed in place).
        """
        sums = []
        for layer in self.layers:
            self._complete(layer)
            for factors in (self._input, self._gradient, self._bias):
                if layer.name in factors:
                    sums.append(mirror_upper(factors[layer.name]))
        return sums

    def _complete(self, layer: KroneckerLayer) -> None:
        """Zero factors for a layer that no batch reached (an idle expert).

        Its eigenbases are then the identity and its corrected eigenvalues zero,
        and every rank of a distributed fit holds the same factors.
        """
        dtype = accumulation_dtype(layer.weight.dtype)
        for factors, what in (
            (self._gradient, "gradient"),
            (self._input, "input"),
            (self._bias, "bias"),
        ):
            size = layer.factor_sizes().get(what)
            if size is None or layer.name in factors:
                continue
            groups = () if what == "bias" or layer.groups == 1 else (layer.groups,)
            factors[layer.name] = layer.weight.new_zeros(
                *groups, size, size, dtype=dtype
            )

    def _kept(self, mask: Tensor | None) -> Tensor | None:
        """On the CPU, the indices of a padding mask's tokens, once per batch.

        Selecting them (``nonzero``) reads the mask on the host: free on the CPU,
        a wait for the device on a GPU, where the rows are zeroed instead.
        """
        if mask is None or mask.device.type != "cpu":
            return None
        if id(mask) not in self._kept_rows:  # the layers share the batch's mask
            self._kept_rows[id(mask)] = mask.reshape(-1).nonzero().squeeze(1)
        return self._kept_rows[id(mask)]

    def _add_input_factor(self, layer: KroneckerLayer, a: Tensor) -> None:
        if layer.weight_index is None:
            return
        mask = self._masks.get(layer.name)  # padding positions: left out
        total = self._input.get(layer.name)
        if self.expand:
            total = _factor_term(a, layer.groups, mask, total, self._kept(mask))
        elif mask is not None:  # the mean over the tokens
            flat = (a * mask.unsqueeze(-1)).sum(1)
            flat = flat / mask.sum(1, keepdim=True).clamp_min(1.0)
            total = _factor_term(flat.unsqueeze(1), layer.groups, out=total)
        else:
            total = _factor_term(a.mean(1, keepdim=True), layer.groups, out=total)
        self._input[layer.name] = total

    def replay(self, correction: CorrectionAccumulator) -> list[KroneckerLayer]:
        """Feed the cached layers' entries to ``correction``, emptying the cache.

        Args:
            correction: The accumulator of the corrected eigenvalues.

        Returns:
            The layers a second pass must visit (not cached, or all of them if the
            cache was given up).
        """
        cached = self.cached if self.caching else set()
        for layer in self.layers:
            if layer.name in cached:
                correction.replay(layer, self.cache[layer.name])
        return [layer for layer in self.layers if layer.name not in cached]

    def _remember(self, layer: KroneckerLayer, nbytes: int, entry: CacheEntry) -> None:
        if not self.caching or layer.name not in self.cached:
            return
        self.cache_bytes += nbytes
        self.cache[layer.name].append(entry)
        if self.cache_bytes > self.budget:  # over budget: fall back to a second pass
            self._stop_caching()

    def _stop_caching(self) -> None:
        self.caching = False
        self.cached = set()
        for entries in self.cache.values():
            entries.clear()


class CorrectionAccumulator(PassAccumulator):
    """Sums the corrected eigenvalues of each layer in fixed eigenbases.

    Args:
        bases: Layer name to its eigenbases.

    Attributes:
        weight_corrections: Layer name to ``λ`` of its weight, ``(d_out, d_in)``.
        bias_corrections: Layer name to ``λ`` of its bias, ``(d_out,)``.
    """

    def __init__(self, bases: dict[str, LayerBasis]) -> None:
        self.bases = bases
        self.weight_corrections: dict[str, Tensor] = {}
        self.bias_corrections: dict[str, Tensor] = {}
        self._squares: dict[str, Tensor] = {}
        # Per shared-weight layer of the batch: the inputs (rotated or not), the
        # rotation still to apply to the right of the per-example gradients, and
        # whether the gradients are rotated before the product.
        self._inputs: dict[str, tuple[Tensor, Tensor | None, bool]] = {}
        self._passes = 1

    def plan(
        self,
        inputs: dict[str, Tensor],
        hidden: list[KroneckerLayer],
        passes: int,
        masks: dict[str, Tensor] | None = None,
        curvature: OutputCurvature | None = None,
    ) -> None:
        """Keep the number of backward passes (it decides the contraction order)."""
        self._passes = max(passes, 1)

    def begin(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Prepare the batch: rotate shared inputs once for all passes, if cheaper."""
        if not layer.shares_weight:
            return
        if layer.groups > 1:  # each group's inputs in its own basis
            q_a = self.bases[layer.name].input
            if q_a is not None:
                rotated = torch.einsum("bsgi,gij->bsgj", _grouped(a, layer.groups), q_a)
                self._inputs[layer.name] = (rotated, None, True)
            return
        if a.shape[1] == 1:
            d_out = self.bases[layer.name].gradient.shape[0]
            self._squares[layer.name] = a.new_zeros(a.shape[0], d_out)
        elif layer.weight_index is not None:
            q_g, q_a, _ = self.bases[layer.name]
            B, S, d_in = a.shape
            rotate_a, rotate_g = contraction_order(
                B, S, d_in, q_g.shape[0], self._passes
            )
            if rotate_a:
                self._inputs[layer.name] = (a @ q_a, None, rotate_g)
            else:
                self._inputs[layer.name] = (a, q_a, rotate_g)

    def gradient(
        self,
        layer: KroneckerLayer,
        a: Tensor,
        g: Tensor | None,
        bias_rows: Tensor | None = None,
    ) -> None:
        """Add one pass: rotated gradient squares, or rotated per-example grads."""
        basis = self.bases[layer.name]
        if bias_rows is not None:  # a bias with a factor of its own
            self._add_bias(layer, (bias_rows.sum(1) @ basis.bias).square().sum(0))
        if g is None:
            return
        q_g = basis.gradient
        if layer.groups > 1:
            self._grouped_gradient(layer, g, q_g)
            return
        if a.shape[1] == 1:
            self._squares[layer.name] += (g[:, 0] @ q_g).square_()
            return
        if layer.weight_index is not None:
            a_used, q_a, rotate_g = self._inputs[layer.name]
            g_used = g @ q_g if rotate_g else g  # (B, S, d_out)
            # The rotated per-example gradients (d_out, d_in) are formed for a few
            # examples at a time, within CHUNK_NUMBERS numbers.
            d_out, d_in = g.shape[-1], a_used.shape[-1]
            chunk = max(1, CHUNK_NUMBERS // (d_out * d_in))
            squares = g.new_zeros(d_out, d_in)
            for start in range(0, g.shape[0], chunk):
                per_example = torch.bmm(
                    g_used[start : start + chunk].transpose(1, 2),
                    a_used[start : start + chunk],
                )
                squares += _rotated_squares(
                    per_example, None if rotate_g else q_g, q_a, fresh=True
                )
            self._add_weight(layer, squares)
        if layer.bias_index is not None and not layer.separate_bias:
            self._add_bias(layer, (g.sum(1) @ q_g).square().sum(0))

    def _grouped_gradient(self, layer: KroneckerLayer, g: Tensor, q_g: Tensor) -> None:
        """One pass of a grouped layer: per group, as :meth:`gradient` does."""
        g_rot = torch.einsum("bsgo,gop->bsgp", _grouped(g, layer.groups), q_g)
        if layer.weight_index is not None:
            a_rot = self._inputs[layer.name][0]  # (B, S, G, d_in), rotated
            per_group = g_rot.shape[-1] * a_rot.shape[-1] * layer.groups
            chunk = max(1, CHUNK_NUMBERS // per_group)
            squares = g.new_zeros(layer.groups, g_rot.shape[-1], a_rot.shape[-1])
            for start in range(0, g.shape[0], chunk):
                rotated = torch.einsum(
                    "bsgo,bsgi->bgoi",
                    g_rot[start : start + chunk],
                    a_rot[start : start + chunk],
                )
                squares += rotated.square_().sum(0)
            self._add_weight(layer, squares)
        if layer.bias_index is not None and not layer.separate_bias:
            self._add_bias(layer, g_rot.sum(1).square().sum(0))

    def end(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Finish a layer without weight sharing with one matrix product."""
        if layer.name in self._squares:
            self._finish(layer, a, self._squares.pop(layer.name))
        self._inputs.pop(layer.name, None)

    def output(
        self, layer: KroneckerLayer, a: Tensor, curvature: OutputCurvature
    ) -> None:
        """The output layer's correction in closed form."""
        squares = curvature.rotated_squares(self.bases[layer.name].gradient)
        self._finish(layer, a, squares)

    def partial_sums(self, layers: list[KroneckerLayer]) -> list[Tensor]:
        """The corrected eigenvalues in layer order (weight, bias), to sum over ranks.

        Args:
            layers: The layers, in the layout's order.

        Returns:
            The tensors themselves (summed in place).
        """
        sums = []
        for layer in layers:
            self._complete(layer)
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
        for entry in entries:
            if isinstance(entry, PerExampleGradients):
                self._replay_per_example(layer, entry)
                continue
            a, g = entry
            if isinstance(g, OutputCurvature):
                self.output(layer, a, g)
                continue
            self._passes = g.shape[1]
            self.begin(layer, a)
            for k in range(g.shape[1]):
                self.gradient(layer, a, g[:, k])
            self.end(layer, a)
        entries.clear()

    def _replay_per_example(
        self, layer: KroneckerLayer, entry: PerExampleGradients
    ) -> None:
        """Rotate cached per-example gradients, square and sum them."""
        q_g, q_a, _ = self.bases[layer.name]
        if entry.weight is not None:
            B, K, d_out, d_in = entry.weight.shape
            chunk = max(1, CHUNK_NUMBERS // (K * d_out * d_in))
            squares = entry.weight.new_zeros(d_out, d_in)
            for start in range(0, B, chunk):
                squares += _rotated_squares(
                    entry.weight[start : start + chunk], q_g, q_a
                )
            self._add_weight(layer, squares)
        if entry.bias is not None:
            q_b = self.bases[layer.name].for_bias
            self._add_bias(layer, (entry.bias @ q_b).square().sum((0, 1)))

    def _finish(self, layer: KroneckerLayer, a: Tensor, squares: Tensor) -> None:
        """No weight sharing: ``λ = Σ_n (Σ_k (Q_Gᵀ g_nk)²) ((Q_Aᵀ a_n)²)ᵀ``."""
        if layer.weight_index is not None:
            q_a = self.bases[layer.name].input
            self._add_weight(layer, squares.T @ (a[:, 0] @ q_a).square_())
        if layer.bias_index is not None and not layer.separate_bias:
            self._add_bias(layer, squares.sum(0))

    def _complete(self, layer: KroneckerLayer) -> None:
        """Zero corrections for a layer that no batch reached (an idle expert)."""
        dtype = accumulation_dtype(layer.weight.dtype)
        if layer.weight_index is not None and layer.name not in self.weight_corrections:
            shape = layer.as_groups(layer.weight).shape
            shape = shape[1:] if shape[0] == 1 else shape
            self.weight_corrections[layer.name] = layer.weight.new_zeros(
                shape, dtype=dtype
            )
        if layer.bias_index is not None and layer.name not in self.bias_corrections:
            bias = layer.module.get_parameter(layer.bias_name)
            self.bias_corrections[layer.name] = bias.new_zeros(
                bias.numel(), dtype=dtype
            )

    def _add_weight(self, layer: KroneckerLayer, term: Tensor) -> None:
        self.weight_corrections[layer.name] = _add(
            self.weight_corrections.get(layer.name), term
        )

    def _add_bias(self, layer: KroneckerLayer, term: Tensor) -> None:
        self.bias_corrections[layer.name] = _add(
            self.bias_corrections.get(layer.name), term
        )


def contraction_order(
    batch: int, positions: int, d_in: int, d_out: int, passes: int
) -> tuple[bool, bool]:
    """Where to rotate a shared-weight layer's per-example gradients: cheapest first.

    ``Q_Gᵀ (Σ_s g_s a_sᵀ) Q_A`` can rotate the inputs ``a`` once per batch
    (``B S d_in²`` multiply-adds) or each example's product after it
    (``B d_out d_in²`` per pass), and the gradients ``g`` before the product
    (``B S d_out²`` per pass) or after it (``B d_out² d_in`` per pass); the
    product itself costs ``B S d_out d_in`` per pass either way. All four orders give
    the same numbers up to rounding.

    Args:
        batch: Examples ``B``.
        positions: Positions ``S`` sharing the weight.
        d_in: Input features (of the unfolded patches for a convolution).
        d_out: Output features.
        passes: Backward passes ``K`` of the batch.

    Returns:
        ``(rotate_a, rotate_g)``: whether to rotate the inputs, the gradients,
        before the product.
    """
    B, S, K = batch, positions, passes

    def cost(rotate_a: bool, rotate_g: bool) -> int:
        once = B * S * d_in * d_in if rotate_a else 0
        left = B * S * d_out * d_out if rotate_g else B * d_out * d_out * d_in
        right = 0 if rotate_a else B * d_out * d_in * d_in
        return once + K * (left + right + B * S * d_out * d_in)

    orders = [(a, g) for a in (True, False) for g in (True, False)]
    return min(orders, key=lambda order: cost(*order))


class DiagonalSquares:
    """Sums ``Σ_n (∂⟨g_n, m(x_n)⟩/∂θ)²`` for the parameters with diagonal blocks.

    The parameters of these modules with exact blocks get their per-example
    gradients' outer products instead, in ``dense``.

    A tied parameter (``tied``: applied by several modules) has one tensor of
    squares, shared by its modules' entries: per backward pass its per-example
    gradients are summed over the uses first (:meth:`add` keeps them), then
    squared (:meth:`end_pass`).

    Args:
        modules: The modules with diagonal (or exact) blocks.
        dense: Where the exact blocks are summed.
        tied: The block indices of tied parameters.

    Attributes:
        squares: Module name to one tensor per parameter, shaped like it.
    """

    def __init__(
        self,
        modules: list[DiagonalModule],
        dense: DenseBlocks | None = None,
        tied: Collection[int] = (),
    ) -> None:
        self.dense = dense
        self.tied = set(tied)
        shared: dict[int, Tensor] = {}

        def zeros(entry: DiagonalModule, name: str, index: int) -> Tensor:
            parameter = entry.module.get_parameter(name).detach()
            tensor = torch.zeros_like(
                parameter, dtype=accumulation_dtype(parameter.dtype)
            )
            return shared.setdefault(index, tensor) if index in self.tied else tensor

        self.squares: dict[str, list[Tensor]] = {
            entry.name: [
                zeros(entry, name, index)
                for name, index in zip(entry.param_names, entry.indices)
            ]
            for entry in modules
        }
        self._tied_squares = shared  # per tied block index, its one tensor
        self._pending: dict[int, Tensor] = {}  # a tied parameter's pass so far

    def partial_sums(self) -> list[Tensor]:
        """The squares in the layout's order, for summing over the ranks.

        Returns:
            The tensors themselves (summed in place), a tied one once.
        """
        tensors: dict[int, Tensor] = {}
        for squares in self.squares.values():
            for tensor in squares:
                tensors.setdefault(id(tensor), tensor)
        return list(tensors.values())

    def end_pass(self) -> None:
        """Square the tied parameters' per-example gradients of a backward pass."""
        for index, grad in self._pending.items():
            self._tied_squares[index] += grad.square().sum(0)
        self._pending.clear()

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
        for squares, (rows, grad), index, dense in zip(
            self.squares[entry.name], grads, entry.indices, entry.dense
        ):
            grad = group_rows(grad.unsqueeze(1), batch, entry.name).sum(1)
            grad = grad.to(squares.dtype)
            if index in self.tied:  # summed over the uses, squared at the end
                grad = on_every_row(rows, grad, squares.shape)
                pending = self._pending.get(index)
                self._pending[index] = grad if pending is None else pending + grad
            elif dense:  # the whole per-example gradient, for the exact block
                self.dense.add(index, on_every_row(rows, grad, squares.shape))
            elif rows is None:
                squares += grad.square().sum(0)
            else:
                squares.index_add_(0, rows, grad.square().sum(0))
