r"""The corrected eigenvalues: second moments of the rotated per-example gradients.

:class:`CorrectionAccumulator` sums them in fixed eigenbases, from a second pass or
from the first pass's replay. For a layer without weight sharing this is one matrix
product,

$$
    λ = \sum_n \Big(\sum_k (Q_G^\top g_{n,k})^{2}\Big)
        \big((Q_A^\top a_n)^{2}\big)^\top ,
$$

and with weight sharing (``Conv2d``) the rotated per-example gradients
``Q_Gᵀ (Σ_s g_{n,k,s} a_{n,s}ᵀ) Q_A`` are squared and summed, each rotation applied
to whichever side of the product is cheaper (:func:`contraction_order`).

With a ``correction_rank`` the same rotated per-example gradients also feed each
block's sketch ``Y = R Ω`` (:mod:`ekfac_laplace.sketch`), for the first
``correction_examples`` examples of each layer; :meth:`CorrectionAccumulator.power_step`
gives the accumulator of the second sketch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ekfac_laplace.accumulators.base import (
    CacheEntry,
    PassAccumulator,
    PerExampleGradients,
    add_to,
    grouped,
    rotate,
)
from ekfac_laplace.diagonal import CHUNK_NUMBERS
from ekfac_laplace.factors import accumulation_dtype
from ekfac_laplace.layer import KroneckerLayer, LayerBasis
from ekfac_laplace.output_curvature import OutputCurvature
from ekfac_laplace.sketch import CurvatureSketch, block_seed


class CorrectionAccumulator(PassAccumulator):
    """Sums the corrected eigenvalues of each layer in fixed eigenbases.

    Args:
        bases: Layer name to its eigenbases.
        layers: The layers whose blocks are sketched (with ``rank``).
        rank: The correction's rank ``k`` (``0``: no sketch).
        examples: The examples each layer's sketch sees (``None``: all).
        seed: The seed of the test matrices.

    Attributes:
        weight_corrections: Layer name to ``λ`` of its weight, ``(d_out, d_in)``.
        bias_corrections: Layer name to ``λ`` of its bias, ``(d_out,)``.
        sketches: Layer name to the sketches of its weight and bias (``None``
            for a block not in the posterior), in the accumulator's layout
            ``(d_out, d_in)``.
        counts: Layer name to its examples seen and sketched (summed over ranks
            with the sketches).
    """

    def __init__(
        self,
        bases: dict[str, LayerBasis],
        layers: list[KroneckerLayer] | None = None,
        rank: int = 0,
        examples: int | None = None,
        seed: int = 0,
    ) -> None:
        self.bases = bases
        self.weight_corrections: dict[str, Tensor] = {}
        self.bias_corrections: dict[str, Tensor] = {}
        self.sketches: dict[str, tuple[CurvatureSketch | None, ...]] = {}
        self.counts: dict[str, Tensor] = {}
        self.rank, self.budget = rank, examples
        self._counts: dict[str, list[int]] = {}  # seen, sketched
        self._sketching: set[str] = set()  # the layers that sketch this batch
        self._stash: dict[str, list[Tensor]] = {}  # rotated g per pass, one position
        #: Whether to keep the sketched rank-one rows (``g̃``, ``ã``) of layers
        #: without weight sharing, so that the power step needs no pass there.
        self.keep_rows = bool(rank)
        #: The layers whose power step was made from kept rows.
        self.done: set[str] = set()
        self.rank_one_rows: dict[str, list[tuple[Tensor, Tensor | None]]] = {}
        for layer in (layers or []) if rank else []:
            self.sketches[layer.name] = self._new_sketches(layer, rank, seed)
            self._counts[layer.name] = [0, 0]
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

    def power_step(self, layers: list[KroneckerLayer]) -> CorrectionAccumulator | None:
        """The accumulator of the second sketches ``Y₂ = R Q₁`` (after the sums).

        Args:
            layers: The layers, in the layout's order.

        Returns:
            An accumulator that sketches the blocks whose first sketch is not
            ``R`` itself, for the same examples; ``None`` if there are none.
        """
        second = CorrectionAccumulator(self.bases, examples=self.budget)
        second.rank, second.keep_rows = self.rank, False
        second.counts = self.counts  # the first pass's, summed: not summed again
        for layer in layers:
            sketches = self.sketches.get(layer.name, ())
            if any(sketch is not None and not sketch.exact for sketch in sketches):
                second.sketches[layer.name] = tuple(
                    None if sketch is None or sketch.exact else sketch.power_step()
                    for sketch in sketches
                )
                second._counts[layer.name] = [0, 0]
                kept = self.rank_one_rows.pop(layer.name, None)
                if kept is not None:  # the kept rows: no pass for this layer
                    weight, bias = second.sketches[layer.name]
                    for g_rot, a_rot in kept:
                        if weight is not None:
                            weight.add_rank_one(g_rot, a_rot)
                        if bias is not None:
                            bias.add_rows(g_rot.flatten(0, 1))
                    second.done.add(layer.name)
                # The first sketches the second replaces are not needed again.
                self.sketches[layer.name] = tuple(
                    None if sketch is None or not sketch.exact else sketch
                    for sketch in sketches
                )
        self.rank_one_rows.clear()
        return second if second.sketches else None

    def sketch_sums(self, layers: list[KroneckerLayer]) -> list[Tensor]:
        """The sketches and counts in layer order, to sum over the ranks (in place).

        Args:
            layers: The layers, in the layout's order.

        Returns:
            The tensors themselves.
        """
        sums = []
        for layer in layers:
            if layer.name not in self.sketches:
                continue
            if layer.name not in self.counts:
                reference = next(s for s in self.sketches[layer.name] if s is not None)
                counts = reference.values.new_tensor(self._counts[layer.name])
                self.counts[layer.name] = counts
                sums.append(counts)
            sums += [s.values for s in self.sketches[layer.name] if s is not None]
        return sums

    def scale(self, layer: KroneckerLayer) -> float:
        """``N / N_sketched`` of a layer: the examples seen over those sketched."""
        seen, sketched = (float(c) for c in self.counts[layer.name])
        return seen / sketched if sketched > 0 else 0.0

    def begin(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Prepare the batch: rotate shared inputs once for all passes, if cheaper."""
        self._start(layer, a.shape[0])
        if not layer.shares_weight:
            return
        if layer.groups > 1:  # each group's inputs in its own basis
            q_a = self.bases[layer.name].input
            if q_a is not None:
                rotated = torch.einsum("bsgi,gij->bsgj", grouped(a, layer.groups), q_a)
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
            rotated = bias_rows.sum(1) @ basis.bias
            self._sketch_rows(layer, 1, rotated)
            self._add_bias(layer, rotated.square_().sum(0))
        if g is None:
            return
        q_g = basis.gradient
        if layer.groups > 1:
            self._grouped_gradient(layer, g, q_g)
            return
        if a.shape[1] == 1:
            rotated = g[:, 0] @ q_g
            if layer.name in self._sketching:
                self._stash.setdefault(layer.name, []).append(rotated.clone())
            self._squares[layer.name] += rotated.square_()
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
                per_example = rotate(  # our own product: squared in place
                    torch.bmm(
                        g_used[start : start + chunk].transpose(1, 2),
                        a_used[start : start + chunk],
                    ),
                    None if rotate_g else q_g,
                    q_a,
                )
                self._sketch_rows(layer, 0, per_example)  # to the sketch first
                squares += per_example.square_().sum(0)
            self._add_weight(layer, squares)
        if layer.bias_index is not None and not layer.separate_bias:
            rotated = g.sum(1) @ q_g
            self._sketch_rows(layer, 1, rotated)
            self._add_bias(layer, rotated.square_().sum(0))

    def _grouped_gradient(self, layer: KroneckerLayer, g: Tensor, q_g: Tensor) -> None:
        """One pass of a grouped layer: per group, as :meth:`gradient` does."""
        g_rot = torch.einsum("bsgo,gop->bsgp", grouped(g, layer.groups), q_g)
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
                self._sketch_rows(layer, 0, rotated)
                squares += rotated.square_().sum(0)
            self._add_weight(layer, squares)
        if layer.bias_index is not None and not layer.separate_bias:
            summed = g_rot.sum(1)
            self._sketch_rows(layer, 1, summed)
            self._add_bias(layer, summed.square_().sum(0))

    def end(self, layer: KroneckerLayer, a: Tensor) -> None:
        """Finish a layer without weight sharing with one matrix product."""
        if layer.name in self._squares:
            stash = self._stash.pop(layer.name, None)
            g_rot = torch.stack(stash, 1) if stash else None
            self._finish(layer, a, self._squares.pop(layer.name), g_rot)
        self._inputs.pop(layer.name, None)

    def output(
        self, layer: KroneckerLayer, a: Tensor, curvature: OutputCurvature
    ) -> None:
        """The output layer's correction in closed form."""
        self._start(layer, a.shape[0])
        q_g = self.bases[layer.name].gradient
        squares = curvature.rotated_squares(q_g)
        g_rot = None
        if layer.name in self._sketching:
            g_rot = curvature.vectors().to(q_g.dtype) @ q_g  # (B, K, d_out)
        self._finish(layer, a, squares, g_rot)

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
        return sums + self.sketch_sums(layers)

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
        sketched = entry.weight if entry.weight is not None else entry.bias
        self._start(layer, sketched.shape[0])
        if entry.weight is not None:
            B, K, d_out, d_in = entry.weight.shape
            chunk = max(1, CHUNK_NUMBERS // (K * d_out * d_in))
            squares = entry.weight.new_zeros(d_out, d_in)
            for start in range(0, B, chunk):  # new tensors: squared in place
                rotated = rotate(entry.weight[start : start + chunk], q_g, q_a)
                self._sketch_rows(layer, 0, rotated.flatten(0, 1))
                squares += rotated.square_().flatten(0, 1).sum(0)
            self._add_weight(layer, squares)
        if entry.bias is not None:
            rotated = entry.bias @ self.bases[layer.name].for_bias
            self._sketch_rows(layer, 1, rotated.flatten(0, 1))
            self._add_bias(layer, rotated.square_().sum((0, 1)))

    def _finish(
        self,
        layer: KroneckerLayer,
        a: Tensor,
        squares: Tensor,
        g_rot: Tensor | None = None,
    ) -> None:
        """No weight sharing: ``λ = Σ_n (Σ_k (Q_Gᵀ g_nk)²) ((Q_Aᵀ a_n)²)ᵀ``.

        ``g_rot`` ``(B, K, d_out)``, the rotated gradients of a sketched batch,
        go to the sketches as ``r = g̃_{n,k} ⊗ ã_n``.
        """
        weight_sketch, bias_sketch = self.sketches.get(layer.name, (None, None))
        a_rot = None
        if layer.weight_index is not None:
            a_rot = a[:, 0] @ self.bases[layer.name].input
            if g_rot is not None and weight_sketch is not None:
                weight_sketch.add_rank_one(g_rot, a_rot)
            kept = g_rot is not None and self.keep_rows
            self._add_weight(
                layer, squares.T @ (a_rot.square() if kept else a_rot.square_())
            )
        if layer.bias_index is not None and not layer.separate_bias:
            if g_rot is not None and bias_sketch is not None:
                bias_sketch.add_rows(g_rot.flatten(0, 1))
            self._add_bias(layer, squares.sum(0))
        if g_rot is not None and self.keep_rows:  # for the power step, no pass
            self.rank_one_rows.setdefault(layer.name, []).append((g_rot, a_rot))

    def _new_sketches(
        self, layer: KroneckerLayer, rank: int, seed: int
    ) -> tuple[CurvatureSketch | None, CurvatureSketch | None]:
        """Empty sketches of a layer's weight and bias blocks."""
        basis = self.bases[layer.name]
        dtype = accumulation_dtype(layer.weight.dtype)
        device = layer.weight.device
        groups = (layer.groups,) if layer.groups > 1 else ()
        weight = bias = None
        if layer.weight_index is not None:
            shape = (*groups, basis.gradient.shape[-1], basis.input.shape[-1])
            weight = CurvatureSketch.new(
                shape, rank, block_seed(seed, layer.weight_index), dtype, device
            )
        if layer.bias_index is not None:
            if layer.separate_bias:
                shape = (basis.bias.shape[-1],)
            else:
                shape = (*groups, basis.gradient.shape[-1])
            bias = CurvatureSketch.new(
                shape, rank, block_seed(seed, layer.bias_index), dtype, device
            )
        return weight, bias

    def _start(self, layer: KroneckerLayer, rows: int) -> None:
        """Count a batch's examples; sketch it while the layer's budget lasts."""
        counts = self._counts.get(layer.name)
        if counts is None:
            return
        counts[0] += rows
        if self.budget is None or counts[1] < self.budget:
            counts[1] += rows
            self._sketching.add(layer.name)
        else:
            self._sketching.discard(layer.name)

    def _sketch_rows(self, layer: KroneckerLayer, block: int, rows: Tensor) -> None:
        """Rotated per-example rows of the weight (``0``) or bias (``1``) sketched."""
        if layer.name not in self._sketching:
            return
        sketch = self.sketches[layer.name][block]
        if sketch is not None:
            sketch.add_rows(rows.reshape(-1, *sketch.shape))

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
        self.weight_corrections[layer.name] = add_to(
            self.weight_corrections.get(layer.name), term
        )

    def _add_bias(self, layer: KroneckerLayer, term: Tensor) -> None:
        self.bias_corrections[layer.name] = add_to(
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
