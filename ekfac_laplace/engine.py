"""Our EKFAC engine: one backward sweep per batch, the correction from a cache.

curvlinops' ``EKFACLinearOperator`` makes two full passes over the data, each with a
Python loop over examples for the loss-Hessian square root and ``C`` backward passes.
This engine computes the same quantities with

* the loss-Hessian square root in closed form for the whole batch
  (:mod:`ekfac_laplace.output_curvature`);
* back-propagation to one parameter per layer, so autograd skips the weight
  gradients that the factors never use;
* no backward pass at all for a layer whose output is the model output (its factor
  and correction are closed-form);
* the loss-Hessian root of cross-entropy with ``C − 1`` columns (its rank), one
  backward pass fewer per batch than curvlinops' ``C``;
* the first pass's layer inputs and output gradients, or, where fewer numbers (a
  convolution's many positions), its per-example gradients, kept within
  ``cache_budget_bytes`` (256 MiB by default), so that the eigenvalue correction
  needs no second pass (:mod:`ekfac_laplace.accumulators`).

A :class:`~ekfac_laplace.sweep.Sweep` is one batch (:mod:`ekfac_laplace.sweep`);
:class:`FastEKFAC` runs the passes over the data set. Results are in the scale of
the summed torch loss; :func:`ekfac_laplace.compute_ekfac` applies laplace-torch's
likelihood factor.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from laplace.utils.enums import Likelihood
from torch import Tensor, nn
from tqdm.auto import tqdm

from ekfac_laplace.accumulators import (
    CorrectionAccumulator,
    DiagonalSquares,
    FactorAccumulator,
    PassAccumulator,
)
from ekfac_laplace.batches import check_targets, to_device
from ekfac_laplace.dense import DenseBlocks
from ekfac_laplace.distributed import LocalRanks
from ekfac_laplace.factors import EKFACFactors, accumulation_dtype, likelihood_loss
from ekfac_laplace.layer import KroneckerLayer, LayerBasis
from ekfac_laplace.layout import ParameterLayout
from ekfac_laplace.options import EKFACOptions
from ekfac_laplace.output_curvature import OutputCurvature
from ekfac_laplace.sketch import transposed_columns
from ekfac_laplace.sweep import Sweep


class PassTotals(NamedTuple):
    """What one pass over the data counted (summed over the ranks in place).

    Attributes:
        loss: The summed loss.
        examples: The examples seen (counted tokens for token-level outputs), as
            a tensor.
        token_level: Whether the outputs were token-level.
    """

    loss: Tensor
    examples: Tensor
    token_level: bool = False

    def tensors(self) -> list[Tensor]:
        """The counts to sum over the ranks (in place).

        Returns:
            ``[loss, examples]``.
        """
        return [self.loss, self.examples]


class FastEKFAC:
    """EKFAC over a data set with :class:`Sweep`: factors, eigenbases, correction.

    Args:
        model: The network.
        layout: Its parameter layout.
        likelihood: ``"classification"`` or ``"regression"``.
        options: How to compute it (``fisher_type``, ``kfac_approx``,
            ``mc_samples``, ``seed``, ``cache_budget_bytes``).
        num_data: Number of training points (projects the cache size).
        progress_bar: Show a progress bar over each pass.
        ranks: The ranks of a data-parallel fit (default: one process). Each makes
            its passes over its shard; the partial sums are summed over the ranks
            after each pass and the eigendecompositions shared out
            (:mod:`ekfac_laplace.distributed`).
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ParameterLayout,
        likelihood: Likelihood | str,
        options: EKFACOptions,
        num_data: int,
        progress_bar: bool = False,
        ranks: LocalRanks | None = None,
    ) -> None:
        self.model = model
        self.layout = layout
        self.likelihood = likelihood
        self.options = options
        self.num_data = num_data
        self.progress_bar = progress_bar
        self.ranks = LocalRanks() if ranks is None else ranks
        self.sweep = Sweep(model, layout, likelihood, options.mc_per_sequence)
        self.loss_function, _ = likelihood_loss(likelihood)

    def compute(
        self,
        batches: Iterable[tuple[Any, Tensor]],
        eigenbasis: list[tuple[Tensor, ...]] | None = None,
    ) -> EKFACFactors:
        """EKFAC factors in the scale of the summed torch loss.

        Without ``eigenbasis``: a factor pass (which also gives the loss and the
        diagonal blocks), the eigenbases, and the correction from the cache or a
        second pass. With it (online fitting): one correction pass in that basis.

        Args:
            batches: Re-iterable ``(X, y)`` pairs.
            eigenbasis: Fixed eigenbasis per block (online fitting).

        Returns:
            The factors; diagonal blocks have eigenvectors ``()``.
        """
        ranks = self.ranks
        layers = self.layout.kronecker_layers
        dense = DenseBlocks(self.layout)
        diagonal = DiagonalSquares(
            self.layout.diagonal_modules, dense, self.layout.tied
        )
        if eigenbasis is None:
            factors = FactorAccumulator(
                layers,
                self.options.kfac_approx,
                self.options.cache_budget_bytes,
                self.num_data,
            )
            totals = ranks.run(
                lambda: self._pass(
                    batches, "EKFAC: Kronecker factors", factors, diagonal
                ),
                "the Kronecker-factor pass",
            )
            ranks.sum_(
                [
                    *factors.partial_sums(),
                    *diagonal.partial_sums(),
                    *dense.partial_sums(),
                    *totals.tensors(),
                ]
            )
            shared = ranks.share_out(
                len(layers) + len(dense.blocks),
                lambda i: self._eigenbasis(factors, dense, i),
            )
            bases = {
                layer.name: LayerBasis.of(layer, tensors)
                for layer, tensors in zip(layers, shared)
            }
            exact = dict(zip(dense.blocks, shared[len(layers) :]))
            correction = self._correction(bases)

            def correct() -> None:  # from the cache, and a second pass for the rest
                rest = factors.replay(correction)
                if rest:
                    self._pass(
                        batches, "EKFAC: eigenvalue correction", correction, None, rest
                    )

            ranks.run(correct, "the eigenvalue correction")
        else:
            bases = self.layout.layer_bases(eigenbasis)
            correction = self._correction(bases)
            totals = ranks.run(
                lambda: self._pass(
                    batches, "EKFAC: eigenvalue correction", correction, diagonal
                ),
                "the eigenvalue-correction pass",
            )
            ranks.sum_(
                [*diagonal.partial_sums(), *dense.partial_sums(), *totals.tensors()]
            )
            exact = {}  # the new data's exact blocks, merged by the caller
        ranks.sum_(correction.partial_sums(layers))
        low_rank = self._low_rank(batches, correction) if correction.sketches else {}
        factors = self._assemble(bases, correction, diagonal, totals, low_rank)
        for index, (values, *basis) in exact.items():
            factors.eigenvectors[index] = tuple(basis)
            factors.eigenvalues[index] = values
        if eigenbasis is not None:  # zeros in the old basis; the caller merges
            for index, block in dense.blocks.items():
                param = self.layout.params[index]
                shape = dense.structures[index].shapes(param)[0]
                factors.eigenvectors[index] = eigenbasis[index]
                factors.eigenvalues[index] = block.new_zeros(shape)
            factors.dense = dict(dense.blocks)
        return factors

    def _correction(self, bases: dict[str, LayerBasis]) -> CorrectionAccumulator:
        """The correction pass's accumulator, sketching with a ``correction_rank``.

        Each rank sketches its share of ``correction_examples``.
        """
        options = self.options
        examples = options.correction_examples
        if examples is not None:
            examples = -(-examples // self.ranks.size)
        return CorrectionAccumulator(
            bases,
            self.layout.kronecker_layers,
            options.correction_rank,
            examples,
            options.seed,
        )

    def _low_rank(
        self, batches: Iterable[tuple[Any, Tensor]], first: CorrectionAccumulator
    ) -> dict[str, tuple[tuple[Tensor, Tensor] | None, ...]]:
        """Every sketched block's top-``k`` eigenpairs, after one power step.

        The second sketches ``Y₂ = R Q₁`` take one more pass over the sketched
        examples (only as deep as the sketched layers), summed over the ranks
        (:mod:`ekfac_laplace.sketch`); a layer without weight sharing needs none,
        its sketched rows ``(g̃, ã)`` kept from the first.

        Returns:
            Layer name to ``(U, S)`` or ``None`` per block (weight, bias), over the
            block's own layout.
        """
        layers = self.layout.kronecker_layers
        second = first.power_step(layers)
        if second is not None:
            sketched = [
                layer
                for layer in layers
                if layer.name in second.sketches and layer.name not in second.done
            ]
            self.ranks.run(  # on every rank, even one whose layers need no pass
                lambda: (
                    sketched
                    and self._pass(
                        batches,
                        "EKFAC: low-rank correction",
                        second,
                        None,
                        sketched,
                        limit=second.budget,
                    )
                ),
                "the low-rank correction's pass",
            )
            self.ranks.sum_(second.sketch_sums(layers))
        pairs = {}
        for layer in layers:
            if layer.name not in first.sketches:
                continue
            again = (None, None)
            if second is not None and layer.name in second.sketches:
                again = second.sketches[layer.name]
            scale = first.scale(layer)
            used = [  # the second sketch where there is one
                sketch if later is None else later
                for sketch, later in zip(first.sketches[layer.name], again)
            ]
            found = [
                None if sketch is None else sketch.eigenpairs(first.rank, scale)
                for sketch in used
            ]
            if found[0] is not None and layer.transposed:  # the block's layout
                U, S = found[0]
                found[0] = (transposed_columns(U, used[0].shape), S)
            pairs[layer.name] = tuple(found)
        return pairs

    def _eigenbasis(
        self, factors: FactorAccumulator, dense: DenseBlocks, item: int
    ) -> list[Tensor]:
        """Eigendecomposition ``item``: the layers' factors, then the other blocks.

        The per-example structures' blocks (exact, or another), by their structure.
        """
        layers = factors.layers
        if item < len(layers):
            return factors.eigenbasis(layers[item]).tensors()
        index = list(dense.blocks)[item - len(layers)]
        block = self.layout.blocks[index]
        basis, values = dense.decompose(
            index,
            f"{self.layout.structure(index)} block of '{block.module}.{block.name}'",
        )
        return [values, *basis]

    def _pass(
        self,
        batches: Iterable[tuple[Any, Tensor]],
        description: str,
        accumulator: PassAccumulator,
        diagonal: DiagonalSquares | None = None,
        layers: list[KroneckerLayer] | None = None,
        limit: int | None = None,
    ) -> PassTotals:
        """One pass over the data (over ``layers``, default all); what it counted.

        The label sampler is re-seeded at every pass, so both passes of a fit draw
        the same Monte-Carlo labels. With ``limit``, the pass stops before the
        first batch that starts at or past that many examples.
        """
        reference = self.layout.params[0]
        device = reference.device
        generator = torch.Generator(device=device)
        # One stream per rank: reproducible for a given seed and number of ranks.
        generator.manual_seed(self.options.seed + self.ranks.rank)
        dtype = accumulation_dtype(reference.dtype)
        loss = torch.zeros((), dtype=dtype, device=device)
        examples, token_level = 0, False
        progress = tqdm(batches, desc=description, disable=not self.progress_bar)
        started = 0
        for index, (X, y) in enumerate(progress):
            if limit is not None and started >= limit:
                break
            started += len(y)
            y = y.to(device)
            X = to_device(X, device)
            curvature_fn = functools.partial(self._output_curvature, generator, index)
            f, y_rows = self.sweep.run(
                X, y, curvature_fn, accumulator, diagonal, layers
            )
            loss = loss + self.loss_function(f, y_rows)
            accumulator.batch_done(f.shape[0])
            token_level = token_level or y_rows is not y  # each token an example
            examples += y_rows.shape[0]
        return PassTotals(loss, loss.new_tensor(float(examples)), token_level)

    def _output_curvature(
        self, generator: torch.Generator, batch: int, f: Tensor, y: Tensor
    ) -> OutputCurvature:
        check_targets(f, y, self.likelihood, batch)  # every batch, not the first
        return OutputCurvature(f, y, self.likelihood, self.options, generator)

    def _assemble(
        self,
        bases: dict[str, LayerBasis],
        correction: CorrectionAccumulator,
        diagonal: DiagonalSquares,
        totals: PassTotals,
        low_rank: dict[str, tuple[tuple[Tensor, Tensor] | None, ...]],
    ) -> EKFACFactors:
        """Eigenvectors and eigenvalues in block order, the loss and the count."""
        n_blocks = len(self.layout)
        eigenvectors: list[tuple[Tensor, ...]] = [()] * n_blocks
        eigenvalues: list[Tensor | None] = [None] * n_blocks
        for layer in self.layout.kronecker_layers:
            basis = bases[layer.name]
            if layer.weight_index is not None:
                q_g = basis.gradient
                weight = correction.weight_corrections[layer.name]
                if layer.groups == 1:
                    weight = weight.reshape(q_g.shape[0], -1)
                block, values = layer.weight_block(q_g, basis.input, weight)
                eigenvectors[layer.weight_index] = block
                eigenvalues[layer.weight_index] = values
            if layer.bias_index is not None:
                eigenvectors[layer.bias_index] = (basis.for_bias,)
                eigenvalues[layer.bias_index] = correction.bias_corrections[layer.name]
        for entry in self.layout.diagonal_modules:
            for index, squares in zip(entry.indices, diagonal.squares[entry.name]):
                eigenvalues[index] = squares  # an exact block's: set by compute
        tokens = round(float(totals.examples)) if totals.token_level else None
        return EKFACFactors(
            eigenvectors,
            eigenvalues,
            totals.loss,
            tokens,
            batch_dims=self.sweep.batch_dims,
            corrections=self._corrections(low_rank),
        )

    def _corrections(
        self, low_rank: dict[str, tuple[tuple[Tensor, Tensor] | None, ...]]
    ) -> dict[int, tuple[Tensor, Tensor]]:
        """Block index to its ``(U, S)``, over the block's own layout."""
        corrections = {}
        for layer in self.layout.kronecker_layers:
            if layer.name not in low_rank:
                continue
            weight, bias = low_rank[layer.name]
            if weight is not None:
                corrections[layer.weight_index] = weight
            if bias is not None:
                corrections[layer.bias_index] = bias
        return corrections


def fast_ekfac(
    model: nn.Module,
    layout: ParameterLayout,
    batches: Iterable[tuple[Any, Tensor]],
    likelihood: Likelihood | str,
    num_data: int,
    options: EKFACOptions,
    *,
    eigenbasis: list[tuple[Tensor, ...]] | None = None,
    progress_bar: bool = False,
    ranks: LocalRanks | None = None,
) -> EKFACFactors:
    """EKFAC factors with our engine, in the scale of the summed torch loss.

    Args:
        model: The network.
        layout: The parameter layout of the posterior.
        batches: Re-iterable ``(X, y)`` pairs.
        likelihood: ``"classification"`` or ``"regression"``.
        num_data: Number of training points.
        options: How to compute it.
        eigenbasis: Fixed eigenbasis per block (online fitting): skips the factor
            pass.
        progress_bar: Show a progress bar over each pass.
        ranks: The ranks of a data-parallel fit (default: one process).

    Returns:
        Eigenvectors, corrected eigenvalues and the summed loss (over all ranks).
    """
    engine = FastEKFAC(
        model, layout, likelihood, options, num_data, progress_bar, ranks
    )
    return engine.compute(batches, eigenbasis)
